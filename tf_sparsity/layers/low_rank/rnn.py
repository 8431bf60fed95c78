"""RNN-level helpers (any `keras.layers.RNN` holding these cells) and the
convenience layers `LowRankGRU`, `LowRankLSTM`, `FastGRNN`."""

import keras
import numpy as np  # noqa: F401  (the docstring examples use it)

from tf_sparsity import prunable
from tf_sparsity.layers.low_rank.cells import FastGRNNCell, LowRankGRUCell, LowRankLSTMCell
from tf_sparsity.protocols import HoldsSteerables, StrippableCell

_register = keras.saving.register_keras_serializable(package="tf_sparsity")


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
    cell = prunable.protocol_owner(layer, StrippableCell)
    if cell is None or cell is layer:
        raise TypeError(f"`layer` must be an RNN layer with a low-rank STR cell; received "
                        f"{type(layer).__name__} with cell {type(getattr(layer, 'cell', None)).__name__}.")
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
    found = []
    for layer in prunable.iter_layers(model):
        owner = prunable.protocol_owner(layer, HoldsSteerables)
        if owner is not None:
            found.extend(owner.thresholded_matrices())
    return found


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
