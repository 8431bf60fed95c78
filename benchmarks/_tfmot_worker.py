"""tfmot baseline, run in its own process (tfmot switches tf.keras to Keras 2).

Invoked by benchmarks/str_vs_tfmot.py and gsm_vs_sgd.py; prints one JSON line. Never import
tf_sparsity here: it is Keras 3.
"""

import argparse
import json
import os
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402


def cnn():
    L = keras.layers
    inputs = keras.Input((40, 1))
    x = L.Conv1D(32, 5, padding="same", activation="relu")(inputs)
    x = L.Conv1D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv1D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Flatten()(x)
    x = L.Dense(256, activation="relu")(x)
    return keras.Model(inputs, L.Dense(10)(x))


def cnn_bn():
    # tfs.zoo.mnist1d_cnn_bn: conv-BN-ReLU x3 (no conv bias), dense, dense.
    L = keras.layers
    inputs = keras.Input((40, 1))
    x = inputs
    for size, stride in [(5, 1), (3, 2), (3, 2)]:
        x = L.Conv1D(32, size, strides=stride, padding="same", use_bias=False)(x)
        x = L.ReLU()(L.BatchNormalization()(x))
    x = L.Dense(256, activation="relu")(L.Flatten()(x))
    return keras.Model(inputs, L.Dense(10)(x))


def lenet():
    L = keras.layers
    inputs = keras.Input((40, 1))
    x = L.Flatten()(inputs)
    x = L.Dense(300, activation="relu")(x)
    x = L.Dense(100, activation="relu")(x)
    return keras.Model(inputs, L.Dense(10)(x))


MODELS = {"cnn": cnn, "cnn_bn": cnn_bn, "lenet": lenet}


def recalibrate_batchnorm(model, x, batch_size=256):
    """The Keras 2 twin of `tfs.recalibrate_batchnorm` (tf_sparsity is Keras 3 and
    never enters this process): each moving statistic becomes the plain average of
    the batch statistics over `x` (momentum 1 - 1/n at batch n), weights fixed."""
    layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    saved = [l.momentum for l in layers]
    weights = [(v, v.numpy().copy()) for v in model.trainable_variables]
    for n in range(1, len(x) // batch_size + 1):
        for layer in layers:
            layer.momentum = 1.0 - 1.0 / n
        model(x[(n - 1) * batch_size:n * batch_size], training=True)
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum
    for variable, value in weights:
        variable.assign(value)


class StepTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.per_step = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        self.last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if epoch > 0:
            self.per_step.append((self.last - self.start) / self.steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--end-fraction", type=float, default=0.7)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--model", choices=sorted(MODELS), default="cnn")
    p.add_argument("--init-weights", action="store_true",
                   help="start from the weights w0, w1, ... stored in --data (same layer order)")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="also report the accuracy after re-estimating the BatchNorm statistics "
                        "from the training inputs (as the Keras 3 rows of str_bn_cnn.py do)")
    a = p.parse_args()
    data = np.load(a.data)
    x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    keras.utils.set_random_seed(a.seed)
    steps = int(np.ceil(len(x) / a.batch_size))
    total = steps * a.epochs
    model = MODELS[a.model]()
    if a.init_weights:
        model.set_weights([data[f"w{i}"] for i in range(len(model.get_weights()))])
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=a.sparsity, begin_step=0,
        end_step=int(a.end_fraction * total), frequency=10)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    lr = keras.optimizers.schedules.CosineDecay(a.lr, total)
    # Same coupled L2 as the STR runs, on the kernels, through the loss.
    kernels = [l.layer.kernel for l in pruned.layers if hasattr(l, "layer") and hasattr(l.layer, "kernel")]
    pruned.add_loss(lambda: 0.5 * a.weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels]))
    pruned.compile(keras.optimizers.SGD(lr, momentum=a.momentum, nesterov=True),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    timer = StepTimer()
    pruned.fit(x, y, epochs=a.epochs, batch_size=a.batch_size, verbose=0, shuffle=True,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), timer])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    _, acc = stripped.evaluate(xt, yt, verbose=0, batch_size=512)
    extra = {}
    if a.recalibrate_bn:
        recalibrate_batchnorm(stripped, x)
        _, recalibrated = stripped.evaluate(xt, yt, verbose=0, batch_size=512)
        extra = {"accuracy_as_trained": float(acc)}
        acc = recalibrated
    kernels = [l.kernel.numpy() for l in stripped.layers if hasattr(l, "kernel")]
    zeros = sum(int((k == 0).sum()) for k in kernels)
    total_w = sum(k.size for k in kernels)
    print(json.dumps({"accuracy": float(acc), "sparsity": zeros / total_w,
                      "seconds_per_step": float(np.median(timer.per_step)), **extra}))


if __name__ == "__main__":
    main()
