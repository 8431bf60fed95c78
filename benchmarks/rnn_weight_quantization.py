"""Per-channel vs per-tensor int8 weights for the step form: file, TFLM arena and accuracy on tflite-micro.

    .venv/bin/python benchmarks/rnn_weight_quantization.py --out benchmarks/results/rnn_weight_quantization.json

For each model (default: the five step models of issue 14: GRU(64),
LSTM(64), FastGRNN(64), low-rank GRU(64), the demo's low-rank GRU(32)),
trained as `benchmarks/rnn_export.py` does (or loaded from
`--keras-dir/<name>.keras`, saved by an earlier run of the same recipe), export
`tfs.export.convert(model, target="tflm", representative_data=x_train[:100],
recurrent="step", weight_quantization=...)` for each granularity and report
.tflite bytes, the smallest working TFLM arena (tflite-micro's Python
interpreter, 64-bit host), the state precision the exporter chose, and the
accuracy of the int8 model on tflite-micro over the WHOLE test set vs the
float Keras model.
"""

import json
import pathlib
import sys

from common import parser, write_results  # noqa: E402  (first: quiet TensorFlow)

import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
import rnn_export  # noqa: E402

GRANULARITIES = ("per_channel", "per_tensor")


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--models", default="gru,lstm,fastgrnn,lowrank_gru,demo_lowrank_gru32")
    p.add_argument("--keras-dir", default=None, help="load <name>.keras from here instead of training")
    p.add_argument("--save-dir", default=None, help="save each trained model as <name>.keras here")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "rnn_weight_quantization.json"))
    a = p.parse_args(argv)
    data = tfs.datasets.mnist1d(num_samples=10000)
    (x, _), (x_test, y_test) = data
    rows = []
    for name in a.models.split(","):
        saved = pathlib.Path(a.keras_dir) / f"{name}.keras" if a.keras_dir else None
        if saved is not None and saved.exists():
            import keras

            model, train = keras.models.load_model(saved), {"model": name, "loaded": str(saved)}
        else:
            model, train = rnn_export.train(name, data, a)
            if a.save_dir:
                model.save(pathlib.Path(a.save_dir) / f"{name}.keras")
        float_acc = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))
        row = {"model": name, "train": train, "float_accuracy": float_acc, "variants": []}
        for granularity in GRANULARITIES:
            r = tfs.export.convert(model, target="tflm", representative_data=x[:100], recurrent="step",
                                   weight_quantization=granularity)
            acc = float(np.mean(np.argmax(r.run_sequence(x_test, runtime="tflm"), -1) == y_test))
            v = {"weight_quantization": granularity, "file_bytes": r.report.recurrent["file_bytes"],
                 "arena_bytes": r.report.tflm["arena_bytes"], "state_dtype": r.report.recurrent["state_dtype"],
                 "ops": sum(r.inspect().op_counts.values()), "tflm_accuracy": acc}
            row["variants"].append(v)
            print(name, json.dumps(v), flush=True)
        rows.append(row)
    out = {"args": vars(a), "rows": rows, "markdown": markdown(rows)}
    write_results(a.out, out)
    print(out["markdown"])


def markdown(rows):
    lines = ["| model | int8 weights | states | .tflite bytes | TFLM arena bytes (64-bit Python) | ops | "
             "float acc % | TFLM acc % (Δ) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v in r["variants"]:
            delta = 100 * (v["tflm_accuracy"] - r["float_accuracy"])
            lines.append(f"| {r['model']} | {v['weight_quantization'].replace('_', ' ')} | {v['state_dtype']} | "
                         f"{v['file_bytes']:,} | {v['arena_bytes']:,} | {v['ops']} | "
                         f"{100 * r['float_accuracy']:.2f} | {100 * v['tflm_accuracy']:.2f} ({delta:+.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
