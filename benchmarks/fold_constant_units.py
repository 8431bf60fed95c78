"""Units constant on the calibration data, folded before int8 export (issue 15).

    python benchmarks/fold_constant_units.py --stage train --dense-dir <dir> --models-dir <dir>
    python benchmarks/fold_constant_units.py --stage export --models-dir <dir>

`train`: the issue-15 group recipe (`structured.py --groups`: MNIST-1D with
`--samples` 4000, dense `--epochs` 10 SGD-Nesterov 0.1 cosine L2 5e-4 on the
training split minus 10% validation, saved / reused in `--dense-dir`), then
`l1_norm_prune(allocation="global")` at each `--budgets`, fine-tuned
`--finetune-epochs` 8 at `--finetune-lr` 0.03, saved to `--models-dir`.
`export`: every saved pruned model through `tfs.export.convert(target=
"litert", quantize="int8", representative_data=x_train[:256])` with
`fold_constant_units=False` (the behaviour before) and True (the default):
the error or the units folded, and the test accuracy of Keras float, the
folded Keras float model, and LiteRT int8 (XNNPack) on the whole test split.
"""

import pathlib

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from structured import evaluate, group_data  # noqa: E402


def train_stage(a):
    train, val, test = group_data(a)
    for seed in range(a.seed_start, a.seed_start + a.seeds):
        keras.utils.set_random_seed(seed)
        path = pathlib.Path(a.dense_dir) / f"{a.net}_s{seed}_e{a.epochs}.keras"
        if path.exists():
            dense = keras.models.load_model(path)
        else:
            dense = getattr(tfs.zoo, a.net)(weight_decay=5e-4)
            train_classifier(dense, train, val, epochs=a.epochs)
            path.parent.mkdir(parents=True, exist_ok=True)
            dense.save(path)
        print(f"{a.net} seed {seed} dense test {evaluate(dense, test):.4f}", flush=True)
        for budget in a.budgets:
            keras.utils.set_random_seed(seed)
            small = tfs.pruning.l1_norm_prune(dense, flops=budget, allocation="global")
            train_classifier(small, train, val, epochs=a.finetune_epochs, learning_rate=a.finetune_lr)
            out = pathlib.Path(a.models_dir) / f"{a.net}_s{seed}_l1global_{budget}.keras"
            out.parent.mkdir(parents=True, exist_ok=True)
            small.save(out)
            print(f"  l1 global @{budget}: test {evaluate(small, test):.4f} -> {out}", flush=True)


def litert_accuracy(tflite, x, y):
    from tf_sparsity.export import runtimes

    interpreter = runtimes.litert_interpreter(tflite)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    (s_in, z_in), (s_out, z_out) = runtimes.io_params(inp), runtimes.io_params(out)
    hits = 0
    for xi, yi in zip(x, y):
        q = np.clip(np.round(xi / s_in + z_in), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q.reshape(inp["shape"]))
        interpreter.invoke()
        logits = (interpreter.get_tensor(out["index"]).astype(np.float32) - z_out) * s_out
        hits += int(np.argmax(logits) == yi)
    return hits / len(y)


def export_stage(a):
    from tf_sparsity.surgery import fold_constant_units

    (x, _), _, (x_test, y_test) = group_data(a)
    rows = []
    for path in sorted(pathlib.Path(a.models_dir).glob(f"{a.net}_s*_l1global_*.keras")):
        model = keras.models.load_model(path)
        row = {"model": path.name, "keras_float": evaluate(model, (x_test, y_test))}
        calibration = x[:256]
        try:
            tfs.export.convert(model, quantize="int8", representative_data=calibration, fold_constant_units=False)
            row["before"] = "converts"
        except tfs.export.ExportError as error:
            row["before"] = f"{type(error).__name__}: {str(error)[:400]}"
        folded, report = fold_constant_units(model, calibration)
        row["folded_keras_float"] = evaluate(folded, (x_test, y_test))
        row["max_abs_diff_on_calibration"] = float(np.max(np.abs(
            folded.predict(calibration, verbose=0) - model.predict(calibration, verbose=0))))
        try:
            r = tfs.export.convert(model, quantize="int8", representative_data=calibration)
            row["after"] = "converts"
            row["folded"] = r.report.folded
            row["litert_int8"] = litert_accuracy(r.tflite, x_test, y_test)
            row["verification"] = r.report.verification
        except tfs.export.ExportError as error:
            row["after"] = f"{type(error).__name__}: {str(error)[:400]}"
        print(row, flush=True)
        rows.append(row)
        write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows})


def main():
    p = parser(__doc__)
    p.add_argument("--stage", choices=["train", "export"], required=True)
    p.add_argument("--net", default="mnist1d_mobilenet")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--finetune-epochs", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=0.03)
    p.add_argument("--dense-dir", default="/tmp/tfs_dense")
    p.add_argument("--models-dir", default="/tmp/tfs_fold_models")
    p.add_argument("--out", default="fold_constant_units.json")
    a = p.parse_args()
    (train_stage if a.stage == "train" else export_stage)(a)


if __name__ == "__main__":
    main()
