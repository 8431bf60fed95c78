"""BatchNormalization statistics after pruning: recompute the moving mean and variance.

Pruning changes the distribution a normalization layer sees. During STR
training with learned thresholds, the thresholds of convolutions followed by
BatchNorm rise until the surviving weights are barely above them (BatchNorm
makes the loss blind to that shrinkage), so the convolutions' output
variance falls by orders of magnitude within a few hundred steps; the
moving averages (momentum 0.99, a ~100-step memory) lag far behind and the
model in inference mode can sit at chance while its training-mode accuracy
is high (measured: docs/str.md). `recalibrate_batchnorm` re-estimates the
statistics from data with the weights fixed, the standard repair after
pruning.
"""

import keras
import numpy as np

from tf_sparsity import prunable

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]


def batchnorm_layers(model):
    """Every `keras.layers.BatchNormalization` in `model` (nested models included)."""
    return [l for l in prunable.iter_layers(model) if isinstance(l, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model, x, batch_size=256, max_batches=None):
    """Recompute every BatchNorm layer's moving mean and variance from `x`.

    Runs `model(batch, training=True)` over `x` in order with the weights
    fixed and sets each moving statistic to the plain average of the batch
    statistics (a cumulative average: momentum `1 - 1/n` at batch `n`).
    Nothing else changes: trainable weights, the layers' `momentum` and
    `trainable` flags are restored. Other training-mode layers (dropout)
    run in training mode during the passes, which changes no state.

    Args:
        model: a Keras model.
        x: inputs, a NumPy array (or anything `model` accepts that slices
            along the first axis) with at least `batch_size` samples.
        batch_size: samples per pass (the statistics are per batch, as in
            training; use the training batch size or larger).
        max_batches: stop after this many batches (None: all full batches).

    Returns:
        The number of batches used (0 when the model has no BatchNorm).

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.BatchNormalization()])
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (512, 4)).astype("float32")
    >>> tfs.recalibrate_batchnorm(model, x, batch_size=128)
    4
    >>> bn = model.layers[-1]
    >>> h = model.layers[0](x).numpy()
    >>> bool(np.allclose(bn.moving_mean.numpy(), h.mean(0), atol=1e-3))
    True
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer; received {type(model).__name__}.")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1; received {batch_size!r}.")
    if max_batches is not None and (not isinstance(max_batches, (int, np.integer)) or max_batches < 1):
        raise ValueError(f"`max_batches` must be None or an integer >= 1; received {max_batches!r}.")
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    n_samples = len(x)
    batches = n_samples // batch_size
    if max_batches is not None:
        batches = min(batches, int(max_batches))
    if batches < 1:
        raise ValueError(f"`x` has {n_samples} samples, fewer than one `batch_size` ({batch_size}).")
    saved = [(l.momentum, l.trainable) for l in layers]
    weights = [(v, np.array(v.numpy())) for v in model.trainable_variables]
    try:
        for layer in layers:
            layer.trainable = True  # a frozen BatchNorm does not update its statistics
        for n in range(1, batches + 1):
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / n  # n = 1: the first batch's statistics
            model(x[(n - 1) * batch_size:n * batch_size], training=True)
    finally:
        for layer, (momentum, trainable) in zip(layers, saved):
            layer.momentum = momentum
            layer.trainable = trainable
        for variable, value in weights:  # nothing but the statistics may move
            variable.assign(value)
    return batches
