"""Low-rank STR recurrent cells vs dense GRU / LSTM / FastGRNN on MNIST-1D as a sequence.

    .venv/bin/python benchmarks/low_rank_rnn.py --seeds 3 --epochs 20 --out benchmarks/results/low_rank_rnn.json

Task: `tfs.datasets.mnist1d(num_samples=10000)` (8000 train / 2000 test), each
example a 40-step, 1-feature sequence; an RNN with 64 hidden units reads it and
a Dense(10) classifies the last state. Every model trains with the same recipe:
Adam 1e-2 with cosine decay, gradient clipnorm 1, batch 128, `--epochs`
epochs. The low-rank STR models start at full rank and are steered to a
recurrent rank of 25% (16/64) by `TargetSparsity(0.75)` (cubic ramp over the
first half of training, `--end-fraction 0.5`; thresholds `exponential`,
`learn_threshold=False`); their 1x(gates*64) input matrices have rank 1 and
are not steered. The whole run takes ~12 min on 2 shared cores.

Per model: test accuracy (mean +- std over seeds), learned ranks, trained and
deployed parameters; then for the first seed the stripped model is unrolled
(static batch 1, 40 steps), converted to full int8 (builtins only) and
measured: .tflite bytes, int8 test accuracy (LiteRT reference kernels),
agreement of tflite-micro with LiteRT's reference kernels over 200 test
inputs (max |diff| of the int8 logits in quantization steps, share of inputs
with identical logits and within 1 step), TFLM arena bytes and TFLM / LiteRT
invoke times (host x86, Python-driven: relative numbers only). All RNNs are
exported in the factorized cells' export form (1x1 CONV_2D projections; see
`deployable`).
"""

import argparse
import json
import pathlib
import sys
import time

from common import write_results  # noqa: E402  (first: quiet TensorFlow, results with the environment)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
from tf_sparsity.layers import low_rank as lr  # noqa: E402

HERE = pathlib.Path(__file__).parent
MODELS = ("gru", "lstm", "lowrank_gru", "lowrank_lstm", "fastgrnn", "lowrank_fastgrnn")


def build(kind, units):
    str_args = dict(threshold_fn="exponential", s_init=-10.0, learn_threshold=False)
    layer = {
        "gru": lambda: keras.layers.GRU(units),
        "lstm": lambda: keras.layers.LSTM(units),
        "fastgrnn": lambda: keras.layers.RNN(lr.FactorizedFastGRNNCell(units)),
        "lowrank_gru": lambda: lr.LowRankGRU(units, **str_args),
        "lowrank_lstm": lambda: lr.LowRankLSTM(units, **str_args),
        "lowrank_fastgrnn": lambda: lr.FastGRNN(units, **str_args),
    }[kind]()
    return keras.Sequential([keras.Input((40, 1)), layer, keras.layers.Dense(10)], name=kind)


def deployable(model):
    """Stripped, unrolled copy with static batch 1 x 40 steps, projections as 1x1 CONV_2D.

    Every RNN gets the export form of the factorized cells
    (`projection="conv"`): Keras' GRU / LSTM cells become `FactorizedGRUCell`
    / `FactorizedLSTMCell` with ranks None (the same math and weights), so
    the dense baselines are exported exactly like the low-rank models.
    """
    inputs = keras.Input((40, 1), batch_size=1)
    x = inputs
    for layer in model.layers:
        if hasattr(layer, "stripped_layer"):
            x = layer.stripped_layer(unroll=True)(x)
        elif isinstance(layer, keras.layers.RNN):
            cell = layer.cell
            if isinstance(cell, (keras.layers.GRUCell, keras.layers.LSTMCell)):
                factorized = lr.FactorizedGRUCell if isinstance(cell, keras.layers.GRUCell) else lr.FactorizedLSTMCell
                cell = factorized(cell.units, projection="conv")
            else:
                cell = cell.__class__.from_config(dict(cell.get_config(), projection="conv"))
            copy = keras.layers.RNN(cell, unroll=True)
            y = copy(x)
            copy.set_weights(layer.get_weights())
            x = y
        else:
            x = layer(x)
    plain = keras.Model(inputs, x)
    sample = np.linspace(-2, 2, 40, dtype="float32").reshape(1, 40, 1)
    np.testing.assert_allclose(plain(sample), model(sample), atol=1e-4)
    return plain


