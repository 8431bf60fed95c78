"""Low-rank STR for trained recurrent models: Keras GRU / LSTM layers become
`LowRankGRU` / `LowRankLSTM`, started from the SVD of their trained matrices."""

import keras
import numpy as np

from tf_sparsity import recipes, surgery
from tf_sparsity.layers.low_rank import LowRankGRU, LowRankLSTM

__all__ = ["low_rank_rnns"]


def low_rank_rnns(model):
    """`model` with every Keras `GRU` / `LSTM` replaced by `LowRankGRU` / `LowRankLSTM`.

    Each new layer starts as the SVD of the old layer's trained matrices (same
    outputs at full rank, up to the tiny initial threshold) and is set up for
    steering (`tfs.recipes.LOW_RANK_STR`): train it with
    `tfs.callbacks.TargetSparsity`. What `tf-sparsity prune --method lowrank` does.

    Args:
        model: a built Sequential or functional model with at least one
            `keras.layers.GRU` (with `reset_after=True`) or `keras.layers.LSTM`.

    >>> m = keras.Sequential([keras.Input((10, 1)), keras.layers.GRU(4), keras.layers.Dense(2)])
    >>> type(low_rank_rnns(m).layers[0]).__name__
    'LowRankGRU'
    """
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
                   activation=keras.activations.serialize(layer.cell.activation),
                   recurrent_activation=keras.activations.serialize(layer.cell.recurrent_activation),
                   kernel_initializer=keras.initializers.Constant(kernel),
                   recurrent_initializer=keras.initializers.Constant(recurrent_kernel), name=layer.name,
                   **recipes.LOW_RANK_STR)

    def transfer(old, new):
        if isinstance(new, (LowRankGRU, LowRankLSTM)):
            new.cell.bias.assign(old.cell.bias)
        else:
            surgery.transfer_weights(old, new)

    result = surgery.map_layers(model, replace, transfer=transfer)
    if not found:
        raise ValueError("`model` has no keras.layers.GRU or LSTM layer to make low-rank.")
    return result
