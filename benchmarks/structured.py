"""Structured pruning on the MNIST-1D CNN at equal FLOPs: channel-STR vs greedy vs L1 vs random.

    python benchmarks/structured.py --seeds 3 --epochs 20

Per seed: train the dense CNN (SGD-Nesterov 0.1, cosine, 20 epochs, L2 5e-4).
Channel-STR trains from scratch with `granularity="channel"` and
`TargetSparsity(--channel-target)`; `tfs.strip` removes the zeroed filters and
its MACs ratio f sets the budget of the others: greedy (local / global with
Taylor ranking / auto), L1-norm and random channel selection prune the dense
model to `flops=f`, each followed by the same imitation fine-tune
(`--finetune-steps` Adam steps on the dense model's outputs).
"""

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity import surgery  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
from tf_sparsity.pruning.greedy import _budgets, _imitate  # noqa: E402

HERE = pathlib.Path(__file__).parent


def evaluate(model, test):
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return float(model.evaluate(*test, verbose=0, batch_size=512)[1])


def random_channels(model, flops, x, steps, seed):
    chains, _ = surgery.channel_chains(model)
    budgets = _budgets(model, chains, None, flops)
    rng = np.random.default_rng(seed)
    keep = {n: np.sort(rng.choice(c.width, budgets[n], replace=False)) for n, c in chains.items()}
    pruned = surgery.prune_channels(model, keep)
    if steps:
        _imitate(pruned, model, x, steps, 256, seed)
    return pruned


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--channel-target", type=float, default=0.6)
    p.add_argument("--finetune-steps", type=int, default=300)
    a = p.parse_args()
    train, test = tfs.datasets.mnist1d(num_samples=10000)
    x = train[0]
    rows = []
    for seed in range(a.seeds):
        keras.utils.set_random_seed(seed)
        dense = tfs.zoo.mnist1d_cnn(weight_decay=5e-4)
        train_classifier(dense, train, test, epochs=a.epochs)
        dense_flops = tfs.summary(dense, print_fn=None).flops
        rows.append({"method": "dense", "seed": seed, "accuracy": evaluate(dense, test), "flops": 1.0, "seconds": 0})
        keras.utils.set_random_seed(seed)
        str_model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn(), granularity="channel", weight_decay=5e-4,
                                       learn_threshold=False, skip=["logits"])
        start = time.perf_counter()
        train_classifier(str_model, train, test, epochs=a.epochs,
                         callbacks=[tfs.callbacks.TargetSparsity(a.channel_target)])
        small = tfs.strip(str_model)
        f = tfs.summary(small, print_fn=None).flops / dense_flops
        rows.append({"method": "channel-str", "seed": seed, "accuracy": evaluate(small, test), "flops": f,
                     "seconds": time.perf_counter() - start})
        candidates = [
            ("greedy-local", lambda: tfs.greedy_prune(dense, x, objective="local", flops=f, batch_size=512,
                                                      finetune_steps=a.finetune_steps, verbose=0, seed=seed)),
            ("greedy-global", lambda: tfs.greedy_prune(dense, x, objective="global", flops=f, batch_size=512,
                                                       candidates=16, taylor=True, finetune_steps=a.finetune_steps,
                                                       verbose=0, seed=seed)),
            ("greedy-auto", lambda: tfs.greedy_prune(dense, x, objective="auto", flops=f, batch_size=512,
                                                     candidates=16, taylor=True, finetune_steps=a.finetune_steps,
                                                     verbose=0, seed=seed)),
            ("greedy-local (no fine-tune)", lambda: tfs.greedy_prune(dense, x, objective="local", flops=f,
                                                                     batch_size=512, verbose=0, seed=seed)),
            ("l1-norm", lambda: tfs.pruning.l1_norm_prune(dense, flops=f, data=x, finetune_steps=a.finetune_steps,
                                                          seed=seed)),
            ("l1-norm (no fine-tune)", lambda: tfs.pruning.l1_norm_prune(dense, flops=f)),
            ("random", lambda: random_channels(dense, f, x, a.finetune_steps, seed)),
        ]
        for name, make in candidates:
            keras.utils.set_random_seed(seed)
            start = time.perf_counter()
            pruned = make()
            rows.append({"method": name, "seed": seed, "accuracy": evaluate(pruned, test),
                         "flops": tfs.summary(pruned, print_fn=None).flops / dense_flops,
                         "seconds": time.perf_counter() - start})
        for r in rows[-(len(candidates) + 2):]:
            print(f"seed {seed} {r['method']}: acc {r['accuracy']:.4f} flops {r['flops']:.3f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    lines = ["| method | MACs / dense | accuracy (mean ± std) | pruning time (s) |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        acc = np.array([r["accuracy"] for r in group]) * 100
        lines.append(f"| {method} | {np.mean([r['flops'] for r in group]):.3f} | {acc.mean():.2f} ± {acc.std():.2f} "
                     f"(n={len(acc)}) | {np.mean([r['seconds'] for r in group]):.0f} |")
    print("\n".join(lines))
    out = HERE / "results" / "structured.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
