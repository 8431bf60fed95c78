"""STR (with TargetSparsity) vs tfmot magnitude pruning on the MNIST-1D 1-D CNN.

    python benchmarks/str_vs_tfmot.py --seeds 3 --epochs 20 --out benchmarks/results/str_vs_tfmot.json

Same network, data, epochs, optimizer (SGD-Nesterov 0.1, cosine decay, batch
128) and coupled L2 5e-4 for every run. tfmot runs in its own process with
tf_keras (the `baseline` extra). Step time is reported as a ratio to the
dense run of the same seed, measured in the same invocation.
"""

import os
import pathlib
import tempfile

from common import BASELINE_PYTHON, HERE, parser, write_results, run_tfmot_worker  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402



def run_keras(kind, target, seed, data, a):
    keras.utils.set_random_seed(seed)
    if kind == "dense":
        model = tfs.zoo.mnist1d_cnn(weight_decay=a.weight_decay)
        callbacks = []
    else:
        model = tfs.soft_threshold(
            tfs.zoo.mnist1d_cnn(), s_init=a.s_init, weight_decay=a.weight_decay,
            learn_threshold=(kind == "str-learned"))
        callbacks = [tfs.callbacks.TargetSparsity(target, end_fraction=a.end_fraction)]
    result = train_classifier(model, *data, epochs=a.epochs, callbacks=callbacks)
    result["sparsity"] = tfs.sparsity(model)
    report = tfs.summary(model, print_fn=None)
    result["layer_sparsity"] = {r.name: r.sparsity for r in report.layers if r.prunable}
    del result["history"]
    return result


def run_tfmot(target, seed, npz, a):
    return run_tfmot_worker("--data", npz, "--sparsity", target, "--seed", seed, "--epochs", a.epochs,
                            "--weight-decay", a.weight_decay, "--end-fraction", a.end_fraction)


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--s-init", type=float, default=-5.0)
    p.add_argument("--end-fraction", type=float, default=0.7)
    p.add_argument("--no-tfmot", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "str_vs_tfmot.json"))
    a = p.parse_args()
    train, test = tfs.datasets.mnist1d(num_samples=a.samples)
    data = (train, test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "data.npz")
        np.savez(npz, x=train[0], y=train[1], x_test=test[0], y_test=test[1])
        for seed in range(a.seeds):
            dense = run_keras("dense", None, seed, data, a)
            rows.append(dict(method="dense", target=0.0, seed=seed, **dense, step_ratio=1.0))
            print(f"seed {seed} dense acc {dense['accuracy']:.4f}", flush=True)
            for target in a.targets:
                for kind in ("str-global", "str-learned"):
                    r = run_keras(kind, target, seed, data, a)
                    rows.append(dict(method=kind, target=target, seed=seed, **r,
                                     step_ratio=r["seconds_per_step"] / dense["seconds_per_step"]))
                    print(f"seed {seed} {kind} {target} acc {r['accuracy']:.4f} sp {r['sparsity']:.4f} "
                          f"ratio {rows[-1]['step_ratio']:.2f}", flush=True)
                if not a.no_tfmot:
                    r = run_tfmot(target, seed, npz, a)
                    rows.append(dict(method="tfmot", target=target, seed=seed, **r))
                    print(f"seed {seed} tfmot {target} acc {r['accuracy']:.4f} sp {r['sparsity']:.4f}", flush=True)
    # tfmot's step ratio uses a tf_keras dense run time measured by its worker
    # would need its own dense: report tfmot step time relative to our dense.
    for row in rows:
        if row["method"] == "tfmot":
            dense = next(r for r in rows if r["method"] == "dense" and r["seed"] == row["seed"])
            row["step_ratio"] = row["seconds_per_step"] / dense["seconds_per_step"]
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, {"args": vars(a), "rows": rows})
    print(table(rows))


def table(rows):
    lines = ["| method | target | accuracy (mean ± std) | reached sparsity | step time / dense |",
             "|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["target"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for method, target in keys:
        group = [r for r in rows if (r["method"], r["target"]) == (method, target)]
        acc = np.array([r["accuracy"] for r in group]) * 100
        sp = np.mean([r.get("sparsity", 0.0) for r in group]) * 100
        ratio = np.median([r["step_ratio"] for r in group])
        lines.append(f"| {method} | {target:.2f} | {acc.mean():.2f} ± {acc.std():.2f} (n={len(acc)}) | "
                     f"{sp:.2f}% | {ratio:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
