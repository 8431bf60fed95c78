"""Helpers shared by the tests (import them: `from support import compile_sgd`)."""

import keras
import numpy as np


def compile_sgd(model, lr=0.05):
    """Compile for sparse-label classification with SGD-Nesterov and logits."""
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def random_like(shape, seed=0):
    """Standard-normal float32 data of `shape`, reproducible by `seed`."""
    return np.random.default_rng(seed).normal(size=shape).astype("float32")
