"""Recurrent models on a microcontroller: step / fused / unrolled exports on MNIST-1D, measured on tflite-micro.

    TF_SPARSITY_BASELINE_PYTHON=/path/to/venv-with-tf_keras/bin/python \\
    .venv/bin/python benchmarks/rnn_export.py --epochs 10 --out benchmarks/results/rnn_export.json

Models (MNIST-1D, 10k samples, 40 steps x 1 feature, Dense(10) head), trained
with the recipe of `benchmarks/low_rank_rnn.py` (Adam + cosine, clipnorm 1,
batch 128; low-rank models steered to recurrent rank 25% by
`TargetSparsity(0.75)`): dense GRU / LSTM / FastGRNN and low-rank GRU / LSTM /
FastGRNN with 64 units, plus GRU(32), LSTM(32) and the demo's low-rank GRU(32)
for the size goals of issue 14.

Each trained model is exported with `tfs.export.convert(target="tflm")` in
every form that applies: `unroll` (40 steps of plain int8 ops), `step` (one
time step, the state carried by the caller) and `fused` (LSTMs:
UNIDIRECTIONAL_SEQUENCE_LSTM via tf_keras in a child process; needs
TF_SPARSITY_BASELINE_PYTHON). Per model and form: .tflite bytes, TFLM arena
bytes (smallest working arena), TFLM invoke time per sequence (host build,
median over sequences; step form = sum of its 40 invokes; ratio to the
unrolled form measured in the same run), int8 test accuracy on tflite-micro
over the WHOLE test set vs the float Keras model, and the EdgeTPU preflight
verdict of the same int8 model.
"""

import argparse
import json
import pathlib
import sys
import time

from common import write_results  # noqa: E402  (first: quiet TensorFlow, results with the environment)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.experiments import train_classifier  # noqa: E402
from tf_sparsity.export import recurrent, runtimes  # noqa: E402

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from low_rank_rnn import build  # noqa: E402

MODELS = {  # name -> (kind in low_rank_rnn.build, units)
    "gru": ("gru", 64), "lstm": ("lstm", 64), "fastgrnn": ("fastgrnn", 64),
    "lowrank_gru": ("lowrank_gru", 64), "lowrank_lstm": ("lowrank_lstm", 64),
    "lowrank_fastgrnn": ("lowrank_fastgrnn", 64),
    "gru32": ("gru", 32), "lstm32": ("lstm", 32), "demo_lowrank_gru32": ("lowrank_gru", 32),
}


def train(name, data, a):
    kind, units = MODELS[name]
    keras.utils.set_random_seed(a.seed)
    model = build(kind, units)
    steps = int(np.ceil(len(data[0][0]) / 128)) * a.epochs
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(a.lr, steps), clipnorm=1.0)
    callbacks = [tfs.callbacks.TargetSparsity(0.75, end_fraction=0.5)] if kind.startswith("lowrank") else []
    start = time.perf_counter()
    result = train_classifier(model, *data, epochs=a.epochs, optimizer=optimizer, callbacks=callbacks)
    row = {"model": name, "kind": kind, "units": units, "float_accuracy": result["accuracy"],
           "train_seconds": time.perf_counter() - start}
    if hasattr(model.layers[0], "ranks"):
        row["ranks"] = list(model.layers[0].ranks())
    return model, row


def tflm_accuracy_unrolled(blob, x, y):
    info = tfs.export.inspect(blob)
    q = info.inputs[0].quantization
    params = (q["scale"], q["zero_point"])
    interpreter = runtimes.tflm_interpreter(blob, runtimes.generous_arena(blob))
    hits = 0
    for seq, label in zip(x, y):
        interpreter.set_input(runtimes.quantize(seq[None], params, np.int8), 0)
        interpreter.invoke()
        hits += int(np.argmax(interpreter.get_output(0)) == label)
    return hits / len(x)


