"""Pruning at initialization: layer collapse on VGG-16-bn, SynFlow speed, MNIST-1D accuracy.

    python benchmarks/prune_at_init.py --part collapse     # critical compression per method (VGG-16-bn, 100 classes)
    python benchmarks/prune_at_init.py --part timing       # wall time of 100 SynFlow rounds on VGG-16-bn
    python benchmarks/prune_at_init.py --part accuracy --seeds 3 --epochs 20
    python benchmarks/prune_at_init.py --part apps          # keras.applications + VGG: collapse on a grid, both definitions
    python benchmarks/prune_at_init.py --part apps-timing   # wall time of 100 SynFlow rounds per network
    python benchmarks/prune_at_init.py --part apps-critical --networks ResNet50  # bisection, 100 rounds

No CIFAR here (no downloads): SNIP and GraSP score on scikit-learn's digits,
resized to 32x32x3 (real images, 10 of the 100 classes used). SynFlow,
magnitude and random need no data.
"""

import argparse
import os
import pathlib
import time

from common import write_results  # noqa: E402  (first: quiet TensorFlow, results with the environment)

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


APPS = ("vgg16_bn", "ResNet50", "MobileNetV2", "EfficientNetB0")


def app_model(name):
    """keras.applications network (weights=None, 32x32x3, 100 classes, default softmax head) or the zoo VGG."""
    keras.utils.set_random_seed(0)
    if name == "vgg16_bn":
        return tfs.zoo.vgg16_bn()
    return getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=100)


def _method_pruners(a, data):
    """(network, method, pruner, start time) for every network and method of `a`.

    One masked model per network, shared by its methods' pruners (each
    starts from `reset()`); the one-shot methods score once and every
    later `prune` thresholds those cached scores.
    """
    from tf_sparsity.pruning.at_init import _Pruner

    for name in a.networks:
        masked = tfs.surgery.wrap_prunable(app_model(name), tfs.layers.Masked)
        loss = LOSS if name == "vgg16_bn" else keras.losses.SparseCategoricalCrossentropy()
        for method in a.methods:
            start = time.perf_counter()
            pruner = _Pruner(masked, method, data if method in ("snip", "grasp") else None, loss, 0)
            pruner.reset()
            if method != "synflow":
                cached = [tf.convert_to_tensor(s) for s in pruner.scores()]
                pruner.scores = lambda fast=False, cached=cached: cached
            yield name, method, pruner, start


def apps(a):
    """Collapse of every method on a log10-compression grid: connectivity and per-layer definitions.

    One pruner per network and method; SynFlow runs `--sweep-iterations`
    rounds per grid point; the one-shot methods score once and threshold
    those scores at every point. The critical compression on the grid is the
    largest point below the first collapsed one.
    """
    data = digits_32(a.data_size)
    grid = [round(1 + 0.5 * i, 2) for i in range(int(round((a.max_log10 - 1) / 0.5)) + 1)]
    rows = {}
    for name, method, pruner, start in _method_pruners(a, data):
        rows.setdefault(name, {})
        points = []
        for log10 in grid:
            pruner.reset()
            iterations = a.sweep_iterations if method == "synflow" else 1
            empty = pruner.prune(10.0 ** -log10, iterations, "exponential", "global", "partition", 0)
            report = pruner.connectivity()
            points.append({"log10": log10, "connected": report.connected, "empty": empty,
                           "cuts": report.cuts, "emptied_branches": len(report.emptied_branches)})
            print(f"{name} {method} 10^{log10}: connected {report.connected}, {len(empty)} empty "
                  f"({len(report.emptied_branches)} branches, cuts {report.cuts[:3]})", flush=True)

        def critical(bad):
            ok = [p["log10"] for p in points[:next((i for i, p in enumerate(points) if bad(p)), len(points))]]
            return ok[-1] if ok else 0.0

        rows[name][method] = {
            "critical_connectivity": critical(lambda p: not p["connected"]),
            "critical_layer": critical(lambda p: bool(p["empty"])),
            "seconds": time.perf_counter() - start, "points": points}
        print(f"{name} {method}: critical 10^{rows[name][method]['critical_connectivity']} (connectivity), "
              f"10^{rows[name][method]['critical_layer']} (per layer), "
              f"{rows[name][method]['seconds']:.0f} s", flush=True)
    return rows


