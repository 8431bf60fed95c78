"""The linearized |θ| network that SynFlow scores, run with exact power-of-two rescaling.

SynFlow's objective is `R = 1ᵀ f_|θ|(1)`: the network with every parameter
made positive, on an all-ones input. This module evaluates `R` and its
gradient for the networks people use (keras.applications included) under one
rule, the **linearization rule**:

- every activation is the identity: ReLU, ReLU6, leaky ReLU, ELU, swish/SiLU,
  hard-swish, GELU, sigmoid and softmax -- as layers (`Activation`, `ReLU`,
  `Softmax`, ...) and as the `activation=` of a layer. On the positive |θ|
  network ReLU is the identity already, so ReLU networks get the scores they
  always had; the others no longer saturate (ReLU6, sigmoid gates) or cancel
  (`R ≡ 1` under a softmax head): the classifier's logits are the output.
- squeeze-excite gates `x * gate(x)` (any `Multiply`) become the geometric
  mean `sqrt(x * gate_lin(x))` of the two linearized flows. A plain product
  would be quadratic in every kernel upstream: each gate would double the
  degree of the earlier layers, so their scores (Euler: a layer's scores sum
  to its degree times R) grow 2**16-fold over EfficientNetB0's 16 gates and
  SynFlow prunes the late layers away (measured: collapse at C = 100). The
  geometric mean is positively homogeneous of degree 1, so SynFlow's
  conservation (every layer on all paths scores R in total) holds again,
  and the gate's own kernels score R / 2;
- normalization runs in inference mode with |θ| (`BatchNormalization`,
  `Normalization`: `(x - |μ|) * |γ| / sqrt(|σ²| + ε) + |β|`), biases are
  |b|, `Rescaling` is `|scale| * x + |offset|`; pooling, padding, reshapes,
  dropout (identity) and `Add` / `Concatenate` / `Average` are as in the
  model.

Path products overflow float32 in deep nets (and float64 in EfficientNet,
whose gates multiply flows). So every tensor is carried as `v * 2**e`: a
float array `v` whose largest entry is in [1, 2) and a float64 exponent `e`.
The rescaling factors are powers of two, so they are exact in binary
floating point, and they are constants for the gradient: the float32 scores
equal the true scores times one common power of two -- the same ranking as
float64, without overflow, for any architecture (residual sums and gates
included). `SynFlowNetwork.scores(..., dtype="float64")` is the exact
fallback (see `prune_at_init`), and `true_scale=True` returns unscaled
scores when they fit in float64.

Layers outside the supported set make `SynFlowNetwork.supported` False, with
the reason in `.unsupported`; `prune_at_init` then uses its generic path on a
`linearized` copy of the model.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tf_sparsity import _compat
from tf_sparsity import prunable, surgery

L = keras.layers


# -- the linearization rule as layer classes --------------------------------

# Layers that are an activation and nothing else: identity in the flow network.
ACTIVATION_LAYERS = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.PReLU, L.Softmax)
# No weights and linear (or, for max pooling, positively homogeneous) on the
# positive flow: run as the model does.
_PASS_THROUGH = (
    L.Flatten, L.Reshape, L.Permute, L.RepeatVector,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
    L.AveragePooling3D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
)
# Identity at inference.
_IDENTITY = (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianNoise,
             L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization, L.Identity)
_MERGE = (L.Add, L.Average, L.Concatenate, L.Multiply)
# Operation nodes of two tensors that multiply (the rest add, as the merge layers).
_PRODUCTS = ("Multiply", "Divide", "TrueDivide", "Power")
_WEIGHTED = (L.Dense, L.EinsumDense, L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv1D, L.DepthwiseConv2D,
             L.SeparableConv1D, L.SeparableConv2D, L.BatchNormalization, L.Normalization, L.Rescaling)
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)


def unsupported_layers(model):
    """Names (and classes) of the layers `SynFlowNetwork` cannot evaluate.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.LayerNormalization()])
    >>> unsupported_layers(m)  # doctest: +ELLIPSIS
    ['layer_normalization... (LayerNormalization)']
    """
    out = []
    for layer, tensors in _operation_calls(model):
        if _compat.is_graph_model(layer):
            out += unsupported_layers(layer)
        elif isinstance(layer, L.InputLayer) or _compat.is_activation_operation(layer) or (
                _compat.is_elementwise_operation(layer) and tensors > 1):  # `h + i`, `h * g`
            continue
        elif isinstance(layer, _TRANSPOSED) or not isinstance(
                layer, ACTIVATION_LAYERS + _PASS_THROUGH + _IDENTITY + _MERGE + _WEIGHTED):
            out.append(f"{layer.name} ({type(layer).__name__})")
        elif isinstance(layer, L.Normalization) and layer.invert:
            out.append(f"{layer.name} (Normalization(invert=True))")
        elif isinstance(layer, (L.SeparableConv1D, L.DepthwiseConv1D)) or (
                isinstance(layer, L.Conv1D) and layer.padding == "causal"):
            out.append(f"{layer.name} ({type(layer).__name__}, {layer.padding})")
    return out


def _operation_calls(model):
    """`(operation, number of input tensors)` of every call in `model`'s graph."""
    try:
        return [(n.operation, len(n.input_tensors)) for n in _compat.graph_nodes(model)[2]]
    except (AttributeError, ValueError):
        return [(layer, 1) for layer in model.layers]


