"""Unstructured vs 1x4-block STR at 90% on a Dense-heavy MLP: accuracy and LiteRT speed.

    python benchmarks/block_str.py --seeds 3 --epochs 15 --variants unstructured block1x4
    python benchmarks/block_str.py --seeds 3 --epochs 15 --variants block1x4-hard
    python benchmarks/block_str.py --seeds 3 --epochs 15 --variants block1x16-hard

MNIST-1D (10k samples), `mnist1d_mlp(hidden=(1024, 2048, 2048))` (6.4M
weights), SGD-Nesterov 0.1 cosine, batch 128, coupled L2 5e-4,
`TargetSparsity(0.9)` with one threshold level (`learn_threshold=False`).
Each trained model is stripped and exported with `tfs.export.convert(...,
target="litert")` (float, `sparse="auto"`); LiteRT invoke time is the median
of interleaved single-thread runs, as a ratio to the dense model of the same
seed measured in the same run.
"""


from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
from tf_sparsity.export import runtimes  # noqa: E402

HIDDEN = (1024, 2048, 2048)
# variant -> (granularity, shrink); None = dense
# variant: (granularity, shrink, block_shape in the kernel's (in, out) layout)
VARIANTS = {"dense": None, "unstructured": ("weight", True, (4, 1)), "block1x4": ("block", True, (4, 1)),
            "block1x4-hard": ("block", False, (4, 1)), "block1x16-hard": ("block", False, (16, 1))}


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["unstructured", "block1x4", "block1x4-hard"],
                   choices=[v for v in VARIANTS if v != "dense"], help="trained next to dense")
    a = p.parse_args()
    train, test = tfs.datasets.mnist1d(num_samples=10000)
    rows = []
    for seed in range(a.seeds):
        exported = {}
        for variant in ["dense"] + [v for v in a.variants if v != "dense"]:
            keras.utils.set_random_seed(seed)
            if variant == "dense":
                model = tfs.zoo.mnist1d_mlp(hidden=HIDDEN, weight_decay=5e-4)
                cbs = []
            else:
                granularity, shrink, block_shape = VARIANTS[variant]
                model = tfs.soft_threshold(tfs.zoo.mnist1d_mlp(hidden=HIDDEN), weight_decay=5e-4,
                                           learn_threshold=False, granularity=granularity,
                                           block_shape=block_shape, shrink=shrink)
                cbs = [tfs.callbacks.TargetSparsity(a.target)]
            result = train_classifier(model, train, test, epochs=a.epochs, callbacks=cbs)
            plain = tfs.strip(model)
            exported[variant] = tfs.export.convert(plain, target="litert")
            rows.append({"variant": variant, "seed": seed, "accuracy": result["accuracy"],
                         "sparsity": tfs.sparsity(plain), "bytes": exported[variant].report.size_bytes,
                         "sparse_tensors": len(exported[variant].report.sparse_tensors)})
            print(f"seed {seed} {variant}: acc {result['accuracy']:.4f} sparsity {rows[-1]['sparsity']:.3f} "
                  f"bytes {rows[-1]['bytes']:,}", flush=True)
        times = {v: [] for v in exported}
        for _ in range(a.rounds):  # interleaved, so machine noise hits every variant alike
            for v, e in exported.items():
                times[v].append(runtimes.time_litert(e.tflite, runs=100))
        for row in rows[-len(exported):]:
            row["litert_us"] = float(np.median(times[row["variant"]])) * 1e6
            row["speedup"] = float(np.median(times["dense"]) / np.median(times[row["variant"]]))
            print(f"seed {seed} {row['variant']}: {row['litert_us']:.0f} us, {row['speedup']:.2f}x", flush=True)
    lines = ["| variant | accuracy (mean ± std) | sparsity | .tflite bytes | LiteRT µs | speed-up vs dense |",
             "|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        g = [r for r in rows if r["variant"] == v]
        acc = np.array([r["accuracy"] for r in g]) * 100
        lines.append(f"| {v} | {acc.mean():.2f} ± {acc.std():.2f} (n={len(g)}) | "
                     f"{np.mean([r['sparsity'] for r in g]) * 100:.1f}% | {int(np.mean([r['bytes'] for r in g])):,} | "
                     f"{np.median([r['litert_us'] for r in g]):.0f} | {np.median([r['speedup'] for r in g]):.2f}× |")
    print("\n".join(lines))
    out = HERE / "results" / f"block_str_{'_'.join(v for v in a.variants if v != 'dense')}.json"
    out.parent.mkdir(exist_ok=True)
    write_results(out, {"args": vars(a), "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
