"""Shared sparsity math, written once and used by every method."""

import keras
from keras import ops

# Threshold functions g for STR: monotone increasing maps from the learned
# logit `s` to a non-negative threshold.
THRESHOLD_FUNCTIONS = {
    "sigmoid": ops.sigmoid,
    "exponential": ops.exp,
}


def get_threshold_fn(threshold_fn):
    """Resolve `threshold_fn` (a name in `THRESHOLD_FUNCTIONS` or a callable).

    >>> float(get_threshold_fn("sigmoid")(0.0))
    0.5
    """
    if callable(threshold_fn):
        return threshold_fn
    if isinstance(threshold_fn, str) and threshold_fn in THRESHOLD_FUNCTIONS:
        return THRESHOLD_FUNCTIONS[threshold_fn]
    if isinstance(threshold_fn, dict):
        return keras.saving.deserialize_keras_object(threshold_fn)
    raise ValueError(
        f"`threshold_fn` must be one of {sorted(THRESHOLD_FUNCTIONS)} or a "
        f"callable; received {threshold_fn!r}."
    )


def serialize_threshold_fn(threshold_fn):
    """Config form of a threshold function (its name, or a Keras object)."""
    if isinstance(threshold_fn, str):
        return threshold_fn
    for name, fn in THRESHOLD_FUNCTIONS.items():
        if fn is threshold_fn:
            return name
    return keras.saving.serialize_keras_object(threshold_fn)


def soft_threshold(x, threshold):
    """STR's reparameterization `sign(x) * relu(|x| - threshold)`.

    Entries with `|x| <= threshold` become exact zeros and get no gradient;
    the rest shrink towards zero by `threshold`.

    >>> soft_threshold(keras.ops.array([-1.0, 0.2, 0.7]), 0.5)
    [-0.5, 0.0, 0.2]  # approximately
    """
    return ops.sign(x) * ops.relu(ops.abs(x) - threshold)


def group_norms(x, group_axes):
    """Euclidean norm of `x` over `group_axes`, kept as broadcastable dims."""
    return ops.sqrt(ops.sum(ops.square(x), axis=group_axes, keepdims=True))
