"""`tfs.strip`: a plain Keras model with every tf_sparsity layer baked in."""

import keras

from tf_sparsity import prunable
from tf_sparsity.layers.low_rank import stripped_rnn
from tf_sparsity.layers.soft_threshold import SoftThreshold
from tf_sparsity.protocols import StrippableCell, StrippableLayer
from tf_sparsity.surgery.channels import remove_zero_channels
from tf_sparsity.surgery.coupling import ChannelGroupModel, model_structure
from tf_sparsity.surgery.group_surgery import prune_dead_units
from tf_sparsity.surgery.graph import map_layers, transfer_weights, wrappers


def strip(model):
    """Return a plain Keras model with every tf_sparsity wrapper removed.

    Each wrapper becomes a layer of the original class whose kernels hold the
    effective (thresholded / masked) values, so pruned weights are exact
    zeros and outputs equal the wrapped model's. Channel-STR models shrink
    physically: over channel groups (`tfs.surgery.ChannelGroupModel`) every
    unit no consumer reads any more is removed with `prune_groups`, exactly;
    per-layer channel wrappers lose their zero channels along simple chains.
    Accepts a single wrapper layer too.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> plain = tfs.strip(tfs.soft_threshold(m))
    >>> [type(l).__name__ for l in plain.layers]
    ['Dense']
    """
    if isinstance(model, StrippableLayer) and not isinstance(model, keras.Model):
        return model.stripped_layer()
    channel = [w for w in wrappers(model) if isinstance(w, SoftThreshold) and w.granularity == "channel"]
    grouped = any(w.coupling is not None for w in channel)
    shrink = [w.layer.name for w in channel if w.coupling is None]
    baked = set()

    def replace(layer):
        # A StrippableLayer returns a plain, built layer holding its effective
        # weights (wrappers, low-rank RNN layers); a plain `keras.layers.RNN`
        # around a StrippableCell is stripped through its cell.
        if isinstance(layer, StrippableLayer):
            new = layer.stripped_layer()
        elif prunable.protocol_owner(layer, StrippableCell) is not None:
            new = stripped_rnn(layer)
        else:
            return None
        baked.add(id(new))
        return new

    def transfer(old, new):
        if id(new) not in baked:
            transfer_weights(old, new)

    plain = map_layers(model, replace, transfer=transfer)
    if isinstance(plain, ChannelGroupModel):  # clone_model keeps the class: hand back a plain model
        plain = keras.Model(*model_structure(plain), name=plain.name)
    if grouped:  # channel-STR over channel groups: remove the dead units, exactly
        plain = prune_dead_units(plain)
    return remove_zero_channels(plain, shrink) if shrink else plain
