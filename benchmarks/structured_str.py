"""Channel-STR over channel dependency groups on MNIST-1D residual / inverted-residual nets.

    python benchmarks/structured_str.py --seeds 3 --epochs 10
    python benchmarks/structured_str.py --nets mnist1d_resnet --out structured_str_resnet.json  # one net

Nets: `tfs.zoo.mnist1d_resnet` (residual adds) and `tfs.zoo.mnist1d_mobilenet`
(inverted residuals: depthwise convs, squeeze-excite, adds). Data: MNIST-1D,
10k samples (8k train / 2k test); 10% of the training set is cut off as the
validation split that training logs (nothing is selected on the test set; the
sparsity targets are fixed in advance, not tuned).

Per net and seed:
- dense: the zoo net with L2 5e-4, SGD-Nesterov 0.1 with cosine decay
  (`tf_sparsity.experiments.train_classifier`), `--epochs` epochs;
- channel-STR (groups): `tfs.soft_threshold(net, granularity="channel")`
  (channel groups on, the default), hard group mask (`shrink=False`,
  `learn_threshold=False`), coupled L2 5e-4, trained from scratch for the
  same epochs with `TargetSparsity(target)` after one warm-up epoch; then
  `tfs.strip` (dead groups removed with `prune_groups`). Reported: MACs of
  the stripped model / dense, its test accuracy, and the largest difference
  between the stripped and the thresholded model's logits on the test set;
- channel-STR (per layer): the same with `channel_groups=False` (each layer's
  output channels thresholded alone: the behaviour before channel groups);
- L1-norm at channel-STR's MACs: `tfs.pruning.l1_norm_prune(dense, flops=f)`
  with f = the groups row's MACs ratio, 300 imitation fine-tune steps.
"""

import time

from common import HERE, parser, run_and_report, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402


def evaluate(model, x, y):
    logits = np.asarray(model.predict(x, batch_size=512, verbose=0))
    return float(np.mean(np.argmax(logits, 1) == y)), logits


def channel_str(net, target, groups, train, val, epochs, flops=None):
    """Channel-STR trained from scratch, steered to weight sparsity `target` or, with `flops`, to that MACs fraction."""
    model = tfs.soft_threshold(getattr(tfs.zoo, net)(), granularity="channel", weight_decay=5e-4,
                               learn_threshold=False, shrink=False, channel_groups=groups)
    steps = int(np.ceil(len(train[0]) / 128))
    begin = tfs.recipes.STR_WARMUP_EPOCHS * steps
    steer = (tfs.callbacks.TargetSparsity(target, begin_step=begin) if flops is None else
             tfs.callbacks.TargetFlops(flops, begin_step=begin))
    start = time.perf_counter()
    result = train_classifier(model, train, val, epochs=epochs, callbacks=[steer])
    return model, time.perf_counter() - start, result["seconds_per_step"]


def run(a):
    (x, y), test = tfs.datasets.mnist1d(num_samples=10000)
    cut = int(0.9 * len(x))
    train, val = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    rows = []
    for net in a.nets:
        for seed in range(a.seeds):
            keras.utils.set_random_seed(seed)
            dense = getattr(tfs.zoo, net)(weight_decay=5e-4)
            start = time.perf_counter()
            info = train_classifier(dense, train, val, epochs=a.epochs)
            dense_flops = tfs.summary(dense, print_fn=None).flops
            acc, _ = evaluate(dense, *test)
            rows.append({"net": net, "seed": seed, "method": "dense", "target": None, "macs": 1.0,
                         "accuracy": acc, "seconds": time.perf_counter() - start,
                         "seconds_per_step": info["seconds_per_step"]})
            print(rows[-1], flush=True)
            for target in a.targets:
                for groups in (True, False):
                    keras.utils.set_random_seed(seed)
                    sparse, seconds, per_step = channel_str(net, target, groups, train, val, a.epochs)
                    small = tfs.strip(sparse)
                    acc, logits = evaluate(small, *test)
                    _, ref = evaluate(sparse, *test)
                    macs = tfs.summary(small, print_fn=None).flops / dense_flops
                    rows.append({"net": net, "seed": seed, "target": target, "macs": macs, "accuracy": acc,
                                 "method": "channel-STR (groups)" if groups else "channel-STR (per layer)",
                                 "sparsity": tfs.sparsity(sparse), "max_logit_diff": float(np.abs(logits - ref).max()),
                                 "seconds": seconds, "seconds_per_step": per_step})
                    print(rows[-1], flush=True)
                    if groups:
                        keras.utils.set_random_seed(seed)
                        l1 = tfs.pruning.l1_norm_prune(dense, flops=macs, data=train[0], finetune_steps=300,
                                                       seed=seed)
                        acc, _ = evaluate(l1, *test)
                        rows.append({"net": net, "seed": seed, "target": target, "method": "L1-norm at STR's MACs",
                                     "macs": tfs.summary(l1, print_fn=None).flops / dense_flops, "accuracy": acc})
                        print(rows[-1], flush=True)
    return rows


def table(rows):
    lines = ["| net | method | target sparsity | MACs / dense | accuracy % (mean ± std) | max logit diff, strip vs STR |",
             "|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        key = (r["net"], r["method"], r["target"])
        if key not in keys:
            keys.append(key)
    for net, method, target in keys:
        group = [r for r in rows if (r["net"], r["method"], r["target"]) == (net, method, target)]
        acc = 100 * np.array([r["accuracy"] for r in group])
        macs = np.array([r["macs"] for r in group])
        diff = max((r.get("max_logit_diff", 0.0) for r in group), default=0.0)
        lines.append(f"| {net} | {method} | {'-' if target is None else target} | "
                     f"{macs.mean():.3f} ± {macs.std():.3f} | {acc.mean():.2f} ± {acc.std():.2f} (n={len(group)}) | "
                     f"{diff:.1e} |" if method.startswith("channel-STR") else
                     f"| {net} | {method} | {'-' if target is None else target} | "
                     f"{macs.mean():.3f} ± {macs.std():.3f} | {acc.mean():.2f} ± {acc.std():.2f} (n={len(group)}) | - |")
    return lines


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5])
    p.add_argument("--nets", nargs="+", default=["mnist1d_resnet", "mnist1d_mobilenet"])
    p.add_argument("--out", default="structured_str.json", help="results file name in benchmarks/results")
    run_and_report(p.parse_args(), run, table)


if __name__ == "__main__":
    main()
