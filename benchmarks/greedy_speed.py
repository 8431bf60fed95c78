"""Greedy selection speed: `objective="loss"` reusing the activations below a group, and
both modes on keras.applications.

    python benchmarks/greedy_speed.py --zoo                          # old vs new loss path, zoo nets
    python benchmarks/greedy_speed.py --apps MobileNetV2 --modes reconstruction loss

`--zoo`: `tfs.pruning.greedy_loss` on `tfs.zoo.mnist1d_resnet` /
`mnist1d_mobilenet` (untrained, MNIST-1D inputs and labels, `flops=0.5`,
`accuracy_fraction=None`, `--candidates`, batch 128) run twice in the same
process: as shipped (each minibatch runs the layers below the group's
consumers once, each candidate only the layers from the earliest consumer
on) and with the whole network per candidate (the code before; `_split`
replaced by the full forward pass). The selected units are compared.

`--apps`: keras.applications nets, `weights=None`, `--size` square
inputs, 10 classes, `--samples` standard-normal inputs (no labels: the loss
mode is the global variant, against the original model's output), greedy at
`--flops`: "reconstruction" is `greedy_prune(objective="reconstruction",
tolerance=0.0, batch_size=samples)`, "loss" is `greedy_prune(objective="loss",
accuracy_fraction=None, candidates=--candidates, batch_size=--batch)`.
Wall time, MACs reached (stripped model / dense).
"""

import importlib
import time

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402

greedy_loss_module = importlib.import_module("tf_sparsity.pruning.greedy_loss")


def whole_network(model, consumers):
    """The path before `_split`: every candidate runs the whole network."""
    return (lambda inputs: inputs), greedy_loss_module._forward(model)


def zoo(a):
    (x, y), _ = tfs.datasets.mnist1d(num_samples=2000)
    x, y = x[:a.samples], y[:a.samples]
    rows = []
    for net in a.zoo_nets:
        keras.utils.set_random_seed(0)
        model = getattr(tfs.zoo, net)()
        dense = tfs.summary(model, print_fn=None).flops
        times, reports, macs = {}, {}, {}
        for variant in ("whole network per candidate", "below the group once"):
            split = whole_network if variant.startswith("whole") else SPLIT
            greedy_loss_module._split = split
            start = time.perf_counter()
            small, reports[variant] = greedy_loss_module.greedy_loss(
                model, x, y, flops=a.flops, accuracy_fraction=None, candidates=a.candidates,
                batch_size=a.batch, seed=0)
            times[variant] = time.perf_counter() - start
            macs[variant] = tfs.summary(small, print_fn=None).flops / dense
        greedy_loss_module._split = SPLIT
        same = all(np.array_equal(reports["whole network per candidate"][g]["units"],
                                  reports["below the group once"][g]["units"]) for g in reports["below the group once"])
        rows.append({"net": net, "seconds": times, "macs": macs, "same selection": bool(same),
                     "speed-up": times["whole network per candidate"] / times["below the group once"]})
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
            start = time.perf_counter()
            if mode == "reconstruction":
                small = tfs.greedy_prune(model, x, objective="reconstruction", flops=a.flops, tolerance=0.0,
                                         batch_size=a.samples, verbose=0)
            else:
                small = tfs.greedy_prune(model, x, objective="loss", flops=a.flops, accuracy_fraction=None,
                                         candidates=a.candidates, batch_size=a.batch, verbose=a.verbose)
            seconds = time.perf_counter() - start
            rows.append({"net": name, "mode": mode, "flops": a.flops, "size": a.size, "samples": a.samples,
                         "candidates": a.candidates if mode == "loss" else None,
                         "batch": a.batch if mode == "loss" else a.samples,
                         "macs": tfs.summary(small, print_fn=None).flops / dense, "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--zoo", action="store_true")
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
    rows = (zoo(a) if a.zoo else []) + apps(a)
    write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows})


SPLIT = greedy_loss_module._split

if __name__ == "__main__":
    main()
