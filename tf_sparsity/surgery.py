"""Model surgery: rebuild a Keras model with some layers replaced.

Every model-level transform (wrapping for STR or fixed masks, `strip`) goes
through `map_layers`, so Sequential, functional and nested models, shared
layers and weight copying are handled in one place.
"""

import keras
from keras.src.saving import serialization_lib

from tf_sparsity import prunable
from tf_sparsity.layers.kernel_wrapper import KernelWrapper


def check_model(model, argument="model"):
    """Raise a clear error unless `model` is a built Sequential/functional model."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{argument}` must be a Keras 3 `keras.Model`; received "
            f"{type(model).__module__}.{type(model).__name__}. (tf.keras 2 / "
            "tf_keras models are not supported.)"
        )
    if not isinstance(model, (keras.Sequential, keras.src.models.Functional)):
        raise TypeError(
            f"`{argument}` is a subclassed model ({type(model).__name__}), whose "
            "layer graph cannot be rebuilt. Wrap its layers yourself, e.g. "
            "`self.dense = tfs.layers.SoftThreshold(keras.layers.Dense(64))`."
        )
    if not model.built:
        raise ValueError(
            f"`{argument}` must be built: give it an `Input` or call it once on data."
        )
    for layer in prunable.iter_layers(model):
        if isinstance(layer, keras.Model) and not isinstance(
            layer, (keras.Sequential, keras.src.models.Functional)
        ):
            raise TypeError(
                f"`{argument}` contains a subclassed model '{layer.name}' "
                f"({type(layer).__name__}), which cannot be rebuilt; wrap its "
                "layers with tfs.layers wrappers instead."
            )


def fresh_layer(layer):
    """A new, unbuilt layer with `layer`'s config (its weights not copied).

    The layer lives in this process already, so its config is trusted even
    when it holds a Python lambda (Keras' safe mode guards loaded files).
    """
    with serialization_lib.SafeModeScope(False):
        return layer.__class__.from_config(layer.get_config())


def clone_layer(layer):
    """A fresh copy of `layer` (same config, same weights)."""
    copy = fresh_layer(layer)
    build_config = layer.get_build_config()
    if build_config:
        copy.build_from_config(build_config)
        copy.set_weights(layer.get_weights())
    return copy


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


def map_layers(model, replace):
    """Rebuild `model` with `replace(layer)` for each leaf layer.

    `replace` returns a new, unbuilt layer, or None to keep a copy of the
    original. Weights are copied with `transfer_weights` once the new model
    is built. The input model is never modified.
    """
    check_model(model)
    pairs = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = fresh_layer(layer)
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        if old.weights:
            transfer_weights(old, new)
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
    check_model(model)
    skipped = resolve_skip(model, skip)
    wrapped = []

    def replace(layer):
        if prunable.is_prunable(layer) and not skipped(layer):
            wrapped.append(layer.name)
            return make_wrapper(fresh_layer(layer))
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


def strip(model):
    """Return a plain Keras model with every tf_sparsity wrapper removed.

    Each wrapper becomes a layer of the original class whose kernels hold the
    effective (thresholded / masked) values, so pruned weights are exact
    zeros and outputs equal the wrapped model's. Accepts a single wrapper
    layer too.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> plain = tfs.strip(tfs.soft_threshold(m))
    >>> [type(l).__name__ for l in plain.layers]
    ['Dense']
    """
    if isinstance(model, KernelWrapper):
        return model.stripped_layer()

    def replace(layer):
        if isinstance(layer, KernelWrapper):
            return fresh_layer(layer.layer)
        return None

    return map_layers(model, replace)
