"""STR: soft threshold reparameterization (Kusupati et al., ICML 2020)."""

import math

import numpy as np

import keras
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity.layers.kernel_wrapper import KernelWrapper


GRANULARITIES = ("weight", "block", "channel")
THRESHOLD_GRADIENTS = ("sum", "mean", "sqrt")


@keras.saving.register_keras_serializable(package="tf_sparsity")
class SoftThreshold(KernelWrapper):
    """Learns one pruning threshold for a layer's kernels (STR).

    The layer runs with `W_eff = sign(W) * relu(|W| - g(s + offset))`, where
    `s` is a trainable scalar (`threshold_logit`) and `g` a monotone threshold
    function (sigmoid by default). Weights under the threshold are exact zeros
    and get no loss gradient, but they keep their L2 decay, so they can come
    back when the threshold falls. `offset` is a non-trainable scalar that
    `tfs.callbacks.TargetSparsity` steers; it is 0 otherwise.

    `weight_decay` adds `weight_decay / 2 * ||W||^2` and
    `threshold_decay / 2 * s^2` to the model losses: coupled L2 that flows
    through the gradient and momentum as in the reference (PyTorch SGD
    `weight_decay`; the reference's `--st-decay` is `threshold_decay`, which
    defaults to `weight_decay`). This decay on `s` is what raises the
    threshold over training (it pulls a negative `s` towards 0). Do not use
    the optimizer's decoupled `weight_decay` argument for it: that never
    touches `s` through the loss.

    Args:
        layer: a prunable Keras layer (Dense, Conv*, Embedding, ...).
        s_init: initial threshold logit. Very negative values (e.g. -5 with
            sigmoid, g = 0.0067) start almost dense.
        weight_decay: coupled L2 coefficient on the kernels (and on `s`
            unless `threshold_decay` is given).
        threshold_decay: coupled L2 coefficient on `s` (the reference's
            `--st-decay`); None = `weight_decay`. A non-trainable multiplier
            `threshold_decay_scale` (1 by default) scales it;
            `TargetSparsity(steer="decay")` steers that multiplier.
        threshold_lr_scale: multiplies the whole gradient on `s` (loss and
            decay) by this factor; the forward value is unchanged. Under
            plain or momentum SGD this is a per-layer learning-rate scale for
            `s` (0.1 = `s` learns 10x slower); under Adam/RMSprop, which
            normalize each variable's gradient, a constant scale cancels out
            (apart from `epsilon`) and does nothing.
        threshold_gradient: "sum" (the paper): the loss gradient on `s` is
            the sum over the layer's surviving kernel entries, so a large
            layer pulls its threshold down hardest. "mean" (our variant):
            that loss gradient is divided by the layer's kernel entry count
            (a per-weight average), so layers of different sizes learn their
            thresholds at comparable rates; the decay on `s` is unchanged.
            "sqrt" (our variant) divides it by the square root of that count
            (how a sum of uncorrelated per-weight terms grows). Combine with `threshold_lr_scale` to set the overall rate.
        threshold_fn: "sigmoid", "exponential", or a serializable callable.
        granularity: "weight" (the paper), "block" (groups of `block_shape`
            along the kernel's last two axes, (in, out); the default (4, 1)
            is LiteRT's 1x4 sparse FULLY_CONNECTED block, use (16, 1) for
            int8) or "channel" (one group per output unit/filter; `strip`
            then removes zeroed channels). Groups shrink by their L2 norm.
            Inside a `tfs.surgery.ChannelGroupModel` (what
            `tfs.soft_threshold(..., granularity="channel")` returns) a
            "channel" wrapper thresholds whole channel dependency groups
            across layers instead (`tfs.surgery.coupling`).
        block_shape: block size for "block" granularity.
        shrink: True (STR) shrinks surviving groups by the threshold; False
            keeps them whole (hard mask; needs `learn_threshold=False`).
        min_channels: inside a `tfs.surgery.ChannelGroupModel`, the channels
            of every channel dependency group that always survive (the
            largest by RMS; default 1, so no group is ever emptied: an empty
            main-path group cuts the network). 0 lets groups empty. Ignored
            outside channel groups.
        learn_threshold: train `s` by the loss (the paper). False keeps `s`
            fixed, so thresholds move only with `offset`: with
            `TargetSparsity` all layers then share one threshold level and
            per-layer sparsity follows the trained weights (measured better
            on MNIST-1D: see docs/benchmarks.md).

    Example:

    >>> import numpy as np, keras, tf_sparsity as tfs
    >>> layer = tfs.layers.SoftThreshold(keras.layers.Dense(4), s_init=-2.0)
    >>> tuple(layer(np.ones((1, 8), "float32")).shape)
    (1, 4)
    >>> mean = tfs.layers.SoftThreshold(keras.layers.Dense(4), threshold_gradient="mean")
    >>> mean.get_config()["threshold_gradient"]
    'mean'
    """

    name_prefix = "str"

    def __init__(self, layer, s_init=-5.0, weight_decay=0.0, threshold_fn="sigmoid",
                 learn_threshold=True, granularity="weight", block_shape=(4, 1), shrink=True,
                 threshold_decay=None, threshold_lr_scale=1.0, threshold_gradient="sum", min_channels=1,
                 **kwargs):
        if not isinstance(s_init, (int, float)) or not math.isfinite(s_init):
            raise ValueError(f"`s_init` must be a finite number; received {s_init!r}.")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0; received {weight_decay!r}.")
        if threshold_decay is not None and (not isinstance(threshold_decay, (int, float))
                                            or isinstance(threshold_decay, bool) or threshold_decay < 0):
            raise ValueError(f"`threshold_decay` must be None or a number >= 0; received {threshold_decay!r}.")
        if (not isinstance(threshold_lr_scale, (int, float)) or isinstance(threshold_lr_scale, bool)
                or not math.isfinite(threshold_lr_scale) or threshold_lr_scale < 0):
            raise ValueError(f"`threshold_lr_scale` must be a finite number >= 0; received {threshold_lr_scale!r}.")
        if threshold_gradient not in THRESHOLD_GRADIENTS:
            raise ValueError(f"`threshold_gradient` must be one of {list(THRESHOLD_GRADIENTS)}; "
                             f"received {threshold_gradient!r}.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {list(GRANULARITIES)}; received {granularity!r}.")
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
            raise ValueError(f"`min_channels` must be an integer >= 0; received {min_channels!r}.")
        block_shape = tuple(block_shape)
        if len(block_shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in block_shape):
            raise ValueError(f"`block_shape` must be two integers >= 1 (input, output); received {block_shape!r}.")
        super().__init__(layer, **kwargs)
        if not shrink and learn_threshold:
            raise ValueError("`shrink=False` gives the threshold no gradient: use it with "
                             "`learn_threshold=False` (thresholds steered by TargetSparsity).")
        self.granularity = granularity
        self.block_shape = block_shape
        self.shrink = bool(shrink)
        self.s_init = float(s_init)
        self.weight_decay = float(weight_decay)
        self.threshold_fn = sparse_ops.get_threshold_fn(threshold_fn)
        self.learn_threshold = bool(learn_threshold)
        self.threshold_decay = None if threshold_decay is None else float(threshold_decay)
        self.threshold_lr_scale = float(threshold_lr_scale)
        self.threshold_gradient = threshold_gradient
        self.min_channels = min_channels
        # Set by `tfs.surgery.couple_channels` (model level, rebuilt on load):
        # "channel" granularity then thresholds channel dependency groups.
        self.coupling = None

    @property
    def s_decay(self):
        """The coupled L2 coefficient on `s` (before `threshold_decay_scale`)."""
        return self.weight_decay if self.threshold_decay is None else self.threshold_decay

    def build_wrapper(self):
        self.threshold_logit = self.add_weight(
            name="threshold_logit",
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(self.s_init),
            trainable=self.learn_threshold,
        )
        # Set by steering, never by the loss: the common offset (offset
        # steering) and the multiplier on the decay of s (decay steering).
        for name, initial in (("threshold_offset", "zeros"), ("threshold_decay_scale", "ones")):
            setattr(self, name, self.add_weight(name=name, shape=(), dtype="float32", initializer=initial,
                                                trainable=False))

    # Variables in the order files written before `threshold_decay_scale`
    # existed stored them (Keras writes trainable variables first; `s` always
    # precedes the offset in either case).
    _LEGACY_VARIABLES = ("threshold_logit", "threshold_offset")

    def load_own_variables(self, store):
        """Load this wrapper's variables; also reads files saved before the decay scale.

        Such files hold `s` and the offset only: the decay multiplier then
        keeps its neutral value 1, which is what those models trained with.
        """
        if 0 < len(store.keys()) <= len(self._LEGACY_VARIABLES):
            for index, name in enumerate(self._LEGACY_VARIABLES[:len(store.keys())]):
                getattr(self, name).assign(store[str(index)])
            self.threshold_decay_scale.assign(1.0)
            return
        super().load_own_variables(store)

    def _logit(self, loss_path=False):
        # `s` with its gradient scaled by `threshold_lr_scale` (value unchanged);
        # on the loss path also by 1 / (kernel entries) for threshold_gradient="mean"
        # (1 / sqrt(entries) for "sqrt").
        s = self.threshold_logit
        c = self.threshold_lr_scale
        if loss_path and self.threshold_gradient != "sum":
            entries = max(1, sum(int(np.prod(kernel.shape)) for kernel in self.kernels))
            c = c / (entries if self.threshold_gradient == "mean" else math.sqrt(entries))
        if c == 1.0:
            return s
        return c * s + ops.stop_gradient((1.0 - c) * s)

    def threshold(self):
        """The current threshold `g(s + offset)` (float32 scalar tensor)."""
        return self.threshold_fn(self._logit(loss_path=True) + self.threshold_offset)

    @property
    def steering_name(self):
        """The wrapped layer's name (what collapse reports call this threshold)."""
        return self.layer.name

    def threshold_value(self):
        return float(ops.convert_to_numpy(self.threshold()))

    def threshold_magnitudes(self):
        """(group magnitudes compared with the threshold, kernel entries per group), NumPy."""
        if self.coupling is not None:
            return self.coupling.magnitudes(self)
        magnitudes, sizes = [], []
        for kernel in self.kernels:
            m = ops.convert_to_numpy(sparse_ops.group_magnitudes(
                ops.cast(kernel, "float32"), self.granularity, self.block_shape)).ravel()
            magnitudes.append(m)
            sizes.append(np.full(m.shape, int(np.prod(kernel.shape)) / max(1, m.size)))
        return np.concatenate(magnitudes), np.concatenate(sizes)

    def effective_kernels(self):
        if self.coupling is not None:
            return self.coupling.effective_kernels(self)
        threshold = self.threshold()
        return [
            sparse_ops.group_soft_threshold(ops.cast(kernel, "float32"), threshold,
                                            self.granularity, self.block_shape, self.shrink)
            for kernel in self.kernels
        ]

    def call(self, inputs, *args, **kwargs):
        if self.weight_decay:
            squares = 0.0
            for kernel in self.kernels:
                squares = squares + ops.sum(ops.square(ops.cast(kernel, "float32")))
            self.add_loss(0.5 * self.weight_decay * squares)
        if self.s_decay and self.learn_threshold:
            self.add_loss(0.5 * self.s_decay * self.threshold_decay_scale * ops.square(self._logit()))
        return super().call(inputs, *args, **kwargs)

    @classmethod
    def from_config(cls, config):
        """Layers saved before `min_channels` existed had no floor: they load as they ran."""
        return super().from_config({"min_channels": 0, **config})

    def get_config(self):
        config = super().get_config()
        config.update(
            s_init=self.s_init,
            weight_decay=self.weight_decay,
            threshold_fn=sparse_ops.serialize_threshold_fn(self.threshold_fn),
            learn_threshold=self.learn_threshold,
            granularity=self.granularity,
            block_shape=list(self.block_shape),
            shrink=self.shrink,
            threshold_decay=self.threshold_decay,
            threshold_lr_scale=self.threshold_lr_scale,
            threshold_gradient=self.threshold_gradient,
            min_channels=self.min_channels,
        )
        return config
