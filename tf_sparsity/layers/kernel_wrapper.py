"""The base every tf_sparsity wrapper shares: replace kernels, keep the layer."""

import keras
from keras import ops

from tf_sparsity import _compat, prunable
from tf_sparsity.layer_copy import clone_layer


class KernelWrapper(keras.layers.Wrapper):
    """Runs a layer with its prunable kernels replaced by computed tensors.

    Subclasses implement `effective_kernels()` (one tensor per kernel, e.g.
    soft-thresholded or masked); the wrapped layer's own `call` then runs
    unchanged on those tensors, so every prunable Keras layer type works
    without re-implementing its math. Kernel math runs in float32 even under
    a mixed-precision policy; the wrapped layer casts for its own compute.
    """

    def __init__(self, layer, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"`layer` must be a Keras layer; received {type(layer).__name__}."
            )
        if not prunable.is_prunable(layer):
            raise ValueError(
                f"`layer` '{layer.name}' ({type(layer).__name__}) has no prunable "
                "kernel; supported types: "
                + ", ".join(c.__name__ for c in prunable.PRUNABLE_TYPES)
                + "."
            )
        kwargs.setdefault("name", f"{self.name_prefix}_{layer.name}")
        super().__init__(layer, **kwargs)
        # Read kernels in their stored dtype (float32), not autocast.
        self.autocast = False
        self.supports_masking = getattr(layer, "supports_masking", False)

    name_prefix = "wrapped"

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.build_wrapper()
        self.built = True

    def build_wrapper(self):
        """Create the wrapper's own variables (after the inner layer is built)."""

    @property
    def kernels(self):
        """The wrapped layer's prunable kernel variables."""
        return prunable.prunable_kernels(self.layer)

    @property
    def kernel_names(self):
        return prunable.prunable_kernel_names(self.layer)

    def effective_kernels(self):
        """Tensors that replace `self.kernels` in the forward pass."""
        raise NotImplementedError

    def call(self, inputs, *args, **kwargs):
        mapping = [
            (kernel, ops.cast(value, kernel.dtype))
            for kernel, value in zip(self.kernels, self.effective_kernels())
        ]
        outer = _compat.stateless_scope()
        scope = keras.StatelessScope(mapping, initialize_variables=False)
        if outer is not None:  # keep values an enclosing stateless call set
            for key, value in outer.state_mapping.items():
                scope.state_mapping.setdefault(key, value)
        with scope:
            return self.layer(inputs, *args, **kwargs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args, **kwargs):
        # Owners such as subclassed models define no `compute_output_shape`.
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def threshold_value(self):
        """The wrapper's current threshold, or None if it has none."""
        return None

    def is_collapsed(self):
        """True when every effective kernel entry is zero (layer collapse)."""
        return all(not bool(ops.any(ops.not_equal(k, 0))) for k in self.effective_kernels())

    def stripped_layer(self):
        """A plain layer of the wrapped class with the effective kernels baked in."""
        layer = clone_layer(self.layer)
        self.transfer_to(layer)
        return layer

    def transfer_to(self, layer):
        """Copy the inner weights into `layer`, effective kernels baked in."""
        layer.set_weights(self.layer.get_weights())
        for kernel, value in zip(prunable.prunable_kernels(layer), self.effective_kernels()):
            kernel.assign(ops.cast(value, kernel.dtype))
