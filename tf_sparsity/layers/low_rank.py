"""Low-rank STR for recurrent cells: GRU, LSTM and FastGRNN learn their ranks.

STR (Kusupati et al., ICML 2020) extends its soft threshold from single
weights to *structure*: each weight matrix of a recurrent cell is written as

    W = Û · diag(S_g(σ̃, s)) · V̂ᵀ,    S_g(σ̃, s) = sign(σ̃) · relu(|σ̃| − g(s)·RMS(σ̃))

with unit-norm components `Û_i`, `V̂_i` (rows × max_rank, cols × max_rank),
their magnitudes `σ̃` and one learned threshold logit `s` per matrix
(`LowRankMatrix` says why the threshold is relative to the RMS magnitude).
Components under the threshold are exact zeros, so the learned rank is the
number of nonzero thresholded `σ̃`. The threshold is the package's one
`tf_sparsity.ops.soft_threshold`.

Three families of classes live here:

- STR cells for training: `LowRankGRUCell`, `LowRankLSTMCell`, `FastGRNNCell`
  (usable in `keras.layers.RNN`), each holding two `LowRankMatrix` objects:
  the input matrix (all gates stacked, `input_dim × gates·units`) and the
  recurrent matrix (`units × gates·units`).
- Convenience layers: `LowRankGRU`, `LowRankLSTM`, `FastGRNN`
  (`keras.layers.RNN` subclasses that build the cell for you, and compute the
  thresholded factors once per sequence instead of once per step).
- Deployable cells: `FactorizedGRUCell`, `FactorizedLSTMCell`,
  `FactorizedFastGRNNCell`: plain cells with two small dense matrices per
  weight (or one dense matrix where that is smaller), no thresholds. `strip`
  produces them; with ranks `None` they are ordinary dense cells, which is
  also how a dense FastGRNN is trained.

Example:

>>> import numpy as np, keras, tf_sparsity as tfs
>>> layer = tfs.layers.LowRankGRU(16, max_rank=(1, 8))
>>> model = keras.Sequential([keras.Input((40, 1)), layer, keras.layers.Dense(10)])
>>> tuple(model(np.zeros((2, 40, 1), "float32")).shape)
(2, 10)
>>> layer.ranks()
(1, 8)
>>> plain = tfs.strip(model)   # keras.layers.RNN(FactorizedGRUCell) inside
>>> type(plain.layers[0].cell).__name__
'FactorizedGRUCell'
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity.summary import LayerReport

__all__ = [
    "LowRankMatrix", "FactorRegularizer",
    "LowRankGRUCell", "LowRankLSTMCell", "FastGRNNCell",
    "LowRankGRU", "LowRankLSTM", "FastGRNN",
    "FactorizedGRUCell", "FactorizedLSTMCell", "FactorizedFastGRNNCell",
    "stripped_rnn", "rnn_summary_row", "thresholded_matrices", "low_rank_rnns",
]

_register = keras.saving.register_keras_serializable(package="tf_sparsity")


# --------------------------------------------------------------------------
# argument checks

def _check_rank_arg(max_rank, argument="max_rank"):
    """Normalize `max_rank` to an (input, recurrent) pair of int-or-None."""
    pair = tuple(max_rank) if isinstance(max_rank, (list, tuple)) else (max_rank, max_rank)
    if len(pair) != 2:
        raise ValueError(
            f"`{argument}` must be None, an integer >= 1, or a pair (input rank, recurrent "
            f"rank); received {max_rank!r}."
        )
    for value in pair:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"`{argument}` must be None, an integer >= 1, or a pair of those (input rank, "
                f"recurrent rank); received {max_rank!r}."
            )
    return tuple(None if v is None else int(v) for v in pair)


def _check_number(value, argument, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{argument}` must be a finite number; received {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{argument}` must be a number >= {minimum}; received {value!r}.")
    return float(value)


def _check_units(units):
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
        raise ValueError(f"`units` must be a positive integer; received {units!r}.")
    return int(units)


def _factored_is_smaller(rank, rows, cols):
    """Whether rank-`rank` factors store fewer numbers than the dense matrix."""
    return rank * (rows + cols) < rows * cols


# --------------------------------------------------------------------------
# one low-rank matrix with a learned threshold

def _rms(magnitudes):
    """RMS of the component magnitudes, ‖W‖_F / √r; thresholds are relative to it."""
    return ops.sqrt(ops.mean(ops.square(magnitudes)) + 1e-12)

@_register
class FactorRegularizer(keras.regularizers.Regularizer):
    """Penalty on one factor: `l2 · ‖F‖² + orthogonality · Σ_{i≠j} (f̂_i · f̂_j)²`.

    `f̂_i` are the unit-normalized components (columns of `U` for `axis=0`,
    rows of `Vᵀ` for `axis=1`). The orthogonality term keeps the components
    close to orthogonal, so the magnitudes σ̃ the threshold compares are
    close to the matrix's singular values: without it, components of a
    trained factorization overlap and cancel, and thresholding them says
    little about the rank. Computed once per batch (a variable regularizer),
    not per time step.

    >>> reg = FactorRegularizer(l2=0.0, orthogonality=1.0, axis=0)
    >>> round(float(reg(np.eye(3, 2, dtype="float32"))), 6)
    0.0
    """

    def __init__(self, l2=0.0, orthogonality=0.0, axis=0):
        self.l2 = float(l2)
        self.orthogonality = float(orthogonality)
        self.axis = int(axis)

    def __call__(self, x):
        x = ops.cast(x, "float32")
        penalty = 0.0
        if self.l2:
            penalty = self.l2 * ops.sum(ops.square(x))
        if self.orthogonality:
            unit = x * ops.rsqrt(ops.sum(ops.square(x), axis=self.axis, keepdims=True) + 1e-12)
            gram = ops.matmul(ops.transpose(unit), unit) if self.axis == 0 else ops.matmul(
                unit, ops.transpose(unit))
            off_diagonal = gram * (1.0 - ops.eye(ops.shape(gram)[0], dtype="float32"))
            penalty = penalty + self.orthogonality * ops.sum(ops.square(off_diagonal))
        return penalty

    def get_config(self):
        return {"l2": self.l2, "orthogonality": self.orthogonality, "axis": self.axis}


@_register
class LowRankMatrix(keras.layers.Layer):
    """One weight matrix `W = Û · diag(S_g(σ̃, s)) · V̂ᵀ` with a learned rank.

    Stored: `U` (rows × max_rank), `σ` (max_rank), `Vᵀ` (max_rank × cols).
    Used: unit-norm components `Û_i`, `V̂_i` with magnitudes
    `σ̃_i = σ_i·‖U_i‖·‖V_i‖`. Three choices, each measured on MNIST-1D with a
    GRU(64) steered to recurrent rank ~15/64 (one seed; docs/low_rank.md):

    - σ̃ is the whole component's magnitude, so every factor entry can grow
      it; with a lone σ on unit-norm factors, Adam grows a component by ~lr
      per step (26% instead of 49% accuracy after 3 epochs, no pruning).
    - A small orthogonality penalty (`FactorRegularizer`) keeps components
      apart, so σ̃ tracks the singular values; without it trained components
      overlap and cancel and thresholding them ended at 91.7% instead of
      96.9% accuracy.
    - The threshold is relative: `S_g(σ̃, s) = sign(σ̃)·relu(|σ̃| − g(s+b)·RMS(σ̃))`
      with `RMS(σ̃) = ‖W‖_F/√r` (the gradient flows through it). So `g` in
      (0, 1) means "smaller than the matrix's RMS component" at any scale,
      the largest component survives any sigmoid threshold (no collapse),
      and survivors cannot outrun a steered threshold by all growing (with an
      absolute threshold they grew to σ̃ ≈ 200: 92.4% instead of 95.0%).

    At build, a dense matrix drawn from `initializer` is factorized by SVD and
    its top `max_rank` components kept (split evenly over U, σ, Vᵀ), so at
    full rank the cell starts where its dense twin starts (up to the small
    initial threshold).

    It exposes what `tfs.callbacks.TargetSparsity` and `tfs.summary` read on
    STR wrappers: `threshold_logit` (trainable unless `learn_threshold=False`),
    `threshold_offset` (non-trainable, 0 unless steered), `threshold_fn`,
    `threshold()`, `threshold_value()`, `threshold_magnitudes()`,
    `is_collapsed()`. `weight_decay` adds
    `weight_decay / 2 · (‖U‖² + ‖σ‖² + ‖Vᵀ‖² + s²)` to the losses, coupled L2
    like the STR wrapper's (as variable regularizers: computed once per batch,
    not once per time step).

    Cells create two of these; use it directly only in custom cells:

    >>> m = LowRankMatrix(max_rank=3, s_init=-5.0)
    >>> m.build((8, 12))
    >>> tuple(m.matmul(np.ones((2, 8), "float32")).shape), m.rank()
    ((2, 12), 3)
    """

    def __init__(self, max_rank=None, s_init=-5.0, weight_decay=0.0, threshold_fn="sigmoid",
                 learn_threshold=True, orthogonality=1e-2, initializer="glorot_uniform",
                 role="matrix", **kwargs):
        super().__init__(**kwargs)
        self.orthogonality = _check_number(orthogonality, "orthogonality", minimum=0)
        if max_rank is not None:
            _check_rank_arg(max_rank)
        self.max_rank = None if max_rank is None else int(max_rank)
        self.s_init = _check_number(s_init, "s_init")
        self.weight_decay = _check_number(weight_decay, "weight_decay", minimum=0)
        self.threshold_fn = sparse_ops.get_threshold_fn(threshold_fn)
        self.learn_threshold = bool(learn_threshold)
        self.initializer = keras.initializers.get(initializer)
        self.role = role  # "input" / "recurrent": only for messages

    def build(self, shape):
        rows, cols = (int(d) for d in shape)
        full = min(rows, cols)
        rank = full if self.max_rank is None else self.max_rank
        if rank > full:
            raise ValueError(
                f"`max_rank` for the {self.role} matrix ({rows}x{cols}) must be <= "
                f"min({rows}, {cols}) = {full}; received {rank}."
            )
        self.rows, self.cols, self.full_rank, self.rank_limit = rows, cols, full, rank
        dense = ops.cast(self.initializer((rows, cols), dtype="float32"), "float32")
        u, sigma, vt = ops.svd(dense, full_matrices=False)
        # Balanced split of each component (norm c -> c^(1/3) in U, σ and Vᵀ):
        # the point the L2 decay on all three would settle to anyway.
        root = ops.power(sigma[:rank], 1.0 / 3.0)
        init = {"u": u[:, :rank] * root[None, :], "sigma": root, "vt": vt[:rank, :] * root[:, None]}

        def constant(name):
            return lambda shape, dtype=None: ops.cast(init[name], dtype or "float32")

        decay = keras.regularizers.L2(0.5 * self.weight_decay) if self.weight_decay else None

        def factor_penalty(axis):
            if not (self.weight_decay or self.orthogonality):
                return None
            return FactorRegularizer(0.5 * self.weight_decay, self.orthogonality, axis)

        # autocast=False: read in float32 even inside a mixed-precision
        # layer's call (the RNN's); the threshold math must not run in float16.
        self.u = self.add_weight(name="u", shape=(rows, rank), initializer=constant("u"),
                                 regularizer=factor_penalty(0), autocast=False)
        self.sigma = self.add_weight(name="sigma", shape=(rank,), initializer=constant("sigma"),
                                     regularizer=decay, autocast=False)
        self.vt = self.add_weight(name="vt", shape=(rank, cols), initializer=constant("vt"),
                                  regularizer=factor_penalty(1), autocast=False)
        self.threshold_logit = self.add_weight(
            name="threshold_logit", shape=(), dtype="float32",
            initializer=keras.initializers.Constant(self.s_init),
            trainable=self.learn_threshold, regularizer=decay, autocast=False,
        )
        self.threshold_offset = self.add_weight(
            name="threshold_offset", shape=(), dtype="float32", initializer="zeros", trainable=False,
            autocast=False,
        )

    # -- the STR protocol (same names as tfs.layers.SoftThreshold) -----------
    def threshold(self):
        """The current threshold `g(s + offset)` (float32 scalar tensor)."""
        return self.threshold_fn(self.threshold_logit + self.threshold_offset)

    def threshold_value(self):
        return float(ops.convert_to_numpy(self.threshold()))

    def threshold_magnitudes(self):
        """(|σ̃| compared with the threshold, stored weights per component), numpy.

        One component costs a column of `U`, a row of `Vᵀ` and its `σ`, so a
        steered target "sparsity" over these is the fraction of factor
        weights removed (1 − rank / max_rank).
        """
        return ops.convert_to_numpy(self.relative_magnitudes()), self.rows + self.cols + 1

    def is_collapsed(self):
        """True when every component is thresholded away (rank 0)."""
        return self.rank() == 0

    # -- math ----------------------------------------------------------------
    def _components(self):
        """(U, Vᵀ, ‖U_i‖·‖V_i‖, S_g(σ̃)), all float32."""
        u = ops.cast(self.u, "float32")
        vt = ops.cast(self.vt, "float32")
        norms = (ops.sqrt(ops.sum(ops.square(u), axis=0) + 1e-12)
                 * ops.sqrt(ops.sum(ops.square(vt), axis=1) + 1e-12))
        magnitudes = ops.cast(self.sigma, "float32") * norms
        threshold = self.threshold()
        # Pruned components enter the RMS as constants: like pruned weights in
        # STR they get no loss gradient (only their decay), also not via the scale.
        alive = ops.abs(magnitudes) > threshold * ops.stop_gradient(_rms(magnitudes))
        scale = _rms(ops.where(alive, magnitudes, ops.stop_gradient(magnitudes)))
        kept = sparse_ops.soft_threshold(magnitudes, threshold * scale)
        return u, vt, norms, kept

    def magnitudes(self):
        """σ̃ = σ·‖U_i‖·‖V_i‖, the signed magnitude of component i (float32)."""
        _, _, norms, _ = self._components()
        return ops.cast(self.sigma, "float32") * norms

    def relative_magnitudes(self):
        """|σ̃| / RMS(σ̃): what the threshold `g(s + offset)` is compared with."""
        magnitudes = self.magnitudes()
        return ops.abs(magnitudes) / _rms(magnitudes)

    def thresholded_sigma(self):
        """`S_g(σ̃, s) = sign(σ̃)·relu(|σ̃| − g(s + offset)·RMS(σ̃))`, float32."""
        return self._components()[3]

    def factors(self):
        """(left, right) float32 with `W = left @ right`; thresholded σ̃ folded into `left`."""
        u, vt, norms, kept = self._components()
        # W = Û diag(S(σ̃)) V̂ᵀ = U diag(S(σ̃) / (‖U_i‖‖V_i‖)) Vᵀ: no normalized copies needed.
        return u * (kept / norms)[None, :], vt

    def matmul(self, x, factors=None):
        """`x @ W` through the factors (`rank·(rows+cols)` MACs, not `rows·cols`)."""
        left, right = factors if factors is not None else self.factors()
        return ops.matmul(ops.matmul(x, ops.cast(left, x.dtype)), ops.cast(right, x.dtype))

    def dense_matrix(self):
        """`W` as a dense float32 numpy array (for inspection and tests)."""
        left, right = self.factors()
        return ops.convert_to_numpy(ops.matmul(left, right))

    def rank(self):
        """Learned rank: the number of nonzero thresholded σ."""
        return int(np.count_nonzero(ops.convert_to_numpy(self.thresholded_sigma())))

    def baked(self):
        """The deployable form: (left [rows, r], right [r, cols]) numpy, zeros dropped."""
        left, right = (ops.convert_to_numpy(t) for t in self.factors())
        keep = np.flatnonzero(ops.convert_to_numpy(self.thresholded_sigma()))
        return left[:, keep], right[keep, :]

    def get_config(self):
        config = super().get_config()
        config.update(
            max_rank=self.max_rank, s_init=self.s_init, weight_decay=self.weight_decay,
            threshold_fn=sparse_ops.serialize_threshold_fn(self.threshold_fn),
            learn_threshold=self.learn_threshold, orthogonality=self.orthogonality,
            initializer=keras.initializers.serialize(self.initializer), role=self.role,
        )
        return config


# --------------------------------------------------------------------------
# cell architectures: how the two projections become the next state

class _Architecture:
    """Gate math shared by the STR cells and their factorized (stripped) forms.

    A cell computes `x @ W` and `h @ U` (gates stacked along the last axis
    as in Keras) and hands them to `_combine` as lists of per-gate
    `units`-wide blocks; `_combine` adds biases and applies the gates.
    """

    gates = 1
    kind = None

    def _init_architecture(self, units, activation, recurrent_activation):
        self.units = _check_units(units)
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.output_size = self.units

    def _architecture_config(self):
        return {
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
        }

    def _bias(self, name, shape, initializer):
        return self.add_weight(name=name, shape=shape, initializer=initializer)

    def _gate_slices(self, tensor):
        """Split the last axis into the gates' `units`-wide blocks."""
        return [tensor[..., g * self.units:(g + 1) * self.units] for g in range(self.gates)]

    def get_initial_state(self, batch_size=None):
        sizes = self.state_size if isinstance(self.state_size, (list, tuple)) else [self.state_size]
        return [ops.zeros((batch_size, d), dtype=self.compute_dtype) for d in sizes]


