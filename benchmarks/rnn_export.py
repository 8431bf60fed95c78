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
time step, the state carried by the caller; `step_head="separate"`: the head
is a second model run once per sequence), `step_joined` (the same with
`step_head="joined"`, the head inside the step model, run at every step:
`convert`'s default since it measured the smaller arena), `loop` (the float WHILE graph,
`target="litert", quantize=None`: int8 of the loop does not convert) and
`fused` (LSTMs: UNIDIRECTIONAL_SEQUENCE_LSTM via tf_keras in a child process;
needs TF_SPARSITY_BASELINE_PYTHON). Per model and form: .tflite bytes (step:
step + head model), TFLM arena bytes (smallest working arena; step: the two
interpreters' arenas), invoke time per sequence on tflite-micro (host build)
and LiteRT (step form: the sum of its 40 invokes + the head's), each the
median over `--timing-rounds` interleaved rounds of the median over
sequences, with the ratio to the unrolled form of the same round, the cost of
one Python-driven invoke of a one-op model in the same rounds, test accuracy
on tflite-micro over the WHOLE test set vs the float Keras model, and the
EdgeTPU preflight verdict of the same model.
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


def tflm_accuracy_unrolled(blob, x, y, float_io=False):
    info = tfs.export.inspect(blob)
    q = info.inputs[0].quantization
    params = None if float_io else (q["scale"], q["zero_point"])
    interpreter = runtimes.tflm_interpreter(blob, runtimes.generous_arena(blob))
    hits = 0
    for seq, label in zip(x, y):
        interpreter.set_input(seq[None].astype(np.float32) if float_io else runtimes.quantize(seq[None], params, np.int8), 0)
        interpreter.invoke()
        hits += int(np.argmax(interpreter.get_output(0)) == label)
    return hits / len(x)


def export(model, form, x):
    """`step`: the head as its own model (`step_head="separate"`); `step_joined`: the head in the step model
    (`step_head="joined"`, the default); `loop`: float WHILE graph (int8 of the loop does not convert),
    exported for LiteRT, run on both."""
    if form == "loop":
        return tfs.export.convert(model, target="litert", quantize=None, representative_data=x[:100],
                                  recurrent="loop")
    if form in ("step", "step_joined"):
        return tfs.export.convert(model, target="tflm", representative_data=x[:100], recurrent="step",
                                  step_head="joined" if form == "step_joined" else "separate")
    return tfs.export.convert(model, target="tflm", representative_data=x[:100], recurrent=form)


def timings(result, form, x, n):
    """Microseconds per sequence on tflite-micro and LiteRT (one median over `n` sequences or invokes)."""
    if form in ("step", "step_joined"):
        return {rt: result.time_sequence(x[:n], runtime=rt)["invoke"] * 1e6 for rt in ("tflm", "litert")}
    return {"tflm": runtimes.time_tflm(result.tflite, runs=n) * 1e6,
            "litert": runtimes.time_litert(result.tflite, runs=n) * 1e6}


ONE_OP = []  # a one-op int8 model: what one Python-driven invoke costs on each runtime


def one_op_model():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    data = np.random.default_rng(0).normal(size=(16, 1)).astype("float32")
    return tfs.export.convert(model, target="tflm", representative_data=data, verify=False)


def timed_rounds(results, x, a):
    """Time every form of one model in `a.timing_rounds` interleaved rounds -> per form: medians and
    the median over rounds of the ratio to the unrolled form of the same round."""
    rounds = []
    for _ in range(a.timing_rounds):
        rounds.append({form: timings(r, form, x, a.timing_sequences) for form, r in results.items()})
        rounds[-1]["_one_op"] = timings(ONE_OP[0], "unroll", x, a.timing_sequences)  # per-invoke overhead
    out = {"one_op_invoke_us": {rt: float(np.median([r["_one_op"][rt] for r in rounds])) for rt in ("tflm", "litert")}}
    for form in results:
        entry = {}
        for rt in ("tflm", "litert"):
            values = [r[form][rt] for r in rounds]
            entry[f"{rt}_us_per_sequence"] = float(np.median(values))
            entry[f"{rt}_us_rounds"] = values
            if "unroll" in results:
                entry[f"{rt}_x_unrolled"] = float(np.median([r[form][rt] / r["unroll"][rt] for r in rounds]))
        out[form] = entry
    return out


def measure(model, form, data, a):
    (x, _), (x_test, y_test) = data
    start = time.perf_counter()
    result = export(model, form, x)
    if form == "loop":
        row = {"form": form, "export_seconds": time.perf_counter() - start, "file_bytes": len(result.tflite),
               "precision": "float32", "ops": dict(result.report.ops),
               "op_count": int(sum(result.report.ops.values()))}
        sample = np.asarray(x_test[:1], np.float32)
        row["arena_bytes"] = runtimes.tflm_arena_bytes(result.tflite, [sample])
        n = len(x_test) if a.test_samples is None else a.test_samples
        row["tflm_int8_accuracy"] = tflm_accuracy_unrolled(result.tflite, x_test[:n], y_test[:n], float_io=True)
        verdict = tfs.export.inspect(result.tflite).verdict("edgetpu")
        row["edgetpu"] = "fails (float WHILE)" if not verdict.ok or verdict.first_fallback is not None else "pass"
        return row, result
    row = {"form": form, "export_seconds": time.perf_counter() - start,
           "file_bytes": (result.report.recurrent or {}).get("file_bytes") or len(result.tflite),
           "arena_bytes": result.report.tflm.get("arena_bytes"),
           "ops": dict(result.report.ops), "op_count": int(sum(result.report.ops.values())),
           "tflm_vs_reference_steps": result.report.tflm.get("max_diff_vs_reference_steps")}
    verdict = tfs.export.inspect(result.tflite).verdict("edgetpu")
    row["edgetpu"] = "pass" if verdict.first_fallback is None and verdict.ok else (
        f"fails at {str(verdict.first_fallback).split(':')[0]}" if verdict.first_fallback is not None else "fails")
    n = len(x_test) if a.test_samples is None else a.test_samples
    if form in ("step", "step_joined", "fused"):  # fused: variable state tensors reset before each sequence
        out = result.run_sequence(x_test[:n], runtime="tflm")
        row["tflm_int8_accuracy"] = float(np.mean(np.argmax(out, -1) == y_test[:n]))
        row["state_dtype"] = result.report.recurrent.get("state_dtype")
    if form in ("step", "step_joined"):
        rec = result.report.recurrent
        row.update({k: rec.get(k) for k in ("state_quantization", "state_dtype_choice", "head", "step_file_bytes",
                                             "head_file_bytes", "step_arena_bytes", "head_arena_bytes")})
        row["step_ops"] = dict(tfs.export.inspect(result.tflite).op_counts)
        row["arena_allocations"] = allocations(result.tflite)
    if form == "unroll":
        row["tflm_int8_accuracy"] = tflm_accuracy_unrolled(result.tflite, x_test[:n], y_test[:n])
    return row, result


def allocations(blob):
    """tflite-micro's RecordingMicroAllocator lines for `blob` (where the arena goes)."""
    interpreter = runtimes.tflm_interpreter(blob, runtimes.generous_arena(blob))
    with runtimes.captured_stderr() as log:
        interpreter.print_allocations()
    return [line.split("] ", 1)[-1] for line in (log[0] if log else "").splitlines() if "Arena" in line or "used" in line]


def markdown(rows):
    lines = ["| model | form | float acc % | TFLM acc % (Δ) | states | .tflite bytes | TFLM arena bytes | ops | "
             "TFLM µs / seq (× unrolled) | LiteRT µs / seq (× unrolled) | EdgeTPU preflight |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for f in r["forms"]:
            if "error" in f:
                lines.append(f"| {r['model']} | {f['form']} | | failed: {f['error'][:80]} | | | | | | | |")
                continue
            delta = 100 * (f["tflm_int8_accuracy"] - r["float_accuracy"])
            times = [f"{f[f'{rt}_us_per_sequence']:,.0f} ({f.get(f'{rt}_x_unrolled', float('nan')):.2f}×)"
                     if f"{rt}_us_per_sequence" in f else "-" for rt in ("tflm", "litert")]
            size = f"{f['file_bytes']:,}" + (f" ({f['step_file_bytes']:,} + head {f['head_file_bytes']:,})"
                                             if f.get("head_file_bytes") else "")
            arena = f"{f['arena_bytes']:,}" + (f" ({f['step_arena_bytes']:,} + head {f['head_arena_bytes']:,})"
                                               if f.get("head_arena_bytes") else "")
            states = f.get("state_dtype") or ("float" if f["form"] == "loop" else "–")
            lines.append(
                f"| {r['model']} | {f['form']} | {100 * r['float_accuracy']:.2f} | "
                f"{100 * f['tflm_int8_accuracy']:.2f} ({delta:+.2f}) | {states} | {size} | "
                f"{arena} | {f['op_count']} | {times[0]} | {times[1]} | {f['edgetpu']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-samples", dest="test_samples", type=int, default=None, help="default: whole test set")
    p.add_argument("--timing-sequences", dest="timing_sequences", type=int, default=50)
    p.add_argument("--timing-rounds", dest="timing_rounds", type=int, default=5,
                   help="interleaved timing rounds over the forms of one model (medians and ratios over rounds)")
    p.add_argument("--forms", default="unroll,step,step_joined,loop,fused")
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
        row["forms"], results = [], {}
        for form in a.forms.split(","):
            if form == "fused" and MODELS[name][0] != "lstm":
                continue
            try:
                entry, results[form] = measure(model, form, data, a)
                row["forms"].append(entry)
            except Exception as error:  # reported, not hidden
                row["forms"].append({"form": form, "error": f"{type(error).__name__}: {error}"})
        if not ONE_OP:
            ONE_OP.append(one_op_model())
        timed = timed_rounds(results, data[1][0], a)
        row["one_op_invoke_us"] = timed.pop("one_op_invoke_us")
        for entry in row["forms"]:
            entry.update(timed.get(entry["form"], {}))
            print(json.dumps({"model": name, **{k: v for k, v in entry.items() if k not in (
                "ops", "state_quantization", "arena_allocations", "state_dtype_choice")}}), flush=True)
        rows.append(row)
        text = markdown(rows)
        out = {"command": " ".join([".venv/bin/python", "benchmarks/rnn_export.py"] + (argv or sys.argv[1:])),
               "args": vars(a), "seconds": time.perf_counter() - start, "rows": rows, "markdown": text,
               "baseline_python": recurrent.baseline_python()}
        write_results(path, out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
