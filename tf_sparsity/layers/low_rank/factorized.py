"""Deployable cells: per matrix dense, rank-r factors, or nothing; no thresholds.

`tfs.strip` produces them from the STR cells; with ranks None they are
ordinary dense cells (also how a dense FastGRNN is trained)."""

import keras
import numpy as np
from keras import ops

from tf_sparsity.layers.low_rank.architecture import _GRU, _LSTM, _FastGRNN, cell_report
from tf_sparsity.layers.low_rank.checks import _check_number

_register = keras.saving.register_keras_serializable(package="tf_sparsity")


PROJECTIONS = ("matmul", "conv", "joint")


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

    `projection`: "matmul" (FULLY_CONNECTED in TFLite), "conv" (the int8
    export form of unrolled models, see `_conv_matmul`) or "joint" (the step
    form's: see `_joint_call`).
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
        if self.projection == "joint" and self.kernel_weights and self.recurrent_weights:
            return self._joint_call(inputs, h, states)
        xw = self._project(inputs, self.kernel_weights)
        hu = self._project(h, self.recurrent_weights)
        return self._combine(xw, hu, states)

    def _joint_call(self, x, h, states):
        """One product per summed gate: `[x·Lx, h·Lh] @ [Rx_g; Rh_g]` (L, R: the factors, or x / W dense).

        The same math as two products and an add; in TFLite one CONCATENATION
        and one FULLY_CONNECTED per such gate instead of two FULLY_CONNECTED
        and an ADD: fewer nodes, tensors and per-op data in a tflite-micro
        arena (the demo low-rank GRU step model: docs/benchmarks.md, issue
        14). The factors are stored as before (the stacked right factor is
        no larger than the two).
        """
        left = [ops.matmul(v, w[0]) if len(w) == 2 else v
                for v, w in ((x, self.kernel_weights), (h, self.recurrent_weights))]
        both = ops.concatenate(left, axis=-1)
        rights = [self._gate_slices(w[-1]) for w in (self.kernel_weights, self.recurrent_weights)]
        joint = [ops.matmul(both, ops.concatenate([rights[0][g], rights[1][g]], axis=0))
                 if g in self.joint_gates else None for g in range(self.gates)]
        xw, hu = ([None if g in self.joint_gates else ops.matmul(v, r[g]) for g in range(self.gates)]
                  for v, r in zip(left, rights))
        return self._combine(xw, hu, states, joint=joint)

    def matrix_shapes(self):
        width = self.gates * self.units
        return [(self.input_dim, width), (self.units, width)]

    def ranks(self):
        return (self.input_rank, self.recurrent_rank)

    def max_ranks(self):
        return tuple(min(r, c) for r, c in self.matrix_shapes())

    def summary_row(self, timesteps=None, name=None):
        """A `tfs.summary` row (see `LowRankGRUCell.summary_row`)."""
        return cell_report(self, timesteps, name)

    def bookkeeping_weights(self):
        return []

    def threshold_value(self):
        return None

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