class _GRU(_Architecture):
    """Keras' GRU (reset gate after the recurrent matmul: `reset_after=True`)."""

    gates = 3
    kind = "GRU"
    bias_names = ("bias",)

    def _init_state(self):
        self.state_size = self.units

    def _build_biases(self):
        # Separate input / recurrent biases, Keras' (2, 3·units) layout.
        self.bias = self._bias("bias", (2, 3 * self.units), "zeros")

    def _combine(self, xw, hu, states):
        h = states[0] if isinstance(states, (list, tuple)) else states
        bias = ops.cast(self.bias, h.dtype)
        x_z, x_r, x_h = (x + b for x, b in zip(xw, self._gate_slices(bias[0])))
        h_z, h_r, h_h = (x + b for x, b in zip(hu, self._gate_slices(bias[1])))
        z = self.recurrent_activation(x_z + h_z)
        r = self.recurrent_activation(x_r + h_r)
        candidate = self.activation(x_h + r * h_h)
        new_h = z * h + (1.0 - z) * candidate
        return new_h, [new_h] if isinstance(states, (list, tuple)) else new_h


class _LSTM(_Architecture):
    """Keras' LSTM: gates (i, f, c, o), forget-gate bias initialized to 1."""

    gates = 4
    kind = "LSTM"
    bias_names = ("bias",)

    def _init_state(self):
        self.state_size = [self.units, self.units]

    def _build_biases(self):
        units = self.units

        def unit_forget_bias(shape, dtype=None):
            return ops.cast(ops.concatenate(
                [ops.zeros((units,)), ops.ones((units,)), ops.zeros((2 * units,))]), dtype or "float32")

        self.bias = self._bias("bias", (4 * self.units,), unit_forget_bias)

    def _combine(self, xw, hu, states):
        h, c = states
        bias = self._gate_slices(ops.cast(self.bias, h.dtype))
        z_i, z_f, z_c, z_o = (x + u + b for x, u, b in zip(xw, hu, bias))
        i = self.recurrent_activation(z_i)
        f = self.recurrent_activation(z_f)
        c = f * c + i * self.activation(z_c)
        o = self.recurrent_activation(z_o)
        new_h = o * self.activation(c)
        return new_h, [new_h, c]