def measure(model, form, data, a):
    (x, _), (x_test, y_test) = data
    start = time.perf_counter()
    result = tfs.export.convert(model, target="tflm", representative_data=x[:100], recurrent=form)
    row = {"form": form, "export_seconds": time.perf_counter() - start,
           "file_bytes": len(result.tflite), "arena_bytes": result.report.tflm.get("arena_bytes"),
           "ops": dict(result.report.ops), "op_count": int(sum(result.report.ops.values())),
           "tflm_vs_reference_steps": result.report.tflm.get("max_diff_vs_reference_steps")}
    verdict = tfs.export.inspect(result.tflite).verdict("edgetpu")
    row["edgetpu"] = "pass" if verdict.first_fallback is None and verdict.ok else (
        f"fails at {verdict.first_fallback}" if verdict.first_fallback is not None else "fails")
    n = len(x_test) if a.test_samples is None else a.test_samples
    if form in ("step", "fused"):  # fused: variable state tensors reset before each sequence
        out = result.run_sequence(x_test[:n], runtime="tflm")
        row["tflm_int8_accuracy"] = float(np.mean(np.argmax(out, -1) == y_test[:n]))
        row["state_dtype"] = result.report.recurrent.get("state_dtype")
    if form == "fused":
        row["invoke_us_per_sequence"] = runtimes.time_tflm(result.tflite, runs=a.timing_sequences) * 1e6
    elif form == "step":
        timing = result.time_sequence(x_test[:a.timing_sequences], runtime="tflm")
        row["invoke_us_per_sequence"] = timing["invoke"] * 1e6
        row["python_loop_us_per_sequence"] = timing["loop"] * 1e6
        row["state_quantization"] = result.report.recurrent.get("state_quantization")
        row["state_dtype_choice"] = result.report.recurrent.get("state_dtype_choice")
    else:
        row["tflm_int8_accuracy"] = tflm_accuracy_unrolled(result.tflite, x_test[:n], y_test[:n])
        row["invoke_us_per_sequence"] = runtimes.time_tflm(result.tflite, runs=a.timing_sequences) * 1e6
    return row


def markdown(rows):
    lines = ["| model | form | float acc % | TFLM int8 acc % (Δ) | .tflite bytes | TFLM arena bytes | ops | "
             "TFLM µs / sequence (× unrolled) | EdgeTPU preflight |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unrolled = next((f for f in r["forms"] if f["form"] == "unroll"), None)
        for f in r["forms"]:
            if "error" in f:
                lines.append(f"| {r['model']} | {f['form']} | | failed: {f['error'][:80]} | | | | | |")
                continue
            ratio = (f"{f['invoke_us_per_sequence'] / unrolled['invoke_us_per_sequence']:.2f}×"
                     if unrolled and "invoke_us_per_sequence" in unrolled else "-")
            delta = 100 * (f["tflm_int8_accuracy"] - r["float_accuracy"])
            lines.append(
                f"| {r['model']} | {f['form']} | {100 * r['float_accuracy']:.2f} | "
                f"{100 * f['tflm_int8_accuracy']:.2f} ({delta:+.2f}) | {f['file_bytes']:,} | "
                f"{f['arena_bytes']:,} | {f['op_count']} | {f['invoke_us_per_sequence']:,.0f} ({ratio}) | "
                f"{f['edgetpu']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-samples", dest="test_samples", type=int, default=None, help="default: whole test set")
    p.add_argument("--timing-sequences", dest="timing_sequences", type=int, default=50)
    p.add_argument("--forms", default="unroll,step,fused")
    p.add_argument("--out", default=str(HERE / "results" / "rnn_export.json"))
    a = p.parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    data = tfs.datasets.mnist1d(num_samples=10000)
    rows, start = [], time.perf_counter()
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        model, row = train(name, data, a)
        row["forms"] = []
        for form in a.forms.split(","):
            if form == "fused" and MODELS[name][0] != "lstm":
                continue
            try:
                row["forms"].append(measure(model, form, data, a))
            except Exception as error:  # reported, not hidden
                row["forms"].append({"form": form, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps({"model": name, **{k: v for k, v in row["forms"][-1].items()
                                                 if k not in ("ops", "state_quantization")}}), flush=True)
        rows.append(row)
        text = markdown(rows)
        out = {"command": " ".join([".venv/bin/python", "benchmarks/rnn_export.py"] + (argv or sys.argv[1:])),
               "args": vars(a), "seconds": time.perf_counter() - start, "rows": rows, "markdown": text,
               "baseline_python": recurrent.baseline_python()}
        write_results(path, out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
