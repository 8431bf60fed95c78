"""Pruning at initialization: layer collapse on VGG-16-bn, SynFlow speed, MNIST-1D accuracy.

    python benchmarks/prune_at_init.py --part collapse     # critical compression per method (VGG-16-bn, 100 classes)
    python benchmarks/prune_at_init.py --part timing       # wall time of 100 SynFlow rounds on VGG-16-bn
    python benchmarks/prune_at_init.py --part accuracy --seeds 3 --epochs 20

No CIFAR here (no downloads): SNIP and GraSP score on scikit-learn's digits,
resized to 32x32x3 (real images, 10 of the 100 classes used). SynFlow,
magnitude and random need no data.
"""

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402

HERE = pathlib.Path(__file__).parent
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits_32(n=256):
    (x, y), _ = tfs.datasets.digits()
    x = tf.image.resize(x[:n], (32, 32)).numpy()
    return np.repeat(x, 3, axis=-1).astype("float32"), y[:n]


def collapse(a):
    rows = {}
    data = digits_32()
    for method in a.methods:
        keras.utils.set_random_seed(0)
        model = tfs.zoo.vgg16_bn()
        start = time.perf_counter()
        kwargs = {"data": data, "loss": LOSS} if method in ("snip", "grasp") else {}
        value = tfs.pruning.critical_compression(model, method, tolerance=a.tolerance, **kwargs)
        rows[method] = {"critical_log10": value, "seconds": time.perf_counter() - start}
        print(f"{method}: critical log10 compression {value:.2f} ({rows[method]['seconds']:.0f} s)", flush=True)
    return rows


def timing(a):
    model = tfs.zoo.vgg16_bn()
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        tfs.prune_at_init(model, "synflow", compression=10 ** 3, iterations=100, verbose=0)
        times.append(time.perf_counter() - start)
        print(f"100 SynFlow rounds incl. wrapping: {times[-1]:.1f} s", flush=True)
    return {"seconds": times, "median": float(np.median(times))}


def accuracy(a):
    train, test = tfs.datasets.mnist1d(num_samples=10000)
    rows = []
    for seed in range(a.seeds):
        for method in ["dense", *a.methods]:
            for compression in ([None] if method == "dense" else a.compressions):
                keras.utils.set_random_seed(seed)
                model = tfs.zoo.mnist1d_cnn()
                if method != "dense":
                    model = tfs.prune_at_init(model, method, compression=compression, data=(train[0][:256], train[1][:256]),
                                              loss=LOSS, seed=seed, verbose=0, on_collapse="ignore")
                result = train_classifier(model, train, test, epochs=a.epochs)
                report = tfs.summary(model, print_fn=None)
                rows.append({"method": method, "compression": compression, "seed": seed,
                             "accuracy": result["accuracy"], "sparsity": report.sparsity,
                             "collapsed": report.collapsed})
                print(f"seed {seed} {method} {compression}: {result['accuracy']:.4f} "
                      f"(sparsity {report.sparsity:.4f}, collapsed {report.collapsed})", flush=True)
    lines = ["| method | compression | accuracy (mean ± std) | collapsed layers |", "|---|---|---|---|"]
    for method in ["dense", *a.methods]:
        for compression in ([None] if method == "dense" else a.compressions):
            group = [r for r in rows if r["method"] == method and r["compression"] == compression]
            acc = np.array([r["accuracy"] for r in group]) * 100
            col = sorted({n for r in group for n in r["collapsed"]})
            lines.append(f"| {method} | {compression or 1}× | {acc.mean():.2f} ± {acc.std():.2f} (n={len(acc)}) | "
                         f"{', '.join(col) or '-'} |")
    print("\n".join(lines))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["collapse", "timing", "accuracy"], required=True)
    p.add_argument("--methods", nargs="+", default=list(tfs.pruning.METHODS))
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--compressions", type=float, nargs="+", default=[10, 100])
    p.add_argument("--out", help="result file (default benchmarks/results/prune_at_init_<part>.json)")
    a = p.parse_args()
    result = {"collapse": collapse, "timing": timing, "accuracy": accuracy}[a.part](a)
    out = pathlib.Path(a.out) if a.out else HERE / "results" / f"prune_at_init_{a.part}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "result": result}, indent=1))


if __name__ == "__main__":
    main()