class _FastGRNN(_Architecture):
    """FastGRNN (Kusupati et al., NeurIPS 2018): one W, one U shared by both gates.

        z  = σ(Wx + Uh + b_g),   c = tanh(Wx + Uh + b_u)
        h' = z ⊙ h + (σ(ζ)(1 − z) + σ(ν)) ⊙ c

    ζ, ν are trainable scalars; initial values and the all-ones biases follow
    the authors' EdgeML code (ζ = 1, ν = −4).
    """

    gates = 1
    kind = "FastGRNN"
    bias_names = ("bias_gate", "bias_update", "zeta", "nu")

    def _init_state(self):
        self.state_size = self.units

    def _build_biases(self):
        self.bias_gate = self._bias("bias_gate", (self.units,), "ones")
        self.bias_update = self._bias("bias_update", (self.units,), "ones")
        self.zeta = self.add_weight(name="zeta", shape=(),
                                    initializer=keras.initializers.Constant(self.zeta_init))
        self.nu = self.add_weight(name="nu", shape=(), initializer=keras.initializers.Constant(self.nu_init))

    def _combine(self, xw, hu, states):
        h = states[0] if isinstance(states, (list, tuple)) else states
        pre = xw[0] + hu[0]
        z = self.recurrent_activation(pre + ops.cast(self.bias_gate, pre.dtype))
        c = self.activation(pre + ops.cast(self.bias_update, pre.dtype))
        zeta = ops.cast(ops.sigmoid(ops.cast(self.zeta, "float32")), pre.dtype)
        nu = ops.cast(ops.sigmoid(ops.cast(self.nu, "float32")), pre.dtype)
        new_h = z * h + (zeta * (1.0 - z) + nu) * c
        return new_h, [new_h] if isinstance(states, (list, tuple)) else new_h

    def _architecture_config(self):
        config = super()._architecture_config()
        config.update(zeta_init=self.zeta_init, nu_init=self.nu_init)
        return config