def linearized(model):
    """A copy of `model` under the linearization rule, as plain Keras layers.

    Activation layers become `keras.layers.Identity`, every `activation=` is
    "linear", activations applied as operation nodes (`keras.ops.tanh(h)`)
    pass their tensor through; weights are copied unchanged (take
    |θ| yourself). Used by
    SynFlow's generic path for models `SynFlowNetwork` does not support.

    Args:
        model: a built functional or Sequential Keras model (not modified).

    >>> import keras
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> linearized(m).layers[-1].activation.__name__
    'linear'
    """

    def replace(layer):
        if isinstance(layer, ACTIVATION_LAYERS):
            return L.Identity(name=layer.name)
        config = layer.get_config()
        if "activation" in config and not isinstance(layer, keras.Model):
            config["activation"] = "linear"
            return layer.__class__.from_config(config)
        return None

    def operation(op):
        return (lambda x, *args, **kwargs: x) if _compat.is_activation_operation(op) else None

    return surgery.map_layers(model, replace, operation=operation)


# -- exact power-of-two rescaling --------------------------------------------

def _pow2(p, dtype):
    """2**p for an integer-valued float64 tensor `p`, exactly, as `dtype`
    (0 below the smallest positive subnormal, capped at the largest normal)."""
    if dtype == tf.float32:
        lo, hi, bias, shift, itype = -126, 127, 127, 23, tf.int32
    else:
        lo, hi, bias, shift, itype = -1022, 1023, 1023, 52, tf.int64
    clipped = tf.clip_by_value(p, lo, hi)
    normal = tf.bitcast(tf.bitwise.left_shift(tf.cast(clipped, itype) + bias, shift), dtype)
    # Below the normal range (alignment of a much smaller branch): subnormal
    # or zero, through a second exact factor.
    return tf.where(p < lo, normal * tf.cast(tf.pow(tf.constant(2.0, tf.float64), tf.maximum(p - lo, -1100.0)),
                                             dtype), normal)


def _renormalize(v, e):
    """(v, e) -> (v * 2**-p, e + p) with max |v| in [1, 2); p from the data, no gradient."""
    m = tf.stop_gradient(tf.reduce_max(tf.abs(v)))
    ok = tf.logical_and(m > 0, tf.math.is_finite(m))
    p = tf.where(ok, tf.floor(tf.math.log(tf.cast(tf.where(ok, m, 1), tf.float64)) / math.log(2.0)),
                 tf.constant(0.0, tf.float64))
    return v * _pow2(-p, v.dtype), e + p


def _align(items):
    """Bring several (v, e) to their common largest exponent."""
    e = items[0][1]
    for _, ei in items[1:]:
        e = tf.maximum(e, ei)
    return [v * _pow2(ei - e, v.dtype) for v, ei in items], e


def _numpy(x):
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, np.float64)


def _geometric_mean(items):
    """(prod v_i)**(1/n) on scaled tensors; zero (with zero gradient) where a factor is zero."""
    n = len(items)
    v, e = items[0]
    for vi, ei in items[1:]:
        v, e = v * vi, e + ei
    positive = v > 0
    root = tf.where(positive, tf.pow(tf.where(positive, v, tf.ones_like(v)), 1.0 / n), tf.zeros_like(v))
    e = e / n
    whole = tf.floor(e)
    root = root * tf.cast(tf.pow(tf.constant(2.0, tf.float64), e - whole), v.dtype)  # one constant factor
    return _renormalize(root, whole)


