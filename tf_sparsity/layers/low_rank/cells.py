"""STR cells for training: each matrix a `LowRankMatrix` that learns its rank."""

import contextlib

import keras
import numpy as np  # noqa: F401  (the docstring examples use it)
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity.layers.low_rank.architecture import _GRU, _LSTM, _FastGRNN, cell_report
from tf_sparsity.layers.low_rank.checks import _check_number, _check_rank_arg, _factored_is_smaller
from tf_sparsity.layers.low_rank.factorized import (
    FactorizedFastGRNNCell,
    FactorizedGRUCell,
    FactorizedLSTMCell,
)
from tf_sparsity.layers.low_rank.matrix import LowRankMatrix

_register = keras.saving.register_keras_serializable(package="tf_sparsity")


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
        return cell_report(self, timesteps, name)

    def matrix_shapes(self):
        return [(m.rows, m.cols) for m in self.matrices()]

    def bookkeeping_weights(self):
        """The thresholds: counted in no summary's params."""
        return [v for m in self.matrices() for v in (m.threshold_logit, m.threshold_offset)]

    def threshold_value(self):
        """The recurrent matrix's threshold (the one a summary row shows)."""
        return self.recurrent_matrix.threshold_value()

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