# --------------------------------------------------------------------------
# STR cells

class _LowRankCell(keras.layers.Layer):
    """Base of the STR cells: two `LowRankMatrix` projections + `_combine`."""

    def __init__(self, units, max_rank=None, s_init=-5.0, weight_decay=0.0, threshold_fn="sigmoid",
                 learn_threshold=True, orthogonality=1e-2, activation="tanh", recurrent_activation="sigmoid",
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal", **kwargs):
        super().__init__(**kwargs)
        self._init_architecture(units, activation, recurrent_activation)
        self._init_state()
        self.max_rank = _check_rank_arg(max_rank)
        common = dict(s_init=s_init, weight_decay=weight_decay, threshold_fn=threshold_fn,
                      learn_threshold=learn_threshold, orthogonality=orthogonality,
                      dtype=self.dtype_policy)
        self.input_matrix = LowRankMatrix(self.max_rank[0], initializer=kernel_initializer,
                                          role="input", name="input_matrix", **common)
        self.recurrent_matrix = LowRankMatrix(self.max_rank[1], initializer=recurrent_initializer,
                                              role="recurrent", name="recurrent_matrix", **common)
        self._factor_cache = None
        # Thresholds and factors are read in float32; `call` casts for compute.
        self.autocast = False

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError("The last (feature) axis of the cell's inputs must be known.")
        width = self.gates * self.units
        self.input_matrix.build((int(input_dim), width))
        self.recurrent_matrix.build((self.units, width))
        self._build_biases()

    # -- STR protocol --------------------------------------------------------
    def thresholded_matrices(self):
        """The cell's `LowRankMatrix` objects that steering may prune.

        A matrix of full rank 1 (the input matrix of a 1-feature sequence) is
        left out: its only component is the input's only path, so a shared
        steered threshold could only cut the layer off.
        """
        return [m for m in self.matrices() if m.full_rank > 1]

    def matrices(self):
        """Both `LowRankMatrix` objects: (input, recurrent)."""
        return [self.input_matrix, self.recurrent_matrix]

    def ranks(self):
        """Learned ranks (input, recurrent)."""
        return tuple(m.rank() for m in self.matrices())

    def max_ranks(self):
        return tuple(m.rank_limit for m in self.matrices())

    @contextlib.contextmanager
    def cached_factors(self):
        """Compute the thresholded factors once for a whole sequence.

        Inside `keras.layers.RNN` a cell's `call` runs once per time step;
        the convenience layers wrap their loop in this so the thresholds and
        factor norms are not recomputed at every step.
        """
        previous = self._factor_cache
        self._factor_cache = [m.factors() for m in self.matrices()]
        try:
            yield
        finally:
            self._factor_cache = previous

    def call(self, inputs, states, training=False):
        h = states[0] if isinstance(states, (list, tuple)) else states
        cache = self._factor_cache or (None, None)
        xw = self.input_matrix.matmul(inputs, cache[0])
        hu = self.recurrent_matrix.matmul(h, cache[1])
        # Training: one matmul for all gates, then split.
        return self._combine(ops.split(xw, self.gates, axis=-1), ops.split(hu, self.gates, axis=-1),
                             states)

    # -- strip / summary -----------------------------------------------------
    def stripped_cell(self, projection="matmul"):
        """A built `Factorized*Cell` holding only the rank-r factors; same outputs.

        Each matrix becomes two dense factors `[rows, r]`, `[r, cols]` (σ
        folded in), or one dense `[rows, cols]` matrix where that stores
        fewer numbers (e.g. a 1-feature input matrix). `projection`: see
        `FactorizedGRUCell` ("conv" is the int8 export form).
        """
        weights, ranks = [], []
        for matrix in self.matrices():
            left, right = matrix.baked()
            rank = left.shape[1]
            if rank == 0 or _factored_is_smaller(rank, matrix.rows, matrix.cols):
                ranks.append(rank)
                weights.append([left, right] if rank else [])
            else:
                ranks.append(None)
                weights.append([left @ right])
        config = self._architecture_config()
        config.update(input_rank=ranks[0], recurrent_rank=ranks[1], name=self.name,
                      dtype=self.dtype_policy, projection=projection)
        cell = self.stripped_class(**config)
        cell.build((None, self.input_matrix.rows))
        for variable, value in zip(cell.kernel_weights + cell.recurrent_weights, weights[0] + weights[1]):
            variable.assign(value.astype(variable.dtype))
        for name in self.bias_names:
            getattr(cell, name).assign(ops.convert_to_numpy(getattr(self, name)))
        return cell

    def summary_row(self, timesteps=None, name=None):
        """A `tfs.summary` row: params, MACs at the learned rank, ranks.

        `prunable` counts the entries of the dense matrices the factors stand
        for and `nonzeros` the numbers the stripped cell stores for them, so
        the row's "sparsity" is the compression of the matrices. MACs are per
        example: per step times `timesteps` (per step if unknown).
        """
        return _summary_row(self, timesteps, name)

    def get_config(self):
        config = super().get_config()
        config.update(self._architecture_config())
        m = self.input_matrix
        config.update(
            max_rank=list(self.max_rank), s_init=m.s_init, weight_decay=m.weight_decay,
            threshold_fn=sparse_ops.serialize_threshold_fn(m.threshold_fn),
            learn_threshold=m.learn_threshold, orthogonality=m.orthogonality,
            kernel_initializer=keras.initializers.serialize(self.input_matrix.initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_matrix.initializer),
        )
        return config


def _summary_row(cell, timesteps, name):
    """Summary of a low-rank or factorized cell (stored params, MACs per example)."""
    dims = cell.matrix_shapes()
    ranks = cell.ranks()
    steps = timesteps or 1
    dense_entries = sum(r * c for r, c in dims)
    # What the stripped cell stores per matrix: dense, rank-r factors, or nothing.
    stored = sum(rows * cols if rank is None else min(rank * (rows + cols), rows * cols)
                 for (rows, cols), rank in zip(dims, ranks))
    bookkeeping = set()
    if isinstance(cell, _LowRankCell):  # thresholds are bookkeeping, not params
        bookkeeping = {id(v) for m in cell.matrices()
                       for v in (m.threshold_logit, m.threshold_offset)}
    trained = [w for w in cell.weights if id(w) not in bookkeeping]
    params = sum(int(np.prod(w.shape)) for w in trained)
    nbytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in trained)
    limits = cell.max_ranks()
    rank_text = ", ".join(  # "input, recurrent"; a matrix stored dense says so
        f"{limit}/{limit} dense" if r is None else f"{r}/{limit}" for r, limit in zip(ranks, limits))
    threshold = None
    if isinstance(cell, _LowRankCell):
        threshold = cell.recurrent_matrix.threshold_value()
    return LayerReport(
        name=name or cell.name, type=type(cell).__name__, params=params,
        prunable=dense_entries, nonzeros=stored, threshold=threshold,
        flops=dense_entries * steps, effective_flops=stored * steps, bytes=nbytes, rank=rank_text,
    )


