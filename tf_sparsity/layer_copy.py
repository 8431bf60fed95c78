"""Copies of single layers: a fresh unbuilt copy, or one with the same weights.

A leaf module (wrappers and surgery both need it, so it imports neither).
"""

import numpy as np

from tf_sparsity import _compat


def fresh_layer(layer):
    """A new, unbuilt layer with `layer`'s config (its weights not copied).

    The layer lives in this process already, so its config is trusted even
    when it holds a Python lambda (Keras' safe mode guards loaded files).
    """
    try:
        with _compat.unsafe_deserialization():
            return layer.__class__.from_config(layer.get_config())
    except (TypeError, ValueError, NotImplementedError) as error:
        raise TypeError(
            f"Layer '{layer.name}' ({type(layer).__name__}) cannot be re-created from its config "
            f"({error}). tf_sparsity copies a layer before wrapping or rebuilding it, as `.keras` "
            "saving does: give the class a `get_config` whose keys its `__init__` accepts "
            "(e.g. `**kwargs` passed to `super().__init__`).") from None


def clone_layer(layer):
    """A fresh copy of `layer` (same config, same weights)."""
    copy = fresh_layer(layer)
    build_config = layer.get_build_config()
    if build_config:
        copy.build_from_config(build_config)
        if not _fully_built(copy):
            _call_once(copy, build_config.get("input_shape"))
        copy.set_weights(layer.get_weights())
    return copy


def _fully_built(layer):
    return layer.built and all(l.built for l in _compat.sublayers(layer))


def _call_once(layer, shape):
    # Subclassed models (and custom layers without `build`) create their
    # sublayers' weights only when called.
    if not (isinstance(shape, (list, tuple)) and all(d is None or isinstance(d, int) for d in shape)):
        raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) cannot be rebuilt from its "
                         f"build config (input shape {shape!r}); give it a `build` method.")
    layer(np.zeros([1 if d is None else d for d in shape], "float32"))
