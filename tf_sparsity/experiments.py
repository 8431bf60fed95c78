"""The training recipe shared by the demo, the CLI and the benchmarks."""

import time

import keras
import numpy as np


def sgd_cosine(learning_rate, total_steps, momentum=0.9):
    """SGD with Nesterov momentum and cosine decay (the STR reference recipe)."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, total_steps))
    return keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True)


def train_classifier(model, train, test, epochs=20, batch_size=128, learning_rate=0.1,
                     callbacks=(), optimizer=None, verbose=0, loss=None):
    """Train `model` on `(x, y)` with SGD-Nesterov + cosine decay; return metrics.

    The returned dict has `accuracy` (test), `history` (per-epoch logs) and
    `seconds_per_step` (median wall time of a training step, excluding the
    first epoch, which includes tracing).
    """
    (x, y), (x_test, y_test) = train, test
    steps = int(np.ceil(len(x) / batch_size))
    model.compile(
        optimizer=optimizer or sgd_cosine(learning_rate, epochs * steps),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = _StepTimer()
    history = model.fit(
        x, y, epochs=epochs, batch_size=batch_size, verbose=verbose, shuffle=True,
        validation_data=(x_test, y_test), callbacks=[timer, *callbacks],
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0, batch_size=512)
    return {
        "accuracy": float(accuracy),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "seconds_per_step": timer.median(),
    }


class _StepTimer(keras.callbacks.Callback):
    """Wall time per epoch / steps, after the first (tracing) epoch."""

    def on_train_begin(self, logs=None):
        self.per_step = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._last = time.perf_counter()  # validation after the last batch is not counted

    def on_epoch_end(self, epoch, logs=None):
        if epoch > 0 and self._steps:
            self.per_step.append((self._last - self._start) / self._steps)

    def median(self):
        return float(np.median(self.per_step)) if self.per_step else None
