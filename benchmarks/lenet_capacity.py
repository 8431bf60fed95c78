"""How much a ~4k-weight MLP can do on MNIST-1D: the capacity behind GSM's LeNet-300-100 gap at x10.

    python benchmarks/lenet_capacity.py --seeds 2 --out benchmarks/results/lenet_capacity.json

Dense MLPs with about as many kernel weights as LeNet-300-100 keeps at x10
(4.3k of 43k), trained like the dense LeNet rows of `gsm_vs_sgd.py` (SGD-
Nesterov 0.9, lr 0.1 cosine, L2 5e-4 on the kernels, batch 128) for
`--epochs` 60, scored on the validation split (last 1/8 of the training
split; the test split is never touched).
"""

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402

SHAPES = [(300, 100), (100,), (64, 32), (80, 20), (30, 30)]


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", default=str(HERE / "results" / "lenet_capacity.json"))
    a = p.parse_args()
    train, _ = tfs.datasets.mnist1d(num_samples=10000)
    cut = len(train[0]) * 7 // 8
    train, val = (train[0][:cut], train[1][:cut]), (train[0][cut:], train[1][cut:])
    rows = []
    print("| hidden | kernel weights | validation accuracy % (per seed) |\n|---|---|---|")
    for hidden in SHAPES:
        accs = []
        for seed in range(a.seeds):
            keras.utils.set_random_seed(seed)
            model = tfs.zoo.mnist1d_mlp(hidden=hidden, weight_decay=5e-4)
            n = sum(int(np.prod(w.shape)) for w in model.trainable_weights if len(w.shape) == 2)
            accs.append(train_classifier(model, train, val, epochs=a.epochs, learning_rate=0.1)["accuracy"])
        rows.append({"hidden": list(hidden), "kernel_weights": n, "val_accuracy": accs})
        print(f"| 40-{'-'.join(map(str, hidden))}-10 | {n:,} | {np.mean(accs) * 100:.1f} "
              f"({', '.join(f'{100 * x:.1f}' for x in accs)}) |", flush=True)
    write_results(a.out, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
