"""Greedy selection speed: `objective="loss"` against an older tree, and both modes on
keras.applications.

    git archive 38f0630 | (mkdir -p /tmp/old && tar -x -C /tmp/old)     # the reference tree
    python benchmarks/greedy_speed.py --zoo --reference /tmp/old --samples 1000 --repeats 2
    python benchmarks/greedy_speed.py --per-group --reference /tmp/old --apps MobileNetV2
    python benchmarks/greedy_speed.py --apps MobileNetV2 --modes reconstruction loss

`--zoo`: `tfs.pruning.greedy_loss` on `tfs.zoo.mnist1d_resnet` /
`mnist1d_mobilenet` (untrained, MNIST-1D inputs and labels, `flops=0.5`,
`accuracy_fraction=None`, `--candidates`, batch `--batch`), each run in its
own process with PYTHONPATH on `--reference` and on this tree, alternating,
`--repeats` times (median seconds of the `greedy_loss` call). The selected
units of every run are compared.

`--per-group`: for every channel group of the `--apps` nets (unpruned,
`--batch` standard-normal inputs, half the group's units selected), the
milliseconds per candidate of the reference's loop (one candidate at a time:
consumer kernels assigned, the compiled tail, float64 loss) and of this
tree's (candidates batched in one compiled call), interleaved in one
process; the estimated selection time is the group's budget units x
`--candidates` x ms per candidate.

`--apps`: keras.applications nets, `weights=None`, `--size` square
inputs, 10 classes, `--samples` standard-normal inputs (no labels: the loss
mode is the global variant, against the original model's output), greedy at
`--flops`: "reconstruction" is `greedy_prune(objective="reconstruction",
tolerance=0.0, batch_size=samples)` ("reconstruction-global": with
`allocation="global"`), "loss" is `greedy_prune(objective="loss",
accuracy_fraction=None, candidates=--candidates, batch_size=--batch)`.
Wall time, CPU time, load average, MACs reached (stripped model / dense),
units kept.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

if os.environ.get("GREEDY_SPEED_TREE"):  # a --zoo worker: the tree under test before this checkout
    sys.path.insert(0, os.environ["GREEDY_SPEED_TREE"])

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402

greedy_loss_module = importlib.import_module("tf_sparsity.pruning.greedy_loss")


def zoo_worker(a):
    """One `greedy_loss` run with the `tf_sparsity` on PYTHONPATH; one JSON line to stdout."""
    (x, y), _ = tfs.datasets.mnist1d(num_samples=2000)
    x, y = x[:a.samples], y[:a.samples]
    keras.utils.set_random_seed(0)
    model = getattr(tfs.zoo, a.zoo_worker)()
    dense = tfs.summary(model, print_fn=None).flops
    load, cpu, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
    small, report = greedy_loss_module.greedy_loss(model, x, y, flops=a.flops, accuracy_fraction=None,
                                                   candidates=a.candidates, batch_size=a.batch, seed=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu seconds": cpu, "load average (start, end)": [load, os.getloadavg()[0]],
                      "macs": tfs.summary(small, print_fn=None).flops / dense, "tf_sparsity": tfs.__file__,
                      "units": {g: [int(u) for u in r["units"]] for g, r in report.items()}}))


def zoo(a):
    """The zoo nets with `--reference` (an older tf_sparsity tree) and this one, interleaved."""
    rows = []
    trees = {"reference": str(pathlib.Path(a.reference).resolve()), "this tree": str(HERE.parent.resolve())}
    for net in a.zoo_nets:
        runs = {name: [] for name in trees}
        for _ in range(a.repeats):
            for name, tree in trees.items():
                cmd = [sys.executable, __file__, "--zoo-worker", net, "--samples", str(a.samples), "--flops",
                       str(a.flops), "--candidates", str(a.candidates), "--batch", str(a.batch)]
                done = subprocess.run(cmd, env=dict(os.environ, GREEDY_SPEED_TREE=tree), capture_output=True, text=True,
                                      cwd=HERE, check=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(net, name, {k: v for k, v in runs[name][-1].items() if k != "units"}, flush=True)
        units = [r["units"] for rs in runs.values() for r in rs]
        seconds = {name: float(np.median([r["seconds"] for r in rs])) for name, rs in runs.items()}
        rows.append({"net": net, "reference": a.reference, "seconds (median)": seconds,
                     "speed-up": seconds["reference"] / seconds["this tree"], "same selection": all(u == units[0] for u in units),
                     "macs": runs["this tree"][0]["macs"], "runs": runs})
        print({k: v for k, v in rows[-1].items() if k != "runs"}, flush=True)
    return rows


def per_group(a):
    """Per group of `--apps`: ms per candidate of `--reference`'s `greedy_loss.py` (one candidate at a
    time, kernels assigned) and of this one (batched), interleaved in one process, on the unpruned
    network; estimated selection time = budget units x candidates x ms per candidate."""
    spec = importlib.util.spec_from_file_location(
        "greedy_loss_reference", pathlib.Path(a.reference) / "tf_sparsity" / "pruning" / "greedy_loss.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    rows = []
    for name in a.apps:
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, input_shape=(a.size, a.size, 3), classes=10,
                                                  classifier_activation=None)
        x = np.random.default_rng(0).normal(size=(a.batch, a.size, a.size, 3)).astype("float32")
        targets, logits = greedy_loss_module._targets(model, x, None, None, a.batch)
        current = tfs.surgery.prune_groups(model, {})
        groups = tfs.surgery.channel_groups(current)
        zeros = {g: np.zeros(group.size) for g, group in groups.prunable().items()}
        caps = {g: len(k) for g, k in tfs.surgery.keep_for_budget(groups, zeros, flops=a.flops).items()}
        macs = {r.name: r.flops or 0 for r in tfs.summary(current, print_fn=None).layers}
        order = [node.operation.name for node in tfs._compat.graph_nodes(current)[2]]
        for g, group in groups.prunable().items():
            n = group.size
            new_mask, old_mask = greedy_loss_module._GroupMask(groups, group), old._GroupMask(groups, group)
            consumers = [layer for layer, _, _ in old_mask.consumers]
            first = min(order.index(layer.name) for layer in consumers)
            tail_macs = sum(macs.get(layer, 0) for layer in order[first:])
            selected = min(n // 2, n - a.candidates)  # mid-selection: half the units chosen
            tried = np.zeros((min(a.candidates, n), n))
            tried[:, :max(selected, 0)] = n / (max(selected, 0) + 1)
            tried[np.arange(len(tried)), n - 1 - np.arange(len(tried))] = n / (max(selected, 0) + 1)
            old_head, old_tail = old._split(current, consumers)
            head, evaluate = greedy_loss_module._split(current, new_mask)

            def run_old():
                below = old_head(x)
                for row in tried:
                    old_mask.set(row)
                    old._loss_and_hits(old_tail(below), targets, logits)
                old_mask.restore()

            def run_new():
                below = head(x)
                for out in evaluate(below, tried):
                    greedy_loss_module._loss_and_hits(out, targets, logits)

            times = {"reference": [], "this tree": []}
            run_old(), run_new()  # trace
            for _ in range(a.repeats):
                for variant, run in (("reference", run_old), ("this tree", run_new)):
                    start = time.perf_counter()
                    run()
                    times[variant].append((time.perf_counter() - start) / len(tried))
            ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
            rows.append({"net": name, "group": g, "units": n, "budget units": caps[g],
                         "consumers": len(consumers), "tail MACs per sample": int(tail_macs),
                         "ms per candidate": ms,
                         "estimated seconds": {k: caps[g] * a.candidates * v / 1e3 for k, v in ms.items()}})
            print(rows[-1], flush=True)
        total = {k: sum(r["estimated seconds"][k] for r in rows if r["net"] == name) for k in ("reference", "this tree")}
        rows.append({"net": name, "group": "total", "estimated seconds": total,
                     "speed-up": total["reference"] / total["this tree"], "load average": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def apps(a):
    rows = []
    for name in a.apps:
        for mode in a.modes:
            keras.utils.set_random_seed(0)
            model = getattr(keras.applications, name)(weights=None, input_shape=(a.size, a.size, 3), classes=10,
                                                      classifier_activation=None)
            dense = tfs.summary(model, print_fn=None).flops
            x = np.random.default_rng(0).normal(size=(a.samples, a.size, a.size, 3)).astype("float32")
            load, cpu, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
            if mode.startswith("reconstruction"):  # "reconstruction" or "reconstruction-global"
                small, report = tfs.greedy_prune(model, x, objective="reconstruction", flops=a.flops, tolerance=0.0,
                                                 batch_size=a.samples, verbose=0, return_report=True,
                                                 allocation="global" if mode.endswith("global") else "uniform")
            else:
                small, report = tfs.greedy_prune(model, x, objective="loss", flops=a.flops, accuracy_fraction=None,
                                                 candidates=a.candidates, batch_size=a.batch, verbose=a.verbose,
                                                 return_report=True)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            rows.append({"net": name, "mode": mode, "flops": a.flops, "size": a.size, "samples": a.samples,
                         "candidates": a.candidates if mode == "loss" else None,
                         "batch": a.batch if mode == "loss" else a.samples,
                         "macs": tfs.summary(small, print_fn=None).flops / dense, "seconds": seconds,
                         "cpu seconds": cpu, "load average (start, end)": [load, os.getloadavg()[0]],
                         "units kept": int(sum(r["kept"] for r in report.values() if "kept" in r)),
                         "units": int(sum(r["total"] for r in report.values() if "total" in r))})
            print(rows[-1], flush=True)
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--zoo", action="store_true")
    p.add_argument("--zoo-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--per-group", action="store_true")
    p.add_argument("--reference", default=None, help="an older tf_sparsity tree (`git archive`) for --zoo / --per-group")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--zoo-nets", nargs="+", default=["mnist1d_resnet", "mnist1d_mobilenet"])
    p.add_argument("--apps", nargs="*", default=[])
    p.add_argument("--modes", nargs="+", default=["reconstruction", "loss"])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--verbose", type=int, default=0)
    p.add_argument("--out", default="greedy_speed.json", help="results file name in benchmarks/results")
    a = p.parse_args()
    if a.zoo_worker:
        return zoo_worker(a)
    if (a.zoo or a.per_group) and not a.reference:
        p.error("--zoo and --per-group need --reference (e.g. `git archive 38f0630 | tar -x -C /tmp/old`).")
    rows = (zoo(a) if a.zoo else []) + (per_group(a) if a.per_group else apps(a))
    write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