def _channel_shape(layer, rank, axis=None):
    shape = [1] * rank
    if axis is None:
        axis = -1 if getattr(layer, "data_format", "channels_last") == "channels_last" else 1
    shape[axis] = -1
    return shape


class SynFlowNetwork:
    """SynFlow's linearized |θ| network of a plain (unwrapped) Keras model.

    Prunable kernels are inputs of `scores(masks)`: `|kernel| * mask`; every
    other parameter is |θ| of the model's value, fixed.

    Args:
        model: built functional / Sequential Keras model without wrappers
            (e.g. `tfs.strip(masked)`).
        kernels: `(layer name, kernel index)` of every prunable kernel, in
            the order of the masks `scores` takes (default: every prunable
            layer of `model`, in `tfs.prunable.iter_layers` order).
        mode: "flow" (SynFlow) or "reach": kernels are the 0/1 masks, offsets
            are dropped and each tensor is reduced to "depends on the input"
            (see `tfs.pruning.connectivity`).

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu6", use_bias=False),
    ...                       keras.layers.Dense(2, activation="softmax", use_bias=False)])
    >>> net = SynFlowNetwork(m)
    >>> s = net.scores([np.ones((4, 3)), np.ones((3, 2))], dtype="float64", true_scale=True)
    >>> w1, w2 = [np.abs(l.kernel.numpy()) for l in m.layers]
    >>> bool(np.allclose(s[0], w1 * (w2.sum(1)[None, :] * np.ones((4, 1)))))
    True
    """

    def __init__(self, model, kernels=None, mode="flow"):
        if mode not in ("flow", "reach"):
            raise ValueError(f"`mode` must be 'flow' or 'reach'; received {mode!r}.")
        surgery.check_model(model)
        self.model, self.mode = model, mode
        self.unsupported = unsupported_layers(model)
        self.supported = not self.unsupported
        if kernels is None:
            kernels = [(l.name, i) for l in prunable.iter_layers(model) if prunable.is_prunable(l)
                       for i in range(len(prunable.prunable_kernels(l)))]
        self.kernel_keys = [tuple(k) for k in kernels]
        self._index = {k: i for i, k in enumerate(self.kernel_keys)}
        self._fns = {}
        self._values = {}
        self.float64_rounds = 0  # rounds `needs_float64` sent to the float64 path
        if self.supported:
            self._cache_values(model)
            by_name = {l.name: l for l in prunable.iter_layers(model)}
            missing = [k for k in self.kernel_keys if k[0] not in by_name]
            if missing:
                raise ValueError(f"kernels of unknown layers: {missing}")
            self._bases = [np.abs(prunable.prunable_kernels(by_name[n])[i].numpy()) for n, i in self.kernel_keys]

    # -- the graph ----------------------------------------------------------
    def _cache_values(self, model):
        # Parameter values are read once, eagerly (the graph is traced later).
        for layer, _ in _operation_calls(model):
            if _compat.is_graph_model(layer):
                self._cache_values(layer)
                continue
            for v in getattr(layer, "weights", ()):  # operation nodes hold none
                self._values[id(v)] = _numpy(v)
            if isinstance(layer, L.Normalization):
                for v in (layer.mean, layer.variance):
                    self._values[id(v)] = _numpy(v)

    def _param(self, var, dtype):
        return tf.constant(np.abs(self._values[id(var)]), dtype)

    def _kernel(self, layer, i, ws, dtype):
        j = self._index.get((layer.name, i))
        if j is not None:
            return ws[j]
        value = self._values[id(prunable.prunable_kernels(layer)[i])]
        if self.mode == "reach":
            return tf.constant((value != 0).astype(np.float64), dtype)
        return tf.constant(np.abs(value), dtype)

    def _offset(self, v, e, c):
        if self.mode == "reach" or c is None:
            return v
        return v + c * _pow2(-e, v.dtype)

    def _apply(self, layer, inputs, ws, dtype):
        """One layer on scaled inputs [(v, e), ...] -> (v, e)."""
        reach = self.mode == "reach"
        if _compat.is_graph_model(layer):
            return self._run(layer, inputs, ws, dtype)[0]
        if _compat.is_activation_operation(layer):
            return inputs[0]  # `keras.ops.tanh(h)`: the identity, as every activation
        if isinstance(layer, _MERGE) or _compat.is_elementwise_operation(layer):  # `h + i`, `h * g`
            if isinstance(layer, L.Multiply) or type(layer).__name__ in _PRODUCTS:
                if reach:  # a constant factor keeps the dependence on the other one
                    v = inputs[0][0]
                    for vi, _ in inputs[1:]:
                        v = v + vi
                    return v, inputs[0][1]
                return _geometric_mean(inputs)
            vs, e = _align(inputs)
            if isinstance(layer, L.Concatenate):
                return tf.concat(vs, axis=layer.axis), e
            v = vs[0]
            for vi in vs[1:]:
                v = v + vi
            return (v / len(vs) if isinstance(layer, L.Average) and not reach else v), e
        (v, e), = inputs
        if isinstance(layer, ACTIVATION_LAYERS + _IDENTITY):
            return v, e
        if isinstance(layer, _PASS_THROUGH):
            return layer.call(v), e
        rank = len(v.shape)
        if isinstance(layer, L.BatchNormalization):
            if reach:
                return (v * tf.reshape(tf.cast(self._param(layer.gamma, dtype) > 0, dtype), _channel_shape(
                    layer, rank, layer.axis)) if layer.scale else v), e
            a = 1.0 / tf.sqrt(self._param(layer.moving_variance, dtype) + layer.epsilon)
            if layer.scale:
                a = a * self._param(layer.gamma, dtype)
            c = -self._param(layer.moving_mean, dtype) * a
            if layer.center:
                c = c + self._param(layer.beta, dtype)
            shape = _channel_shape(layer, rank, layer.axis)
            return self._offset(v * tf.reshape(a, shape), e, tf.reshape(c, shape)), e
        if isinstance(layer, L.Normalization):
            if reach:
                return v, e
            mean, var = self._param(layer.mean, dtype), self._param(layer.variance, dtype)
            a = 1.0 / tf.maximum(tf.sqrt(var), keras.config.epsilon())
            return self._offset(v * a, e, -mean * a), e
        if isinstance(layer, L.Rescaling):
            if reach:
                return v, e
            scale = tf.constant(np.abs(np.asarray(layer.scale, np.float64)), dtype)
            offset = tf.constant(np.abs(np.asarray(layer.offset, np.float64)), dtype)
            return self._offset(v * scale, e, offset), e
        # Weighted layers with prunable kernels.
        k0 = self._kernel(layer, 0, ws, dtype)
        if isinstance(layer, L.SeparableConv2D):
            y = keras.ops.separable_conv(v, k0, self._kernel(layer, 1, ws, dtype), strides=layer.strides,
                                         padding=layer.padding, data_format=layer.data_format,
                                         dilation_rate=layer.dilation_rate)
        elif isinstance(layer, L.DepthwiseConv2D):
            y = keras.ops.depthwise_conv(v, k0, strides=layer.strides, padding=layer.padding,
                                         data_format=layer.data_format, dilation_rate=layer.dilation_rate)
        elif isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
            y = layer.convolution_op(v, k0)
        elif isinstance(layer, L.EinsumDense):
            y = tf.einsum(layer.equation, v, k0)
        else:  # Dense
            y = tf.tensordot(v, k0, [[rank - 1], [0]]) if rank > 2 else tf.matmul(v, k0)
        if reach:
            return tf.cast(y > 0, dtype), e
        bias = getattr(layer, "bias", None)
        if bias is not None:
            b = self._param(bias, dtype)
            if not isinstance(layer, L.EinsumDense) and not isinstance(layer, L.Dense):
                b = tf.reshape(b, _channel_shape(layer, len(y.shape)))
            y = self._offset(y, e, b)
        return _renormalize(y, e)

    def _run(self, model, inputs, ws, dtype):
        model_inputs, model_outputs, nodes = _compat.graph_nodes(model)
        values = {id(t): x for t, x in zip(model_inputs, inputs)}
        for node in nodes:
            args = [values[id(t)] for t in node.input_tensors]
            out = self._apply(node.operation, args, ws, dtype)
            outs = node.outputs
            values[id(outs[0])] = out
        return [values[id(t)] for t in model_outputs]

    def forward(self, ws, dtype=tf.float32):
        """Scaled outputs [(v, e)] of the flow network for kernel tensors `ws`."""
        inputs = [(tf.ones([1, *t.shape[1:]], dtype), tf.constant(0.0, tf.float64))
                  for t in _compat.graph_nodes(self.model)[0]]
        return self._run(self.model, inputs, ws, dtype)

    def _fn(self, dtype):
        """The traced function of one dtype: gradients (mode "flow") or reach sums."""
        if dtype in self._fns:
            return self._fns[dtype]
        tdtype = tf.as_dtype(dtype)

        @tf.function(reduce_retracing=True, autograph=False)
        def fn(ws):
            ws = [tf.cast(w, tdtype) for w in ws]
            if self.mode == "reach":
                return [tf.reduce_sum(v) for v, _ in self.forward(ws, tdtype)]
            with tf.GradientTape() as tape:
                tape.watch(ws)
                vs, e = _align(self.forward(ws, tdtype))
                total = tf.add_n([tf.reduce_sum(v) for v in vs])
            grads = tape.gradient(total, ws)
            return [g if g is not None else tf.zeros_like(w) for g, w in zip(grads, ws)], e, total

        self._fns[dtype] = fn
        return fn

    def weights(self, masks, dtype="float32"):
        """The kernels of the flow network for 0/1 `masks`: `|kernel| * mask`, as NumPy arrays."""
        return [(b * np.asarray(m, np.float64)).astype(dtype) for b, m in zip(self._bases, masks)]

    def gradients(self, ws, dtype="float32"):
        """`(dR'/dw per kernel, log2_scale, R')` at kernels `ws` (NumPy arrays).

        `R' = R * 2**-log2_scale` is the scaled objective (see the module
        docstring), so `|w * dR'/dw|` are the scaled scores. The one traced
        function per dtype that SynFlow's rounds call (`prune_at_init`
        passes its kernels with pruned entries zeroed, updated in place).
        """
        if not self.supported:
            raise ValueError(f"SynFlowNetwork does not support {self.unsupported}.")
        if self.mode != "flow":
            raise ValueError("`gradients` needs mode='flow'.")
        grads, e, total = self._fn(dtype)([tf.convert_to_tensor(w, dtype) for w in ws])
        return [g.numpy() for g in grads], float(e), float(total)

    def scores(self, masks, dtype="float32", true_scale=False, return_info=False):
        """SynFlow scores `|θ * dR/dθ|` of every prunable kernel for 0/1 `masks`.

        Args:
            masks: one 0/1 array per kernel (the order of `kernel_keys`).
            dtype: "float32" (fast) or "float64".
            true_scale: multiply by the common power of two, giving the
                unscaled scores (float64; falls back to the scaled ones,
                largest entry < 2, when they overflow float64).
            return_info: also return `{"log2_scale", "small", "alive",
                "nonfinite", "log2_R"}`: `small` counts alive weights scored
                zero or subnormal, `alive` the alive weights.

        Returns:
            a list of score arrays (the scaled scores are the true ones
            times `2**-log2_scale`, one constant for all).
        """
        masks = [keras.ops.convert_to_numpy(m) for m in masks]
        ws = self.weights(masks, dtype)
        grads, e, total = self.gradients(ws, dtype)
        scores = [np.abs(g * w) for g, w in zip(grads, ws)]
        log2_scale = e
        if true_scale and abs(log2_scale) < 1000:
            unscaled = [s.astype(np.float64) * 2.0 ** log2_scale for s in scores]
            if all(np.all(np.isfinite(s)) for s in unscaled):
                scores, log2_scale = unscaled, 0.0
        if return_info:
            tiny = np.finfo(dtype).tiny
            alive = [m > 0 for m in masks]
            info = {"log2_scale": log2_scale,
                    "small": sum(int(np.count_nonzero((s < tiny) & a)) for s, a in zip(scores, alive)),
                    "alive": sum(int(np.count_nonzero(a)) for a in alive),
                    "nonfinite": sum(int(np.count_nonzero(~np.isfinite(s))) for s in scores),
                    "log2_R": e + math.log2(max(total, 1e-300))}
            return scores, info
        return scores

    def reaches(self, masks):
        """Per model output: does it depend on the input through alive weights (mode "reach")?"""
        ws = [tf.cast(tf.convert_to_tensor(m) > 0, tf.float32) for m in masks]  # the masks alone decide
        return [bool(t > 0) for t in self._fn("float32")(ws)]


