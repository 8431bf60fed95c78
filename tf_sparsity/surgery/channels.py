"""Channel surgery: remove output units/filters and slice what follows.

Works on chains (a Dense/Conv layer, the channel-preserving layers after it,
the next prunable layer); the graph itself is rebuilt by `graph.map_layers`.
"""

import keras
import numpy as np
from keras import ops

from tf_sparsity import _compat
from tf_sparsity.surgery.graph import as_graph_model, map_layers
from tf_sparsity.surgery.groups import PASS_THROUGH

__all__ = ["CHANNEL_PRUNABLE", "ChannelChain", "channel_chains", "channel_contributions",
           "prune_channels", "remove_zero_channels"]


# Layers a channel passes through unchanged (the dependency groups' list), plus
# the per-channel layers whose weights a chain slices.
_CHANNEL_PRESERVING = PASS_THROUGH + (
    keras.layers.PReLU, keras.layers.BatchNormalization, keras.layers.LayerNormalization)
CHANNEL_PRUNABLE = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)


class ChannelChain:
    """How the output channels of `layer` reach the next prunable layer.

    `between` are the channel-preserving layers on the way (their per-channel
    weights are sliced too), `flatten` is a Flatten right before a Dense
    `consumer`, whose input rows are then grouped per channel.
    """

    def __init__(self, layer, between, flatten, consumer):
        self.layer, self.between, self.flatten, self.consumer = layer, between, flatten, consumer

    @property
    def width(self):
        return self.layer.units if isinstance(self.layer, keras.layers.Dense) else self.layer.filters


def _consumers(layer, members):
    out = []
    for operation in _compat.outbound_operations(layer):
        if id(operation) in members:
            out.append(operation)
    return out


def channel_chains(model):
    """Split `model`'s Dense/Conv1D/Conv2D layers into prunable chains and the rest.

    Returns `(chains, left_alone)`: `chains` maps a layer name to its
    `ChannelChain`; `left_alone` maps other layer names to the reason they
    cannot lose channels (output layer, residual merge, shared layer, ...).
    Channels are never removed where the outputs meet other tensors (Add,
    Concatenate, Multiply): those layers are left alone, never broken.
    """
    model = as_graph_model(model)
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    members = {id(l) for l in layers}
    chains, left_alone = {}, {}
    for layer in layers:
        if not isinstance(layer, CHANNEL_PRUNABLE):
            continue
        if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)) or (
                hasattr(layer, "groups") and layer.groups != 1):
            left_alone[layer.name] = "grouped or transposed convolution"
            continue
        if _compat.inbound_node_count(layer) != 1:
            left_alone[layer.name] = "shared layer (called more than once)"
            continue
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            left_alone[layer.name] = "channels_first data format"
            continue
        between, flatten, current, reason = [], None, layer, None
        while True:
            consumers = _consumers(current, members)
            if not consumers:
                reason = "model output"
                break
            if len(consumers) > 1:
                reason = f"output of '{current.name}' feeds several layers (branch)"
                break
            nxt = consumers[0]
            if isinstance(nxt, CHANNEL_PRUNABLE) and not isinstance(
                    nxt, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)):
                if _compat.inbound_node_count(nxt) != 1 or (hasattr(nxt, "groups") and nxt.groups != 1):
                    reason = f"next layer '{nxt.name}' is shared or grouped"
                elif flatten is not None and not isinstance(nxt, keras.layers.Dense):
                    reason = "Flatten before a non-Dense layer"
                break
            if isinstance(nxt, keras.layers.Flatten) and flatten is None:
                flatten = nxt
            elif isinstance(nxt, _CHANNEL_PRESERVING) and flatten is None and (
                    not isinstance(nxt, (keras.layers.BatchNormalization, keras.layers.LayerNormalization))
                    or nxt.axis in (-1, [-1], (-1,), len(nxt.input.shape) - 1)):
                if isinstance(nxt, keras.layers.LayerNormalization):
                    reason = f"'{nxt.name}' normalizes across channels"
                    break
                between.append(nxt)
            else:
                reason = f"output reaches '{nxt.name}' ({type(nxt).__name__})"
                break
            current = nxt
        if reason is None:
            chains[layer.name] = ChannelChain(layer, between, flatten, nxt)
        else:
            left_alone[layer.name] = reason
    return chains, left_alone


