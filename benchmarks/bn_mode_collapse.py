"""SNIP and GraSP layer collapse on VGG-16-bn with normalization in training vs eval mode (issue 16).

    python benchmarks/bn_mode_collapse.py --out benchmarks/results/bn_mode_collapse.json

The SynFlow paper's SNIP/GraSP numbers (critical compression 10^3.5 for
both) were scored with BatchNorm in eval mode (the reviewers' complaint);
the package scores in training mode by default. This runs both
(`bn_mode="train"|"eval"`) on `tfs.zoo.vgg16_bn()` (the SynFlow code's
init), the same digits batch as benchmarks/prune_at_init.py, bisection on
log10 compression.
"""

import time

from common import HERE, parser, write_results  # noqa: E402  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_sparsity as tfs  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PAPER = {"snip": 3.5, "grasp": 3.5}


def digits_32(n=256):  # as benchmarks/prune_at_init.py
    (x, y), _ = tfs.datasets.digits()
    x = tf.image.resize(x[:n], (32, 32)).numpy()
    return np.repeat(x, 3, axis=-1).astype("float32"), y[:n]


def main():
    p = parser(__doc__)
    p.add_argument("--methods", nargs="+", default=["snip", "grasp"])
    p.add_argument("--modes", nargs="+", default=["eval", "train"])
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--out", default=str(HERE / "results" / "bn_mode_collapse.json"))
    a = p.parse_args()
    data = digits_32()
    rows = []
    for method in a.methods:
        for mode in a.modes:
            keras.utils.set_random_seed(0)
            model = tfs.zoo.vgg16_bn()
            start = time.perf_counter()
            value = tfs.pruning.critical_compression(model, method, tolerance=a.tolerance, data=data,
                                                     loss=LOSS, bn_mode=mode)
            rows.append({"method": method, "bn_mode": mode, "log10_critical": value,
                         "paper": PAPER[method], "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    write_results(a.out, {"args": vars(a), "rows": rows})
    print("| method | BN mode | ours (log10) | paper (log10, eval mode) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bn_mode']} | {r['log10_critical']:.2f} | {r['paper']} |")


if __name__ == "__main__":
    main()
