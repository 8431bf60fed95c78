"""STR at model level: wrap every prunable layer with `SoftThreshold`."""

import keras

from tf_sparsity import prunable
from tf_sparsity import surgery
from tf_sparsity.layers.soft_threshold import SoftThreshold


def resolve_skip(model, skip):
    """Turn `skip` (names, layer classes, or a predicate) into a predicate.

    Unknown layer names raise a `ValueError` listing the prunable names.
    """
    if skip is None:
        return lambda layer: False
    if callable(skip) and not isinstance(skip, type):
        return skip
    items = [skip] if isinstance(skip, (str, type)) else list(skip)
    names = {l.name for l in prunable.iter_layers(model)}
    types, skip_names = [], set()
    for item in items:
        if isinstance(item, type):
            types.append(item)
        elif isinstance(item, str):
            if item not in names:
                known = sorted(l.name for l in prunable.iter_layers(model) if prunable.is_prunable(l))
                raise ValueError(f"`skip` names unknown layer '{item}'; prunable layers: {known}.")
            skip_names.add(item)
        else:
            raise TypeError(
                "`skip` must hold layer names, layer classes, or be a predicate "
                f"`layer -> bool`; received {item!r}."
            )
    types = tuple(types)
    return lambda layer: layer.name in skip_names or (bool(types) and isinstance(layer, types))


def wrap_prunable(model, make_wrapper, skip=None):
    """Rebuild `model` with `make_wrapper(layer)` around each prunable layer.

    The shared path for every wrapper-based method; raises if nothing is
    prunable after `skip`.
    """
    surgery.check_model(model)
    skipped = resolve_skip(model, skip)
    wrapped = []

    def replace(layer):
        if prunable.is_prunable(layer) and not skipped(layer):
            wrapped.append(layer.name)
            return make_wrapper(surgery.fresh_layer(layer))
        return None

    candidates = [l for l in prunable.iter_layers(model) if prunable.is_prunable(l) and not skipped(l)]
    if not candidates:
        raise ValueError(
            f"`model` '{model.name}' has no prunable layer"
            + (" left after `skip`" if skip is not None else "")
            + "; prunable types: "
            + ", ".join(c.__name__ for c in prunable.PRUNABLE_TYPES)
            + "."
        )
    return surgery.map_layers(model, replace)


def soft_threshold(model, s_init=-5.0, weight_decay=0.0, threshold_fn="sigmoid", skip=None,
                   learn_threshold=True):
    """Wrap every prunable layer of `model` with STR's learned threshold.

    Returns a new model (the input is untouched) whose Dense, EinsumDense,
    Conv*, DepthwiseConv*, SeparableConv* (both kernels), Conv*Transpose and
    Embedding layers are `tfs.layers.SoftThreshold` wrappers sharing the
    original weights' values. Biases and normalization layers are never
    thresholded. Train with `model.fit`; add `tfs.callbacks.TargetSparsity`
    to end at a requested sparsity, and `tfs.strip` to export.

    Args:
        model: a built Sequential or functional Keras model (nested ok).
        s_init: initial threshold logit for every layer.
        weight_decay: coupled L2 on the kernels and thresholds (see
            `SoftThreshold`); the reference uses the network's weight decay.
        threshold_fn: "sigmoid" (paper default), "exponential" or a callable.
        skip: layer names, layer classes, or a predicate `layer -> bool`
            selecting prunable layers to leave dense.
        learn_threshold: train each layer's threshold logit (the paper's
            STR); False keeps it fixed (see `SoftThreshold`).

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2, name="head")])
    >>> sparse = tfs.soft_threshold(model, s_init=-5.0, weight_decay=5e-4, skip=["head"])
    >>> [type(l).__name__ for l in sparse.layers]
    ['SoftThreshold', 'Dense']
    """
    return wrap_prunable(
        model,
        lambda layer: SoftThreshold(
            layer, s_init=s_init, weight_decay=weight_decay, threshold_fn=threshold_fn,
            learn_threshold=learn_threshold,
        ),
        skip=skip,
    )
