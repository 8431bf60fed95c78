"""Graph rebuilding: a Keras model with some layers replaced.

Every model-level transform (wrapping for STR or fixed masks, `strip`,
channel surgery) goes through `map_layers`, so Sequential, functional and
nested models, shared layers and weight copying are handled in one place.
"""

import keras

from tf_sparsity import _compat, prunable
from tf_sparsity.layer_copy import clone_layer, fresh_layer
from tf_sparsity.layers.kernel_wrapper import KernelWrapper

__all__ = ["as_graph_model", "check_model", "clone_layer", "fresh_layer", "map_layers", "resolve_skip",
           "transfer_weights", "wrap_prunable", "wrappers"]


def check_model(model, argument="model"):
    """Raise a clear error unless `model` is a built Keras 3 model."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{argument}` must be a Keras 3 `keras.Model`; received "
            f"{type(model).__module__}.{type(model).__name__}. (tf.keras 2 / "
            "tf_keras models are not supported.)"
        )
    if not model.built:
        raise ValueError(
            f"`{argument}` must be built: give it an `Input` or call it once on data."
        )


def as_graph_model(model, argument="model"):
    """`model` if it is functional or Sequential; a subclassed model as the
    functional model `Input -> model`, so every transform can rebuild it.

    The subclassed model becomes one owner layer (see `tfs.prunable`): its
    kernels, wherever its `call` reads them, are reached through that layer.
    """
    check_model(model, argument)
    if isinstance(model, _compat.REBUILDABLE_MODELS):
        return model
    shape = (model.get_build_config() or {}).get("input_shape")
    if not (isinstance(shape, (list, tuple)) and shape and all(d is None or isinstance(d, int) for d in shape)):
        raise ValueError(
            f"`{argument}` is a subclassed model ({type(model).__name__}) built on "
            f"{shape!r}: tf_sparsity rebuilds subclassed models with one array input. "
            "Wrap its layers with tfs.layers wrappers in the class instead."
        )
    inputs = keras.Input(batch_shape=tuple(shape), name=f"{model.name}_input")
    return keras.Model(inputs, model(inputs), name=model.name)


def transfer_weights(source, target):
    """Copy `source`'s weights into its replacement `target`.

    Knows the three cases every transform produces: plain -> wrapper (the
    wrapper's inner layer gets the weights), wrapper -> plain (effective
    kernels baked in), and same -> same.
    """
    if isinstance(target, KernelWrapper) and not isinstance(source, KernelWrapper):
        target.layer.set_weights(source.get_weights())
    elif isinstance(source, KernelWrapper) and not isinstance(target, KernelWrapper):
        source.transfer_to(target)
    else:
        target.set_weights(source.get_weights())


def map_layers(model, replace, transfer=transfer_weights, operation=None):
    """Rebuild `model` with `replace(layer)` for each leaf layer.

    `replace` returns a new, unbuilt layer, or None to keep a copy of the
    original. Operation nodes (`+`, `keras.ops.*`: stateless) are reused, or
    replaced by the callable `operation(op)` returns when it is not None. Weights are copied with `transfer(old, new)` (default
    `transfer_weights`) once the new model is built. The input model is
    never modified.
    """
    model = as_graph_model(model)
    pairs = []

    def clone_function(layer):
        if not isinstance(layer, keras.layers.Layer):
            return (operation and operation(layer)) or layer
        new = replace(layer)
        if new is None:
            new = fresh_layer(layer)
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        if old.weights:
            transfer(old, new)
    return new_model


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
    model = as_graph_model(model)
    skipped = resolve_skip(model, skip)
    wrapped = []

    def replace(layer):
        if prunable.is_prunable(layer) and not skipped(layer):
            wrapped.append(layer.name)
            # An owner creates its sublayers in `build`: the copy is built so the
            # wrapper sees its kernels (the weights are copied again afterwards).
            return make_wrapper(clone_layer(layer) if prunable.owned_leaves(layer) else fresh_layer(layer))
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
    return map_layers(model, replace)


def wrappers(model):
    """All tf_sparsity wrappers in `model` (nested models included)."""
    return [l for l in prunable.iter_layers(model) if isinstance(l, KernelWrapper)]
