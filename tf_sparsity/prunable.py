"""Which layers can be pruned, and where their kernels live.

This is the one place that knows Keras layer internals. Every method (STR,
fixed masks, GSM pools, summary, export) asks here instead of guessing.
"""

import keras

# Attribute names of the prunable kernels, most specific class first. Biases,
# normalization statistics and scales are never listed: they are not pruned.
_PRUNABLE_ATTRS = (
    (keras.layers.SeparableConv1D, ("depthwise_kernel", "pointwise_kernel")),
    (keras.layers.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel")),
    (keras.layers.DepthwiseConv1D, ("kernel",)),
    (keras.layers.DepthwiseConv2D, ("kernel",)),
    (keras.layers.Conv1DTranspose, ("kernel",)),
    (keras.layers.Conv2DTranspose, ("kernel",)),
    (keras.layers.Conv3DTranspose, ("kernel",)),
    (keras.layers.Conv1D, ("kernel",)),
    (keras.layers.Conv2D, ("kernel",)),
    (keras.layers.Conv3D, ("kernel",)),
    (keras.layers.EinsumDense, ("kernel",)),
    (keras.layers.Dense, ("kernel",)),
    (keras.layers.Embedding, ("embeddings",)),
)

PRUNABLE_TYPES = tuple(cls for cls, _ in _PRUNABLE_ATTRS)


def prunable_kernel_names(layer):
    """Names of `layer`'s prunable kernel attributes (empty if none).

    >>> prunable_kernel_names(keras.layers.SeparableConv2D(8, 3))
    ('depthwise_kernel', 'pointwise_kernel')
    """
    for cls, names in _PRUNABLE_ATTRS:
        if isinstance(layer, cls):
            return names
    return ()


def is_prunable(layer):
    """True if `layer` has a kernel that tf_sparsity knows how to prune."""
    return bool(prunable_kernel_names(layer))


def prunable_kernels(layer):
    """The built kernel variables of `layer`, in `prunable_kernel_names` order.

    Raises `ValueError` if the layer is not built or stores its kernel in a
    form that cannot be pruned (LoRA-enabled or quantized layers).
    """
    if not layer.built:
        raise ValueError(f"Layer '{layer.name}' must be built before its kernels are read.")
    kernels = []
    for name in prunable_kernel_names(layer):
        value = getattr(layer, name)
        if not isinstance(value, keras.Variable):
            raise ValueError(
                f"Layer '{layer.name}': `{name}` is not a plain variable "
                "(LoRA-enabled or quantized layers cannot be pruned); prune "
                "before enabling LoRA or quantizing."
            )
        kernels.append(value)
    return kernels


def iter_layers(model):
    """All leaf layers of `model`, nested models flattened, each once."""
    seen = set()
    stack = [model]
    out = []
    while stack:
        layer = stack.pop(0)
        children = [l for l in getattr(layer, "layers", None) or [] if l is not layer]
        if isinstance(layer, keras.Model) or (children and not is_prunable(layer) and not _is_wrapper(layer)):
            stack[:0] = children
            continue
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def _is_wrapper(layer):
    return isinstance(layer, keras.layers.Wrapper)


def protocol_owner(layer, protocol):
    """The object that implements `protocol` (from `tf_sparsity.protocols`) for `layer`:
    the layer itself, else the cell of a `keras.layers.RNN`, else None.

    The one place that looks through recurrent layers, so a plain
    `keras.layers.RNN(LowRankGRUCell(...))` strips, reports and steers like
    the convenience `LowRankGRU`.
    """
    if isinstance(layer, protocol):
        return layer
    cell = layer.cell if isinstance(layer, keras.layers.RNN) else None
    return cell if cell is not None and isinstance(cell, protocol) else None