# -- hooks for prune_at_init's rounds ----------------------------------------

def flow_network_or_none(plain, kernels):
    """`SynFlowNetwork(plain, kernels)`, or None when the model has unsupported layers."""
    net = SynFlowNetwork(plain, kernels)
    return net if net.supported else None


def needs_float64(info, keep=None):
    """Whether a float32 round could rank differently from float64.

    Normal float32 scores order exactly as float64 up to rounding; only
    zero/subnormal scores of alive weights can hide differences (true values
    below float32's range). They are harmless when all of them are pruned in
    this round anyway: global scope with at most `alive - small` weights kept.

    Args:
        info: the `return_info` dict of `SynFlowNetwork.scores`.
        keep: `(scope, [counts])` of the round, or None (no round: only
            non-finite scores need float64).

    >>> needs_float64({"small": 5, "alive": 100, "nonfinite": 0}, ("global", [90]))
    False
    >>> needs_float64({"small": 5, "alive": 100, "nonfinite": 0}, ("global", [96]))
    True
    """
    if info["nonfinite"]:
        return True
    if not info["small"] or keep is None:  # no round to decide: the float32 scores as they are
        return False
    if keep[0] != "global":
        return True
    return int(keep[1][0]) > info["alive"] - info["small"]


def round_scores(net, masks, fast=True, keep=None):
    """Scores for one pruning round: float32 (scaled), float64 when `needs_float64`.

    `fast=False` returns float64 scores at their true scale (when they fit).
    """
    if not fast:
        return net.scores(masks, "float64", true_scale=True)
    scores, info = net.scores(masks, "float32", return_info=True)
    if needs_float64(info, keep):
        net.float64_rounds += 1
        return net.scores(masks, "float64")
    return scores