# --------------------------------------------------------------------------
# factorized (stripped, deployable) cells

PROJECTIONS = ("matmul", "conv")


def _conv_matmul(x, w):
    """`x @ w` (x: [batch, k], w: [k, n]) as a 1x1 convolution: one CONV_2D op in TFLite.

    The int8 export form of the factorized cells (`projection="conv"`).
    Measured (tflite-micro vs ai_edge_litert 2.3 BUILTIN_REF, one int8 op
    with identical inputs): FULLY_CONNECTED outputs differ by one step in
    ~0.1-0.2% of elements (LiteRT's reference FULLY_CONNECTED rounds the
    requantization once, `(acc·M + 2^(s-1)) >> s`; tflite-micro rounds twice,
    gemmlowp's doubling high multiply then a rounding shift), which an
    unrolled recurrence compounds to tens of steps; CONV_2D, ADD, SUB and
    TANH agree bit for bit, MUL and LOGISTIC differ only at rare near-ties
    (docs/low_rank.md).
    """
    k, n = w.shape
    y = ops.conv(ops.reshape(x, (-1, 1, 1, k)), ops.reshape(ops.cast(w, x.dtype), (1, 1, k, n)),
                 padding="valid", data_format="channels_last")
    return ops.reshape(y, (-1, n))