def apps_critical(a):
    """Critical compression by bisection on log10 C (connectivity definition; the per-layer one
    bisected alongside on the same points where it decides), SynFlow at `--sweep-iterations` rounds.

    Stops a network at `--budget-seconds` and reports the bracket [lo, hi] reached; results are
    written after every bisection step (partial runs keep what they measured).
    """
    data = digits_32(a.data_size)
    rows = {}
    out = pathlib.Path(a.out) if a.out else HERE / "results" / "prune_at_init_apps_critical.json"
    for name, method, pruner, start in _method_pruners(a, data):
        rows.setdefault(name, {})
        total = sum(int(np.prod(k.shape)) for k in pruner.kernels)
        lo, hi = 0.0, float(np.log10(total))
        points = []
        row = {"lo": lo, "hi": hi, "points": points, "rounds": a.sweep_iterations if method == "synflow" else 1,
               "done": False}
        rows[name][method] = row
        while hi - lo > a.tolerance:
            if time.perf_counter() - start > a.budget_seconds:
                break
            mid = 0.5 * (lo + hi)
            pruner.reset()
            t = time.perf_counter()
            empty = pruner.prune(10.0 ** -mid, row["rounds"], "exponential", "global", "partition", 0)
            report = pruner.connectivity()
            points.append({"log10": mid, "connected": report.connected, "empty": empty, "cuts": report.cuts,
                           "emptied_branches": len(report.emptied_branches),
                           "seconds": time.perf_counter() - t})
            lo, hi = (lo, mid) if report.collapsed else (mid, hi)
            row.update(lo=lo, hi=hi, seconds=time.perf_counter() - start)
            print(f"{name} {method} 10^{mid:.3f}: connected {report.connected}, {len(empty)} empty "
                  f"-> bracket [{lo:.3f}, {hi:.3f}] ({time.perf_counter() - t:.0f} s)", flush=True)
            write_results(out, {"args": vars(a), "result": rows})
        row["done"] = hi - lo <= a.tolerance
        # per-layer definition on the measured points: largest point with no empty layer
        # below the smallest point with one (bisection was driven by connectivity).
        bad = [p["log10"] for p in points if p["empty"]]
        row["per_layer_ok_below"] = max([p["log10"] for p in points if not p["empty"]
                                         and p["log10"] < min(bad, default=99)], default=0.0)
        row["per_layer_first_empty"] = min(bad, default=None)
        print(f"{name} {method}: critical log10 in [{lo:.3f}, {hi:.3f}] ({row['seconds'] if points else 0:.0f} s)",
              flush=True)
    return rows


def apps_timing(a):
    rows = {}
    for name in a.networks:
        model = app_model(name)
        times, cpu, loads = [], [], []
        for _ in range(a.repeats):
            loads.append(os.getloadavg()[0])
            start, start_cpu = time.perf_counter(), time.process_time()
            tfs.prune_at_init(model, "synflow", compression=a.timing_compression, iterations=100, verbose=0,
                              on_collapse="ignore")
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            print(f"{name}: 100 SynFlow rounds incl. wrapping {times[-1]:.1f} s wall, {cpu[-1]:.1f} s CPU "
                  f"(load {loads[-1]:.1f})", flush=True)
        rows[name] = {"seconds": times, "median": float(np.median(times)), "cpu_seconds": cpu,
                      "median_cpu": float(np.median(cpu)), "load_1min": loads}
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["collapse", "timing", "accuracy", "apps", "apps-timing", "apps-critical"], required=True)
    p.add_argument("--networks", nargs="+", default=list(APPS))
    p.add_argument("--max-log10", type=float, default=4.0, help="apps: grid 10^1 .. 10^max by half-decades")
    p.add_argument("--sweep-iterations", type=int, default=100, help="apps: SynFlow rounds per grid point")
    p.add_argument("--data-size", type=int, default=256, help="apps: digits images SNIP/GraSP score on")
    p.add_argument("--budget-seconds", type=float, default=float("inf"),
                   help="apps-critical: stop bisecting a network/method after this long")
    p.add_argument("--timing-compression", type=float, default=100.0)
    p.add_argument("--methods", nargs="+", default=list(tfs.pruning.METHODS))
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--compressions", type=float, nargs="+", default=[10, 100])
    p.add_argument("--out", help="result file (default benchmarks/results/prune_at_init_<part>.json)")
    a = p.parse_args()
    result = {"collapse": collapse, "timing": timing, "accuracy": accuracy, "apps": apps,
              "apps-timing": apps_timing, "apps-critical": apps_critical}[a.part](a)
    out = pathlib.Path(a.out) if a.out else HERE / "results" / f"prune_at_init_{a.part.replace('-', '_')}.json"
    out.parent.mkdir(exist_ok=True)
    write_results(out, {"args": vars(a), "result": result})


if __name__ == "__main__":
    main()