def alive_scores(net, ws, masks, alive, keep=None):
    """One pruning round's scores of the alive weights only, in flat order.

    float32 with exact power-of-two rescaling from `SynFlowNetwork.gradients`,
    `|g * w|` taken on the alive entries only (the rounds of an exponential
    schedule leave a few percent of the weights alive soon); float64 when
    `needs_float64` says float32 could rank differently.

    Args:
        net: a `SynFlowNetwork` (mode "flow").
        ws: float32 kernels `|kernel| * mask` (NumPy, kernel shapes).
        masks: the 0/1 masks (for the float64 fallback).
        alive: flat indices of the alive entries of each kernel (sorted).
        keep: `(scope, [counts])` of the round (see `needs_float64`).

    Returns:
        one 1-D array per kernel: the scores at `alive` (float32, or float64
        after a fallback round).
    """
    grads, _, _ = net.gradients(ws, "float32")
    tiny = np.finfo(np.float32).tiny
    out, small, total = [], 0, 0.0
    for g, w, idx in zip(grads, ws, alive):
        g, w = g.reshape(-1), w.reshape(-1)
        if idx.size != g.size:
            g, w = g[idx], w[idx]
        s = np.abs(g * w)
        small += int(np.count_nonzero(s < tiny))
        total += float(np.sum(s, dtype=np.float64))
        out.append(s)
    bad = 0 if math.isfinite(total) else sum(int(np.count_nonzero(~np.isfinite(s))) for s in out)
    info = {"small": small, "alive": sum(int(idx.size) for idx in alive), "nonfinite": bad}
    if needs_float64(info, keep):
        net.float64_rounds += 1
        full = net.scores(masks, "float64")
        out = [s.reshape(-1) if idx.size == s.size else s.reshape(-1)[idx] for s, idx in zip(full, alive)]
    return out


