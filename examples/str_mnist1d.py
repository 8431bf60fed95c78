"""STR on MNIST-1D: train to a requested sparsity, inspect, strip, save.

    python examples/str_mnist1d.py --target 0.95
    python examples/str_mnist1d.py --quick
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import tf_sparsity as tfs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 epochs on 4000 samples")
    parser.add_argument("--output", default="str_mnist1d.keras")
    args = parser.parse_args(argv)

    (x, y), (x_test, y_test) = tfs.datasets.mnist1d(num_samples=4000 if args.quick else 10000)
    epochs = 2 if args.quick else args.epochs
    sparse = tfs.soft_threshold(tfs.zoo.mnist1d_cnn(), weight_decay=5e-4, learn_threshold=False)
    steps = epochs * -(-len(x) // 128)
    sparse.compile(
        keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, steps), momentum=0.9, nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    sparse.fit(x, y, epochs=epochs, batch_size=128, verbose=2 if args.quick else 1,
               callbacks=[tfs.callbacks.TargetSparsity(args.target), tfs.callbacks.SparsityMonitor()])
    tfs.summary(sparse)
    plain = tfs.strip(sparse)
    plain.save(args.output)  # a plain Keras model: exact zeros, no tf_sparsity layers
    plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    _, accuracy = plain.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy {accuracy:.4f} at sparsity {tfs.sparsity(plain):.4f}")
    return accuracy


if __name__ == "__main__":
    main()
