"""Copies of single layers: a fresh unbuilt copy, or one with the same weights.

A leaf module (wrappers and surgery both need it, so it imports neither).
"""

from tf_sparsity import _compat


def fresh_layer(layer):
    """A new, unbuilt layer with `layer`'s config (its weights not copied).

    The layer lives in this process already, so its config is trusted even
    when it holds a Python lambda (Keras' safe mode guards loaded files).
    """
    with _compat.unsafe_deserialization():
        return layer.__class__.from_config(layer.get_config())


def clone_layer(layer):
    """A fresh copy of `layer` (same config, same weights)."""
    copy = fresh_layer(layer)
    build_config = layer.get_build_config()
    if build_config:
        copy.build_from_config(build_config)
        copy.set_weights(layer.get_weights())
    return copy
