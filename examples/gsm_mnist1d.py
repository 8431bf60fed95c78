"""GSM: train dense, continue with Global Sparse Momentum, cut to the top-Q.

    python examples/gsm_mnist1d.py --compression 10
    python examples/gsm_mnist1d.py --quick
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--compression", type=float, default=10)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="2 + 2 epochs on 4000 samples")
    args = parser.parse_args(argv)
    train, test = tfs.datasets.mnist1d(num_samples=4000 if args.quick else 10000)
    epochs = 2 if args.quick else args.epochs
    dense = tfs.zoo.mnist1d_cnn(weight_decay=5e-4)
    train_classifier(dense, train, test, epochs=2 if args.quick else 20)
    model = tfs.zoo.mnist1d_cnn()  # GSM applies the L2 itself: no kernel_regularizer
    model.set_weights(dense.get_weights())
    steps = epochs * -(-len(train[0]) // 128)
    optimizer = tfs.optimizers.GlobalSparseMomentum(
        keras.optimizers.schedules.CosineDecay(0.02, steps), momentum=0.99, nesterov=True,
        weight_decay=5e-3, compression=args.compression)
    result = train_classifier(model, train, test, epochs=epochs, optimizer=optimizer,
                              callbacks=[tfs.optimizers.GSMMonitor()])
    tfs.optimizers.final_prune(model)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    accuracy = model.evaluate(*test, verbose=0)[1]
    tfs.summary(model)
    print(f"before final_prune {result['accuracy']:.4f}; test accuracy {accuracy:.4f} "
          f"at sparsity {tfs.sparsity(model):.4f}")


if __name__ == "__main__":
    main()
