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

Three families of classes, one module each (`matrix` holds `LowRankMatrix`,
`architecture` the gate math they share):

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

from tf_sparsity.layers.low_rank.cells import FastGRNNCell, LowRankGRUCell, LowRankLSTMCell
from tf_sparsity.layers.low_rank.factorized import (
    PROJECTIONS,
    FactorizedFastGRNNCell,
    FactorizedGRUCell,
    FactorizedLSTMCell,
)
from tf_sparsity.layers.low_rank.matrix import FactorRegularizer, LowRankMatrix
from tf_sparsity.layers.low_rank.rnn import (
    FastGRNN,
    LowRankGRU,
    LowRankLSTM,
    stripped_rnn,
    thresholded_matrices,
)

__all__ = [
    "LowRankMatrix", "FactorRegularizer",
    "LowRankGRUCell", "LowRankLSTMCell", "FastGRNNCell",
    "LowRankGRU", "LowRankLSTM", "FastGRNN",
    "FactorizedGRUCell", "FactorizedLSTMCell", "FactorizedFastGRNNCell", "PROJECTIONS",
    "stripped_rnn", "thresholded_matrices",
]
