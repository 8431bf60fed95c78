"""Wrappers that make a Keras layer's kernels sparse."""

from tf_sparsity.layers.kernel_wrapper import KernelWrapper
from tf_sparsity.layers.low_rank import (
    FactorRegularizer,
    FactorizedFastGRNNCell,
    FactorizedGRUCell,
    FactorizedLSTMCell,
    FastGRNN,
    FastGRNNCell,
    LowRankGRU,
    LowRankGRUCell,
    LowRankLSTM,
    LowRankLSTMCell,
    LowRankMatrix,
)
from tf_sparsity.layers.masked import Masked
from tf_sparsity.layers.soft_threshold import SoftThreshold

__all__ = [
    "KernelWrapper", "Masked", "SoftThreshold",
    "LowRankGRUCell", "LowRankLSTMCell", "FastGRNNCell", "LowRankGRU", "LowRankLSTM", "FastGRNN",
    "FactorizedGRUCell", "FactorizedLSTMCell", "FactorizedFastGRNNCell", "LowRankMatrix", "FactorRegularizer",
]