class _FactorizedCell(keras.layers.Layer):
    """Base of the deployable cells: per matrix, dense, rank-r factors, or nothing.

    `projection`: "matmul" (FULLY_CONNECTED in TFLite) or "conv" (the int8
    export form, see `_conv_matmul`).
    """

    def __init__(self, units, input_rank=None, recurrent_rank=None, activation="tanh",
                 recurrent_activation="sigmoid", kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", projection="matmul", **kwargs):
        super().__init__(**kwargs)
        self._init_architecture(units, activation, recurrent_activation)
        self._init_state()
        if projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}; received {projection!r}.")
        self.projection = projection
        for argument, value in (("input_rank", input_rank), ("recurrent_rank", recurrent_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 0):
                raise ValueError(f"`{argument}` must be None (dense) or an integer >= 0; "
                                 f"received {value!r}.")
        self.input_rank = None if input_rank is None else int(input_rank)
        self.recurrent_rank = None if recurrent_rank is None else int(recurrent_rank)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)

    def _matrix(self, name, rows, cols, rank, initializer):
        if rank is None:
            return (self.add_weight(name=name, shape=(rows, cols), initializer=initializer),)
        if rank > min(rows, cols):
            arg = "input_rank" if name == "kernel" else "recurrent_rank"
            raise ValueError(f"`{arg}` must be <= min({rows}, {cols}); received {rank}.")
        if rank == 0:  # thresholded away entirely: contributes nothing
            return ()
        return (self.add_weight(name=f"{name}_left", shape=(rows, rank), initializer=initializer),
                self.add_weight(name=f"{name}_right", shape=(rank, cols), initializer=initializer))

    def build(self, input_shape):
        input_dim = int(input_shape[-1])
        width = self.gates * self.units
        self.input_dim = input_dim
        self.kernel_weights = self._matrix("kernel", input_dim, width, self.input_rank,
                                           self.kernel_initializer)
        self.recurrent_weights = self._matrix("recurrent_kernel", self.units, width,
                                              self.recurrent_rank, self.recurrent_initializer)
        self._build_biases()

    def _project(self, x, weights):
        """Per-gate `x @ W_g`: one matmul per gate (after the shared `x @ left`).

        Per gate, not one wide matmul + split: in full-int8 conversion the
        converter sometimes left SPLIT in float (DEQUANTIZE / QUANTIZE around
        it), and separate ops give each gate its own scale. Each product is a
        FULLY_CONNECTED op, or a 1x1 CONV_2D with `projection="conv"`.
        """
        if not weights:  # matrix thresholded away entirely
            zeros = ops.zeros((ops.shape(x)[0], self.units), dtype=x.dtype)
            return [zeros] * self.gates
        matmul = _conv_matmul if self.projection == "conv" else ops.matmul
        if len(weights) == 2:
            x = matmul(x, weights[0])
        return [matmul(x, w) for w in self._gate_slices(weights[-1])]

    def call(self, inputs, states, training=False):
        h = states[0] if isinstance(states, (list, tuple)) else states
        xw = self._project(inputs, self.kernel_weights)
        hu = self._project(h, self.recurrent_weights)
        return self._combine(xw, hu, states)

    def matrix_shapes(self):
        width = self.gates * self.units
        return [(self.input_dim, width), (self.units, width)]

    def ranks(self):
        return (self.input_rank, self.recurrent_rank)

    def max_ranks(self):
        return tuple(min(r, c) for r, c in self.matrix_shapes())

    def summary_row(self, timesteps=None, name=None):
        """A `tfs.summary` row (see `LowRankGRUCell.summary_row`)."""
        return _summary_row(self, timesteps, name)

    def get_config(self):
        config = super().get_config()
        config.update(self._architecture_config())
        config.update(
            input_rank=self.input_rank, recurrent_rank=self.recurrent_rank,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            projection=self.projection,
        )
        return config


def _low_rank_matrix_shapes(self):
    return [(m.rows, m.cols) for m in self.matrices()]


_LowRankCell.matrix_shapes = _low_rank_matrix_shapes


@_register
class FactorizedGRUCell(_GRU, _FactorizedCell):
    """Deployable GRU cell (Keras' `reset_after=True` math) with rank-r factored matrices.

    `input_rank` / `recurrent_rank`: None stores the matrix dense (then this
    is exactly `keras.layers.GRUCell`), r >= 1 stores `[rows, r]` and
    `[r, 3·units]` factors, 0 drops the matrix. `tfs.strip` creates these
    from `LowRankGRUCell`; they also train as ordinary fixed-rank cells.
    `projection`: "matmul" (default) or "conv", the int8 export form: each
    product a 1x1 CONV_2D, which tflite-micro and LiteRT's reference kernels
    compute bit for bit alike (their int8 FULLY_CONNECTED kernels round
    differently, and a recurrence compounds that); same weights and outputs.

    >>> cell = FactorizedGRUCell(8, input_rank=None, recurrent_rank=2)
    >>> tuple(keras.layers.RNN(cell)(np.zeros((1, 5, 3), "float32")).shape)
    (1, 8)
    """


@_register
class FactorizedLSTMCell(_LSTM, _FactorizedCell):
    """Deployable LSTM cell (Keras' math) with rank-r factored matrices.

    See `FactorizedGRUCell` for the rank arguments.

    >>> rnn = keras.layers.RNN(FactorizedLSTMCell(8, recurrent_rank=2))
    >>> tuple(rnn(np.zeros((1, 5, 3), "float32")).shape)
    (1, 8)
    """


@_register
class FactorizedFastGRNNCell(_FastGRNN, _FactorizedCell):
    """Deployable FastGRNN cell with rank-r factored `W`, `U`.

    With both ranks None this is the dense FastGRNN of the paper.

    >>> tuple(keras.layers.RNN(FactorizedFastGRNNCell(8))(np.zeros((1, 5, 3), "float32")).shape)
    (1, 8)
    """

    def __init__(self, units, input_rank=None, recurrent_rank=None, zeta_init=1.0, nu_init=-4.0,
                 **kwargs):
        self.zeta_init = _check_number(zeta_init, "zeta_init")
        self.nu_init = _check_number(nu_init, "nu_init")
        super().__init__(units, input_rank=input_rank, recurrent_rank=recurrent_rank, **kwargs)


