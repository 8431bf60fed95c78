"""The demo's `lowrank-gru` row: its training recipe vs the benchmark's, over seeds (issue 14).

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 nice -n 10 .venv/bin/python benchmarks/demo_lowrank_gru.py \\
        --seeds 0,1,2 --out benchmarks/results/demo_lowrank_gru.json

Runs exactly the demo's code path for that method (`demo._methods` builds the
model and its training kwargs, `train_classifier`, `strip`; MNIST-1D 10k
samples, 15 epochs, the seed set as `run_demo` sets it) with two recipes:

- `demo`: what the demo trains with (Adam at a constant 1e-2, clipnorm 1,
  `TargetSparsity(0.75)` with its default ramp, ending at 70% of training);
- `cosine` (as `benchmarks/low_rank_rnn.py` and `tf-sparsity prune --method
  lowrank` train): `tfs.recipes.low_rank_optimizer(total_steps)`, the same
  Adam with cosine decay to 0, the rank ramp ending at `LOW_RANK_RAMP_END`
  (50%).

Per run: test accuracy of the stripped model (what the demo table shows),
the per-epoch training accuracy (its largest drop in the last five epochs
shows the instability) and the learned ranks. The first seed of `demo` is
then exported as the demo exports it (`demo._export_all`: TFLM int8 bytes,
arena, form; the step form's default `step_head="joined"`). No
hyperparameter is tuned here: both recipes are fixed beforehand; test
accuracy is reported once per run.
"""

import time

from common import parser, write_results  # noqa: E402  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_sparsity import callbacks, datasets, demo, recipes  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
from tf_sparsity.summarize import summary  # noqa: E402


def run(recipe, seed, epochs, data, out_dir=None):
    train, test = data
    steps = int(np.ceil(len(train[0]) / 128))
    _, _, build = [r for r in demo._methods(False, epochs, steps) if r[0] == "lowrank-gru"][0]
    keras.utils.set_random_seed(seed)
    model, kwargs, finish = build(None)
    if recipe == "cosine":
        kwargs = {"optimizer": recipes.low_rank_optimizer(epochs * steps),
                  "callbacks": [callbacks.TargetSparsity(0.75, end_fraction=recipes.LOW_RANK_RAMP_END)]}
    start = time.perf_counter()
    result = train_classifier(model, train, test, epochs=epochs, **kwargs)
    report = summary(model, print_fn=None)
    plain = finish(model)
    plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    train_acc = result["history"]["accuracy"]
    row = {"recipe": recipe, "seed": seed, "epochs": epochs, "accuracy": float(plain.evaluate(*test, verbose=0)[1]),
           "train_accuracy_per_epoch": train_acc,
           "largest_train_accuracy_drop_last5": float(max(0.0, *(a - b for a, b in zip(train_acc[-6:], train_acc[-5:])))),
           "sparsity": report.sparsity, "ranks": [l.rank for l in report.layers if l.rank],
           "train_seconds": time.perf_counter() - start}
    if out_dir is not None:
        row["export"] = demo._export_all(plain, "lowrank-gru@0.75", train[0], out_dir)
    return row


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--recipes", default="demo,cosine")
    p.add_argument("--out", default="benchmarks/results/demo_lowrank_gru.json")
    a = p.parse_args(argv)
    import pathlib
    import tempfile

    data = datasets.mnist1d(num_samples=10000)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.recipes.split(","):
            for seed in seeds:
                export_to = pathlib.Path(tmp) if (recipe == "demo" and seed == seeds[0]) else None
                rows.append(run(recipe, seed, a.epochs, data, export_to))
                print({k: v for k, v in rows[-1].items() if k != "train_accuracy_per_epoch"}, flush=True)
    summary_rows = {}
    for recipe in a.recipes.split(","):
        acc = [r["accuracy"] for r in rows if r["recipe"] == recipe]
        summary_rows[recipe] = {"mean": float(np.mean(acc)), "std": float(np.std(acc)), "runs": acc}
    lines = ["| recipe | test accuracy % per seed | mean ± std | largest train-acc drop, last 5 epochs |", "|---|---|---|---|"]
    for recipe, s in summary_rows.items():
        drops = [r["largest_train_accuracy_drop_last5"] for r in rows if r["recipe"] == recipe]
        lines.append(f"| {recipe} | {' / '.join(f'{100 * v:.2f}' for v in s['runs'])} | "
                     f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {' / '.join(f'{100 * d:.1f}' for d in drops)} |")
    markdown = "\n".join(lines)
    write_results(a.out, {"args": vars(a), "rows": rows, "summary": summary_rows, "markdown": markdown})
    print(markdown)


if __name__ == "__main__":
    main()
