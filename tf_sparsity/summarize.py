"""`tfs.summary`: one table that answers everything: per-layer params, sparsity, FLOPs, bytes.

The row and table types live in `tf_sparsity.report`."""

import math

import keras
import numpy as np
from keras import ops

from tf_sparsity import prunable
from tf_sparsity.protocols import ReportsSummary
from tf_sparsity.report import LayerReport, Summary
from tf_sparsity.layers.kernel_wrapper import KernelWrapper


def _spatial(shape, data_format):
    if shape is None:
        return None
    dims = shape[2:] if data_format == "channels_first" else shape[1:-1]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _shape(layer, attr):
    try:
        return tuple(getattr(layer, attr).shape)
    except (AttributeError, ValueError):  # not called in a graph (subclassed) or shared
        return None


def macs_per_weight(layer, in_shape, out_shape):
    """How many times each kernel entry of `layer` is used per example.

    Shapes include the batch axis; returns None when they are unknown.
    """
    if isinstance(layer, keras.layers.Embedding):
        return 0
    if out_shape is None:
        return None
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                          keras.layers.Conv3DTranspose)):
        return _spatial(in_shape, layer.data_format)
    if hasattr(layer, "data_format"):  # convolutions
        return _spatial(out_shape, layer.data_format)
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, output = layer.equation.split("->")
        kernel_letters = inputs.split(",")[1]
        out_letters = output.replace("...", "")
        # Each kernel entry is used once per output position along the
        # output axes the kernel does not index (batch excluded).
        dims = [d for letter, d in zip(out_letters[1:], out_shape[len(out_shape) - len(out_letters) + 1:])
                if letter not in kernel_letters]
    else:  # Dense acts on the last axis
        dims = out_shape[1:-1]
    return None if any(d is None for d in dims) else math.prod(dims)


def _timesteps(layer):
    """The static sequence length of an RNN layer's input, or None."""
    try:
        return layer.input.shape[1]
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def layer_report(layer):
    """The `LayerReport` of one layer (wrapped or plain).

    Layers (or the cells of RNN layers) that implement
    `tf_sparsity.protocols.ReportsSummary` describe themselves (low-rank
    cells do, to report learned ranks).
    """
    owner = prunable.protocol_owner(layer, ReportsSummary)
    if owner is layer:
        return layer.summary_row()
    if owner is not None:  # an RNN layer reports through its cell, per example
        return owner.summary_row(timesteps=_timesteps(layer), name=layer.name)
    inner = layer.layer if isinstance(layer, KernelWrapper) else layer
    # A wrapper's own scalars (threshold logit, offset) are bookkeeping, not params.
    params = sum(int(np.prod(w.shape)) for w in inner.weights)
    nbytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in inner.weights)
    if isinstance(layer, KernelWrapper):
        kernels = [ops.convert_to_numpy(k) for k in layer.effective_kernels()]
    elif prunable.is_prunable(inner) and inner.built:
        kernels = [ops.convert_to_numpy(k) for k in prunable.prunable_kernels(inner)]
    else:
        kernels = []
    total = sum(k.size for k in kernels)
    nonzeros = sum(int(np.count_nonzero(k)) for k in kernels)
    flops = effective = None
    if kernels:
        # The wrapper, not its inner layer, is the node in the model graph.
        per_weight = macs_per_weight(inner, _shape(layer, "input"), _shape(layer, "output"))
        if per_weight is not None:
            flops = total * per_weight
            effective = nonzeros * per_weight
    return LayerReport(
        name=inner.name if isinstance(layer, KernelWrapper) else layer.name,
        type=type(inner).__name__,
        params=params,
        prunable=total,
        nonzeros=nonzeros,
        threshold=layer.threshold_value() if isinstance(layer, KernelWrapper) else None,
        flops=flops,
        effective_flops=effective,
        bytes=nbytes,
    )


def summary(model, print_fn=print):
    """Per-layer sparsity report of `model`; prints the table and returns it.

    Rows cover every layer with weights (nested models flattened); wrapped
    layers show their effective kernels and threshold. FLOPs are multiply-
    accumulates per example of the prunable kernels, dense and counting only
    nonzeros. Pass `print_fn=None` to only get the data.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> report = tfs.summary(m, print_fn=None)
    >>> report.params, report.sparsity
    (36, 0.0)
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer; received {type(model).__name__}.")
    layers = prunable.iter_layers(model) if isinstance(model, keras.Model) else [model]
    rows = [layer_report(l) for l in layers if l.weights]
    report = Summary(model_name=model.name, layers=rows)
    if print_fn is not None:
        print_fn(str(report))
    return report


def sparsity(model):
    """Fraction of zeros over all prunable kernels of `model` (wrapped or plain).

    >>> import keras, tf_sparsity as tfs
    >>> tfs.sparsity(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]))
    0.0
    """
    return summary(model, print_fn=None).sparsity