# -- softmax heads for the data methods (GraSP's temperature) ----------------

class logits_of:
    """Context manager: the model's softmax output layers give their logits.

    GraSP divides the *logits* by its temperature (T = 200); on a
    keras.applications model whose head is `Dense(..., activation="softmax")`
    dividing the output would scale probabilities instead. Inside the
    context every output layer (or the layer inside an output wrapper) with
    a softmax activation is linear; outside it is restored.

    Args:
        model: a functional / Sequential model (wrappers allowed).

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> with logits_of(m) as heads:
    ...     z = m(np.ones((1, 3)))
    >>> len(heads), bool(np.allclose(keras.ops.sum(m(np.ones((1, 3)))), 1.0))
    (1, True)
    """

    def __init__(self, model):
        self.heads = softmax_heads(model)

    def __enter__(self):
        self._saved = [h.activation for h in self.heads]
        for h in self.heads:
            h.activation = keras.activations.linear
        return self.heads

    def __exit__(self, *exc):
        for h, a in zip(self.heads, self._saved):
            h.activation = a
        return False


def softmax_heads(model):
    """The layers producing `model`'s outputs whose activation is softmax."""
    _, outputs, nodes = _compat.graph_nodes(model)
    producers = {id(t): n.operation for n in nodes for t in n.outputs}
    heads = []
    for t in outputs:
        layer = producers.get(id(t))
        layer = getattr(layer, "layer", layer)  # tf_sparsity wrappers
        if getattr(getattr(layer, "activation", None), "__name__", "") == "softmax":
            heads.append(layer)
    return heads
