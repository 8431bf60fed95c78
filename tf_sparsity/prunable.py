"""Which layers can be pruned, and where their kernels live.

This is the one place that knows Keras layer internals. Every method (STR,
fixed masks, GSM pools, summary, export) asks here instead of guessing.

Two kinds of prunable layer:

- a *leaf*: a layer of one of the types below, whose kernels are its own;
- an *owner*: any other layer (or subclassed model) that holds leaves
  somewhere inside -- `MultiHeadAttention` (four `EinsumDense`),
  `TimeDistributed`, `Bidirectional`, a custom layer holding Dense/Conv
  sublayers, a subclassed `keras.Model`. Its kernels are its leaves'
  kernels, in Keras' tracking order. A wrapper runs the owner unchanged with
  those kernels replaced (`KernelWrapper`), so the owner's own `call` never
  needs to be known.
"""

import keras

from tf_sparsity import _compat

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


def _leaf_kernel_names(layer):
    for cls, names in _PRUNABLE_ATTRS:
        if isinstance(layer, cls):
            return names
    return ()


def _is_kernel_wrapper(layer):
    # Duck-typed: `KernelWrapper` imports this module.
    return callable(getattr(layer, "effective_kernels", None))


def owned_leaves(layer):
    """The leaf prunable layers inside `layer` when `layer` is an owner, else [].

    A layer that already holds a tf_sparsity wrapper is not an owner (its
    kernels are pruned by that wrapper), and graph models are not owners:
    their layers are rebuilt one by one instead.

    >>> mha = keras.layers.MultiHeadAttention(2, 4)
    >>> _ = mha(keras.ops.ones((1, 3, 4)), keras.ops.ones((1, 3, 4)))
    >>> [l.name for l in owned_leaves(mha)]
    ['query', 'key', 'value', 'attention_output']
    """
    if (_leaf_kernel_names(layer) or _is_kernel_wrapper(layer) or _compat.is_graph_model(layer)
            or not isinstance(layer, keras.layers.Layer)):
        return []
    inner = _compat.sublayers(layer)
    if any(_is_kernel_wrapper(l) for l in inner):
        return []
    return [l for l in inner if _leaf_kernel_names(l)]


def prunable_kernel_names(layer):
    """Names of `layer`'s prunable kernels (empty if none).

    A leaf's names are its attributes; an owner's are `<leaf name>_<attribute>`.

    >>> prunable_kernel_names(keras.layers.SeparableConv2D(8, 3))
    ('depthwise_kernel', 'pointwise_kernel')
    """
    names = _leaf_kernel_names(layer)
    if names:
        return names
    return tuple(f"{leaf.name}_{name}" for leaf in owned_leaves(layer) for name in _leaf_kernel_names(leaf))


def is_prunable(layer):
    """True if `layer` has a kernel that tf_sparsity knows how to prune (leaf or owner)."""
    return bool(_leaf_kernel_names(layer)) or bool(owned_leaves(layer))


def prunable_kernels(layer):
    """The built kernel variables of `layer`, in `prunable_kernel_names` order.

    Raises `ValueError` if the layer is not built or stores its kernel in a
    form that cannot be pruned (LoRA-enabled or quantized layers).
    """
    if not layer.built:
        raise ValueError(f"Layer '{layer.name}' must be built before its kernels are read.")
    leaves = [layer] if _leaf_kernel_names(layer) else owned_leaves(layer)
    kernels = []
    for leaf in leaves:
        if not leaf.built:
            raise ValueError(f"Layer '{leaf.name}' inside '{layer.name}' must be built before its "
                             "kernels are read.")
        for name in _leaf_kernel_names(leaf):
            value = getattr(leaf, name)
            if not isinstance(value, keras.Variable):
                raise ValueError(
                    f"Layer '{leaf.name}': `{name}` is not a plain variable "
                    "(LoRA-enabled or quantized layers cannot be pruned); prune "
                    "before enabling LoRA or quantizing."
                )
            kernels.append(value)
    return kernels


def iter_layers(model):
    """All layers of `model`'s graph, nested graph models flattened, each once.

    Owners (attention, subclassed models, ...) are listed as one layer.
    """
    seen = set()
    stack = [model]
    out = []
    while stack:
        layer = stack.pop(0)
        children = [l for l in getattr(layer, "layers", None) or [] if l is not layer]
        if (_compat.is_graph_model(layer) or (layer is model and isinstance(layer, keras.Model))
                or (children and not is_prunable(layer) and not _is_wrapper(layer))):
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
