"""Fixed-mask wrapper: pruned weights stay exactly zero through training."""

import keras
from keras import ops

from tf_sparsity.layers.kernel_wrapper import KernelWrapper


@keras.saving.register_keras_serializable(package="tf_sparsity")
class Masked(KernelWrapper):
    """Runs a layer with `kernel * mask` for fixed, non-trainable 0/1 masks.

    One mask per prunable kernel (two for separable convolutions), stored as
    non-trainable float32 weights so they save with the model. Pruned
    entries get no loss gradient, so any optimizer (momentum, Adam, ...)
    leaves the effective weights exactly zero; `tfs.strip` bakes them in.
    Masks are set by `tfs.prune_at_init` or `set_masks`.

    Example:

    >>> import numpy as np, keras, tf_sparsity as tfs
    >>> layer = tfs.layers.Masked(keras.layers.Dense(2))
    >>> _ = layer(np.ones((1, 3), "float32"))
    >>> layer.set_masks([np.array([[1, 0], [0, 1], [1, 1]], "float32")])
    >>> int(np.count_nonzero(layer.effective_kernels()[0]))
    4
    """

    name_prefix = "masked"

    def build_wrapper(self):
        self.masks = [
            self.add_weight(name=f"mask_{name}", shape=kernel.shape, dtype="float32",
                            initializer="ones", trainable=False)
            for name, kernel in zip(self.kernel_names, self.kernels)
        ]

    def set_masks(self, masks, zero_weights=True):
        """Assign new 0/1 masks (one per kernel); optionally zero the pruned weights too."""
        if len(masks) != len(self.masks):
            raise ValueError(f"`masks` must hold {len(self.masks)} arrays for '{self.layer.name}'; "
                             f"received {len(masks)}.")
        for variable, mask, kernel in zip(self.masks, masks, self.kernels):
            mask = ops.cast(ops.convert_to_tensor(mask), "float32")
            if tuple(mask.shape) != tuple(variable.shape):
                raise ValueError(f"mask for '{self.layer.name}' must have shape {tuple(variable.shape)}; "
                                 f"received {tuple(mask.shape)}.")
            variable.assign(mask)
            if zero_weights:
                kernel.assign(ops.cast(kernel, "float32") * mask)

    def effective_kernels(self):
        return [ops.cast(kernel, "float32") * mask for kernel, mask in zip(self.kernels, self.masks)]