@_register
class LowRankGRUCell(_GRU, _LowRankCell):
    """GRU cell whose input and recurrent matrices learn their rank (low-rank STR).

    Math is Keras' `GRUCell` (`reset_after=True`), with the stacked input
    kernel (`input_dim × 3·units`) and recurrent kernel (`units × 3·units`)
    each a `LowRankMatrix`: `U · diag(S_g(σ, s)) · Vᵀ`, one learned threshold
    per matrix.

    Args:
        units: hidden size.
        max_rank: None (full rank), an int for both matrices, or a pair
            `(input rank, recurrent rank)`; each must be in
            `[1, min(matrix dims)]` (a 1-feature input has rank at most 1:
            pass e.g. `(None, 16)`).
        s_init: initial threshold logit (sigmoid(−5) = 0.0067: starts dense).
        weight_decay: coupled L2 on σ and on the threshold logits, as the STR
            wrapper's; it is what raises the thresholds during training.
        threshold_fn: "sigmoid" (default; thresholds below 1), "exponential",
            or a serializable callable.
        learn_threshold: train `s` (the paper) or keep it fixed, leaving
            `threshold_offset` to `TargetSparsity`-style steering.
        activation, recurrent_activation, kernel_initializer,
        recurrent_initializer: as in `keras.layers.GRUCell`.

    >>> cell = LowRankGRUCell(16, max_rank=(None, 4))
    >>> tuple(keras.layers.RNN(cell)(np.zeros((2, 10, 3), "float32")).shape)
    (2, 16)
    >>> cell.ranks(), cell.max_ranks()
    ((3, 4), (3, 4))
    """

    stripped_class = FactorizedGRUCell


@_register
class LowRankLSTMCell(_LSTM, _LowRankCell):
    """LSTM cell whose input and recurrent matrices learn their rank (low-rank STR).

    Keras' `LSTMCell` math (gates i, f, c, o; forget bias 1). Arguments as
    in `LowRankGRUCell`.

    >>> cell = LowRankLSTMCell(16, max_rank=(None, 4))
    >>> tuple(keras.layers.RNN(cell)(np.zeros((2, 10, 3), "float32")).shape)
    (2, 16)
    """

    stripped_class = FactorizedLSTMCell


@_register
class FastGRNNCell(_FastGRNN, _LowRankCell):
    """FastGRNN cell with low-rank STR on `W` and `U` (each learns its rank).

        z  = σ(Wx + Uh + b_g),   c = tanh(Wx + Uh + b_u)
        h' = z ⊙ h + (σ(ζ)(1 − z) + σ(ν)) ⊙ c

    Arguments as in `LowRankGRUCell`, plus `zeta_init` (1.0) and `nu_init`
    (−4.0), the initial values of the trainable scalars ζ, ν.

    >>> cell = FastGRNNCell(16, max_rank=(None, 4))
    >>> tuple(keras.layers.RNN(cell)(np.zeros((2, 10, 3), "float32")).shape)
    (2, 16)
    """

    stripped_class = FactorizedFastGRNNCell

    def __init__(self, units, max_rank=None, zeta_init=1.0, nu_init=-4.0, **kwargs):
        self.zeta_init = _check_number(zeta_init, "zeta_init")
        self.nu_init = _check_number(nu_init, "nu_init")
        super().__init__(units, max_rank=max_rank, **kwargs)


# --------------------------------------------------------------------------
# RNN-level helpers (work for any keras.layers.RNN holding these cells)

def _timesteps(layer):
    try:
        return layer.input.shape[1]
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _rnn_kwargs(layer):
    return dict(return_sequences=layer.return_sequences, return_state=layer.return_state,
                go_backwards=layer.go_backwards, stateful=layer.stateful, unroll=layer.unroll,
                zero_output_for_mask=layer.zero_output_for_mask)


def stripped_rnn(layer, unroll=None, projection=None):
    """`keras.layers.RNN(stripped cell)` for an RNN layer with a low-rank STR cell.

    The result is a built plain `keras.layers.RNN` with the same flags
    (`return_sequences`, ...), holding a `Factorized*Cell` with the learned
    rank-r factors; outputs equal the input layer's. `unroll` overrides the
    layer's flag: exporters pass `unroll=True` to get plain ops instead of a
    WHILE loop (needs a static sequence length). `projection` is the cell's
    (see `FactorizedGRUCell`); None means "conv" when the result is unrolled
    (the export form: 1x1 CONV_2D ops, which tflite-micro and LiteRT's
    reference kernels compute identically in int8) and "matmul" otherwise.

    >>> rnn = keras.layers.RNN(LowRankGRUCell(8, max_rank=(None, 2)))
    >>> _ = rnn(np.zeros((1, 5, 3), "float32"))
    >>> type(stripped_rnn(rnn, unroll=True).cell).__name__
    'FactorizedGRUCell'
    """
    cell = getattr(layer, "cell", None)
    if not hasattr(cell, "stripped_cell"):
        raise TypeError(f"`layer` must be an RNN layer with a low-rank STR cell; received "
                        f"{type(layer).__name__} with cell {type(cell).__name__}.")
    kwargs = _rnn_kwargs(layer)
    if unroll is not None:
        kwargs["unroll"] = bool(unroll)
    if projection is None:
        projection = "conv" if kwargs["unroll"] else "matmul"
    new = keras.layers.RNN(cell.stripped_cell(projection), name=layer.name, dtype=layer.dtype_policy,
                           **kwargs)
    new.build((None, None, cell.input_matrix.rows))
    return new


def thresholded_matrices(model):
    """Every `LowRankMatrix` in `model` (through convenience layers and `RNN(cell)`).

    What `tfs.callbacks.TargetSparsity` steers alongside STR wrappers.

    >>> m = keras.Sequential([keras.Input((5, 3)), LowRankGRU(4), keras.layers.Dense(2)])
    >>> [x.role for x in thresholded_matrices(m)]
    ['input', 'recurrent']
    """
    from tf_sparsity import prunable  # the one place that flattens models

    found = []
    for layer in prunable.iter_layers(model):
        owner = layer if hasattr(layer, "thresholded_matrices") else getattr(layer, "cell", None)
        if hasattr(owner, "thresholded_matrices"):
            found.extend(owner.thresholded_matrices())
    return found


