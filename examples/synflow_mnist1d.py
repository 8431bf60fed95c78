"""SynFlow: prune at initialization without data, then train with fixed masks.

    python examples/synflow_mnist1d.py --compression 100
    python examples/synflow_mnist1d.py --quick
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--compression", type=float, default=100)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="10 rounds, 2 epochs, 4000 samples")
    args = parser.parse_args(argv)
    train, test = tfs.datasets.mnist1d(num_samples=4000 if args.quick else 10000)
    model = tfs.zoo.mnist1d_cnn()
    print("critical log10 compression (no layer collapses below it):",
          round(tfs.pruning.critical_compression(model, "synflow", iterations=10 if args.quick else 100,
                                                 tolerance=0.2 if args.quick else 0.05), 2))
    sparse = tfs.prune_at_init(model, "synflow", compression=args.compression,
                               iterations=10 if args.quick else 100)
    result = train_classifier(sparse, train, test, epochs=2 if args.quick else args.epochs)
    tfs.summary(sparse)
    print(f"test accuracy {result['accuracy']:.4f} at sparsity {tfs.sparsity(sparse):.4f}")


if __name__ == "__main__":
    main()