def int8_tflite(model, calibration):
    archive = keras.export.ExportArchive()
    archive.track(model)
    fn = archive.add_endpoint("serve", lambda t: model(t, training=False),
                              [tf.TensorSpec(model.inputs[0].shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], archive)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter.representative_dataset = lambda: ([s[None]] for s in calibration)
    return converter.convert()


def measure_tflite(blob, x_test, y_test, with_micro, compare_samples=200):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    ref = Interpreter(model_content=blob, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    ref.allocate_tensors()
    ops = sorted({o["op_name"] for o in ref._get_ops_details()})
    inp, out = ref.get_input_details()[0], ref.get_output_details()[0]
    scale, zero = inp["quantization"]
    q = np.clip(np.round(x_test / scale + zero), -128, 127).astype(np.int8)
    outputs = []
    for sample in q:
        ref.set_tensor(inp["index"], sample[None])
        ref.invoke()
        outputs.append(ref.get_tensor(out["index"])[0].astype(int))
    outputs = np.array(outputs)
    result = {"tflite_bytes": len(blob), "ops": ops,
              "int8_accuracy": float(np.mean(outputs.argmax(1) == y_test))}
    fast = Interpreter(model_content=blob)
    fast.allocate_tensors()
    result["litert_invoke_us"] = _median_us(lambda: fast.invoke(), fast, inp, q[0])
    if not with_micro:
        return result
    from tflite_micro.python.tflite_micro import runtime

    micro = runtime.Interpreter.from_bytes(blob)
    diffs = []
    for i in range(compare_samples):
        micro.set_input(q[i][None], 0)
        micro.invoke()
        diffs.append(int(np.abs(micro.get_output(0)[0].astype(int) - outputs[i]).max()))
    diffs = np.array(diffs)
    result["tflm_vs_litert_ref_max_steps"] = int(diffs.max())
    result["tflm_vs_litert_ref_identical"] = float(np.mean(diffs == 0))
    result["tflm_vs_litert_ref_within_1"] = float(np.mean(diffs <= 1))
    result["tflm_vs_litert_ref_samples"] = len(diffs)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        micro.invoke()
        times.append(time.perf_counter() - start)
    result["tflm_invoke_us"] = float(np.median(times) * 1e6)
    try:  # the export module's bisection over real interpreters, when present
        from tf_sparsity.export.runtimes import tflm_arena_bytes

        result["tflm_arena_bytes"] = int(tflm_arena_bytes(blob, [q[0][None]], granularity=64))
        result["arena_method"] = "smallest working arena (tf_sparsity.export.runtimes)"
    except ImportError:
        result["tflm_arena_bytes"] = None
    return result


def _median_us(run, interpreter, detail, sample):
    interpreter.set_tensor(detail["index"], sample[None])
    times = []
    for _ in range(50):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def run(kind, seed, data, a, export):
    keras.utils.set_random_seed(seed)
    model = build(kind, a.units)
    steps = int(np.ceil(len(data[0][0]) / 128)) * a.epochs
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(a.lr, steps), clipnorm=1.0)
    callbacks = ([tfs.callbacks.TargetSparsity(a.target, end_fraction=a.end_fraction)]
                 if kind.startswith("lowrank") else [])
    start = time.perf_counter()
    result = train_classifier(model, *data, epochs=a.epochs, optimizer=optimizer, callbacks=callbacks)
    row = {"kind": kind, "seed": seed, "accuracy": result["accuracy"],
           "train_seconds": time.perf_counter() - start,
           "params": int(sum(np.prod(w.shape) for w in model.trainable_weights))}
    rnn = model.layers[0]
    if hasattr(rnn, "ranks"):
        row["ranks"] = list(rnn.ranks())
        row["max_ranks"] = list(rnn.max_ranks())
    plain = deployable(model)
    row["deployed_params"] = int(sum(np.prod(w.shape) for w in plain.weights))
    (x_train, _), (x_test, y_test) = data
    if export:
        blob = int8_tflite(plain, x_train[:200])
        row.update(measure_tflite(blob, x_test, y_test, with_micro=(seed == a.seeds_start)))
    return row


def summarize(rows, kinds):
    table = []
    for kind in kinds:
        runs = [r for r in rows if r["kind"] == kind]
        if not runs:
            continue
        acc = np.array([r["accuracy"] for r in runs]) * 100
        first = runs[0]
        exported = [r for r in runs if "tflite_bytes" in r]
        e = exported[0] if exported else {}
        table.append({
            "model": kind, "seeds": len(runs), "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std()), "accuracies": acc.round(2).tolist(),
            "ranks": [r.get("ranks") for r in runs], "max_ranks": first.get("max_ranks"),
            "params": first["params"], "deployed_params": first["deployed_params"],
            "int8_accuracy": [round(100 * r["int8_accuracy"], 2) for r in exported],
            **{k: e.get(k) for k in ("tflite_bytes", "tflm_arena_bytes", "tflm_invoke_us",
                                     "litert_invoke_us", "tflm_vs_litert_ref_max_steps",
                                     "tflm_vs_litert_ref_identical", "tflm_vs_litert_ref_within_1", "ops")},
        })
    return table


def _fmt(value):
    return "-" if value is None else f"{value:,.0f}"


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(table):
    lines = ["| model | accuracy % (mean ± std) | recurrent rank | params (train → deploy) | "
             "int8 acc % | .tflite bytes | TFLM arena bytes | TFLM invoke µs | "
             "TFLM vs LiteRT ref: max steps, % identical, % ≤ 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        ranks = [r for r in t["ranks"] if r]
        rank = (", ".join(str(r[1]) for r in ranks) + f" / {t['max_ranks'][1]}") if ranks else "full"
        lines.append(
            f"| {t['model']} | {t['accuracy_mean']:.2f} ± {t['accuracy_std']:.2f} | {rank} | "
            f"{t['params']:,} → {t['deployed_params']:,} | "
            f"{', '.join(f'{v:.2f}' for v in t['int8_accuracy']) or '-'} | "
            f"{_fmt(t['tflite_bytes'])} | {_fmt(t['tflm_arena_bytes'])} | {_fmt(t['tflm_invoke_us'])} | "
            f"{_fmt(t['tflm_vs_litert_ref_max_steps'])}, {_pct(t['tflm_vs_litert_ref_identical'])}, "
            f"{_pct(t['tflm_vs_litert_ref_within_1'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seeds-start", dest="seeds_start", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--target", type=float, default=0.75, help="fraction of factor weights removed")
    parser.add_argument("--end-fraction", dest="end_fraction", type=float, default=0.5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--export-seeds", dest="export_seeds", type=int, default=1,
                        help="seeds whose models are converted to int8 and measured")
    parser.add_argument("--out", default=str(HERE / "results" / "low_rank_rnn.json"))
    a = parser.parse_args(argv)
    kinds = [k for k in a.models.split(",") if k]
    unknown = sorted(set(kinds) - set(MODELS))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    data = tfs.datasets.mnist1d(num_samples=10000)
    rows, start = [], time.perf_counter()
    for seed in range(a.seeds_start, a.seeds_start + a.seeds):
        for kind in kinds:
            row = run(kind, seed, data, a, export=seed < a.seeds_start + a.export_seeds)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ops"}), flush=True)
    table = summarize(rows, kinds)
    text = markdown(table)
    print(text)
    out = {"command": " ".join([".venv/bin/python", "benchmarks/low_rank_rnn.py"] + sys.argv[1:]),
           "args": vars(a), "seconds": time.perf_counter() - start, "table": table, "runs": rows,
           "markdown": text}
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, out)


if __name__ == "__main__":
    main()