def rnn_summary_row(layer):
    """The `tfs.summary` row of any RNN layer whose cell has `summary_row`."""
    return layer.cell.summary_row(timesteps=_timesteps(layer), name=layer.name)


# --------------------------------------------------------------------------
# convenience layers

_BASE_ARGS = ("name", "dtype", "trainable")


class _LowRankRNN(keras.layers.RNN):
    """`keras.layers.RNN` that builds its STR cell and caches its factors per call."""

    cell_class = None

    def __init__(self, units, max_rank=None, return_sequences=False, return_state=False,
                 go_backwards=False, stateful=False, unroll=False, zero_output_for_mask=False,
                 **kwargs):
        base = {k: kwargs.pop(k) for k in _BASE_ARGS if k in kwargs}
        cell = self.cell_class(units, max_rank=max_rank, dtype=base.get("dtype"),
                               name="cell", **kwargs)
        super().__init__(cell, return_sequences=return_sequences, return_state=return_state,
                         go_backwards=go_backwards, stateful=stateful, unroll=unroll,
                         zero_output_for_mask=zero_output_for_mask, **base)

    @property
    def units(self):
        return self.cell.units

    def inner_loop(self, sequences, initial_state, mask, training=False):
        # Thresholds and factor norms are loop invariants: compute them once.
        with self.cell.cached_factors():
            return super().inner_loop(sequences, initial_state, mask, training=training)

    def thresholded_matrices(self):
        return self.cell.thresholded_matrices()

    def ranks(self):
        """Learned ranks (input, recurrent)."""
        return self.cell.ranks()

    def max_ranks(self):
        return self.cell.max_ranks()

    def stripped_layer(self, unroll=None, projection=None):
        """Plain `keras.layers.RNN(Factorized*Cell)`, built, same outputs (see `stripped_rnn`)."""
        return stripped_rnn(self, unroll=unroll, projection=projection)

    def summary_row(self):
        return rnn_summary_row(self)

    def get_config(self):
        config = super().get_config()
        config.pop("cell")
        cell_config = self.cell.get_config()
        for key in ("name", "dtype", "trainable"):
            cell_config.pop(key, None)
        config.update(cell_config)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


@_register
class LowRankGRU(_LowRankRNN):
    """`keras.layers.RNN(LowRankGRUCell(...))` in one layer.

    Takes `LowRankGRUCell`'s arguments plus the RNN flags
    (`return_sequences`, `return_state`, `go_backwards`, `stateful`,
    `unroll`). `tfs.strip` turns it into `keras.layers.RNN(FactorizedGRUCell)`.

    >>> layer = LowRankGRU(16, max_rank=(None, 8), weight_decay=1e-3)
    >>> tuple(layer(np.zeros((2, 40, 1), "float32")).shape), layer.ranks()
    ((2, 16), (1, 8))
    """

    cell_class = LowRankGRUCell


@_register
class LowRankLSTM(_LowRankRNN):
    """`keras.layers.RNN(LowRankLSTMCell(...))` in one layer (see `LowRankGRU`).

    >>> tuple(LowRankLSTM(16, max_rank=(None, 8))(np.zeros((2, 40, 1), "float32")).shape)
    (2, 16)
    """

    cell_class = LowRankLSTMCell


@_register
class FastGRNN(_LowRankRNN):
    """`keras.layers.RNN(FastGRNNCell(...))` in one layer (see `LowRankGRU`).

    >>> tuple(FastGRNN(16, max_rank=(None, 8))(np.zeros((2, 40, 1), "float32")).shape)
    (2, 16)
    """

    cell_class = FastGRNNCell


def low_rank_rnns(model):
    """`model` with every Keras `GRU` / `LSTM` replaced by `LowRankGRU` / `LowRankLSTM`.

    Each new layer starts as the SVD of the old layer's trained matrices (same
    outputs at full rank, up to the tiny initial threshold) and is set up for
    steering (`threshold_fn="exponential"`, `s_init=-10`,
    `learn_threshold=False`): train it with `tfs.callbacks.TargetSparsity`.
    What `tf-sparsity prune --method lowrank` does.

    >>> m = keras.Sequential([keras.Input((10, 1)), keras.layers.GRU(4), keras.layers.Dense(2)])
    >>> type(low_rank_rnns(m).layers[0]).__name__
    'LowRankGRU'
    """
    from tf_sparsity import surgery

    kinds = {keras.layers.GRU: LowRankGRU, keras.layers.LSTM: LowRankLSTM}
    found = []

    def replace(layer):
        cls = kinds.get(type(layer))
        if cls is None:
            return None
        if isinstance(layer, keras.layers.GRU) and not layer.cell.reset_after:
            raise ValueError(f"GRU '{layer.name}' has reset_after=False; low-rank GRU cells use Keras' "
                             "reset_after=True math.")
        found.append(layer.name)
        kernel, recurrent_kernel = (np.asarray(w) for w in layer.get_weights()[:2])
        return cls(layer.units, return_sequences=layer.return_sequences, go_backwards=layer.go_backwards,
                   threshold_fn="exponential", s_init=-10.0, learn_threshold=False,
                   activation=keras.activations.serialize(layer.cell.activation),
                   recurrent_activation=keras.activations.serialize(layer.cell.recurrent_activation),
                   kernel_initializer=keras.initializers.Constant(kernel),
                   recurrent_initializer=keras.initializers.Constant(recurrent_kernel), name=layer.name)

    def transfer(old, new):
        if isinstance(new, _LowRankRNN):
            new.cell.bias.assign(old.cell.bias)
        else:
            surgery.transfer_weights(old, new)

    result = surgery.map_layers(model, replace, transfer=transfer)
    if not found:
        raise ValueError("`model` has no keras.layers.GRU or LSTM layer to make low-rank.")
    return result