def channel_contributions(h, consumer, flatten, max_elements=20_000_000):
    """Each input channel's contribution to `consumer`'s pre-activation.

    `h` is the consumer's input (before `flatten` if there is one), as NumPy.
    Returns an array `(channels, samples x positions, consumer outputs)`;
    summed over channels it is the consumer's pre-activation without bias.
    """
    kernel = ops.convert_to_numpy(consumer.kernel).astype("float32")
    if isinstance(consumer, keras.layers.Dense):
        if flatten is not None:
            n = h.shape[-1]
            h = h.reshape(len(h), -1, n)  # (B, P, N)
            w = kernel.reshape(h.shape[1], n, -1)  # (P, N, M)
            return np.einsum("bpn,pnm->nbm", h, w, optimize=True)
        n = h.shape[-1]
        h = h.reshape(-1, n)
        return h.T[:, :, None] * kernel[:, None, :]  # (N, B', M)
    # Convolution: a depthwise conv with the consumer's kernel gives each input
    # channel's contribution to every output channel separately.
    n, out = kernel.shape[-2], kernel.shape[-1]
    positions = max(1, int(np.prod(h.shape[1:-1])))
    keep = max(1, min(len(h), max_elements // max(1, n * out * positions)))
    h = h[:keep]
    y = ops.convert_to_numpy(ops.depthwise_conv(
        h, kernel, strides=consumer.strides, padding=consumer.padding,
        dilation_rate=consumer.dilation_rate))
    y = y.reshape(len(h), -1, n, out)  # (B, L', N, Cout)
    return np.transpose(y, (2, 0, 1, 3)).reshape(n, -1, out)


def prune_channels(model, keep, input_scale=None, bias_shift=None):
    """Return a smaller copy of `model` keeping only the channels in `keep`.

    Args:
        keep: `{layer name: sorted indices of output units/filters to keep}`
            for layers in `channel_chains(model)[0]`.
        input_scale: optional `{layer name: per-kept-channel factors}` folded
            into the next layer's input weights (re-weighting of kept units).
        bias_shift: optional `{layer name: vector}` added to the next layer's
            bias (absorbs the removed channels' mean contribution).

    The result is a plain Keras model with fewer units/filters; following
    BatchNormalization layers and the next layer's input kernel are sliced.
    With every channel kept and no scaling it equals the original exactly.
    """
    chains, left_alone = channel_chains(model)
    input_scale = input_scale or {}
    bias_shift = bias_shift or {}
    out_keep, in_keep, per_channel = {}, {}, {}
    for name, indices in keep.items():
        if name not in chains:
            why = left_alone.get(name, "not a Dense/Conv1D/Conv2D layer of this model")
            raise ValueError(f"cannot prune channels of '{name}': {why}.")
        chain = chains[name]
        indices = np.asarray(sorted(int(i) for i in indices))
        if len(indices) == 0 or indices[0] < 0 or indices[-1] >= chain.width:
            raise ValueError(f"`keep['{name}']` must hold 1..{chain.width} indices in [0, {chain.width}).")
        out_keep[name] = indices
        for layer in chain.between:
            per_channel[layer.name] = indices
        scale = input_scale.get(name)
        in_keep[chain.consumer.name] = (chain, indices, None if scale is None else np.asarray(scale),
                                        bias_shift.get(name))

    def replace(layer):
        if layer.name in out_keep:
            config = layer.get_config()
            config["units" if isinstance(layer, keras.layers.Dense) else "filters"] = len(out_keep[layer.name])
            with _compat.unsafe_deserialization():
                return layer.__class__.from_config(config)
        return None

    def transfer(old, new):
        weights = [w.copy() for w in old.get_weights()]
        if old.name in in_keep:  # slice (and re-weight) the input axis first
            chain, idx, scale, shift = in_keep[old.name]
            kernel = weights[0]
            if chain.flatten is not None:
                channels = chain.width
                rows = kernel.reshape(-1, channels, kernel.shape[-1])
                rows = rows[:, idx, :] * (1.0 if scale is None else scale[None, :, None])
                kernel = rows.reshape(-1, kernel.shape[-1])
            else:
                kernel = np.take(kernel, idx, axis=-2)
                if scale is not None:
                    kernel = kernel * scale.reshape((1,) * (kernel.ndim - 2) + (-1, 1))
            weights[0] = kernel.astype(weights[0].dtype)
            if shift is not None and len(weights) > 1:
                weights[1] = (weights[1] + shift).astype(weights[1].dtype)
        if old.name in out_keep:
            idx = out_keep[old.name]
            weights[0] = np.take(weights[0], idx, axis=-1)
            if len(weights) > 1:
                weights[1] = weights[1][idx]
        if old.name in per_channel:
            idx = per_channel[old.name]
            weights = [w[idx] if w.ndim == 1 else w for w in weights]
        new.set_weights(weights)

    return map_layers(model, replace, transfer=transfer)


def remove_zero_channels(model, names=None):
    """Physically remove output channels whose kernel column is all zero.

    Such a channel outputs a constant (its bias through the following
    layers); that constant's contribution is folded into the next layer's
    bias, so outputs are unchanged (up to zero-padded borders of a 'same'
    convolution consumer). Layers outside `channel_chains` keep their
    zeros. `names` limits the layers considered (default: all).
    """
    chains, _ = channel_chains(model)
    keep, shift = {}, {}
    for name, chain in chains.items():
        if names is not None and name not in names:
            continue
        kernel = ops.convert_to_numpy(chain.layer.kernel)
        alive = np.flatnonzero(np.any(kernel.reshape(-1, kernel.shape[-1]) != 0, axis=0))
        if len(alive) == chain.width:
            continue
        if len(alive) == 0:
            alive = np.array([0])  # keep one channel: a layer with no output cannot be built
        source = chain.flatten.input if chain.flatten is not None else chain.consumer.input
        probe = np.zeros((1,) + tuple(model.inputs[0].shape[1:]), model.inputs[0].dtype)
        h = ops.convert_to_numpy(_compat.graph_slice(model.inputs, source)([probe]))
        contributions = channel_contributions(h, chain.consumer, chain.flatten)
        dead = np.setdiff1d(np.arange(chain.width), alive)
        keep[name] = alive
        shift[name] = contributions[dead].mean(axis=1).sum(axis=0).astype("float32")
    return prune_channels(model, keep, bias_shift=shift) if keep else model
