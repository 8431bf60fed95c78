"""Channel dependency groups: which channels of a model must be removed together.

DepGraph-style analysis (Fang et al., CVPR 2023) for any Sequential or
functional Keras model, nested models included. Every channel of every
tensor in the graph is an *atom*; a Dense/Conv layer creates new atoms for
its outputs, channel-wise layers (BatchNormalization, activations, pooling,
padding, dropout, depthwise convolutions) pass them through, merges
(`Add`, `Subtract`, `Multiply`, `Average`, `Maximum`, `Minimum`) tie the
i-th channel of every input together, `Concatenate` lays its inputs' atoms
side by side, `Flatten` / `Reshape` into a vector repeats them per position.
Tied atoms form one *unit*: removing it removes one channel of every tensor
it appears in (producer filters, BN entries, depthwise filters, the input
rows of every consumer). A squeeze-excite block (pool -> conv -> conv ->
multiply) needs no rule of its own: the multiply ties the excite conv's
filters to the features they scale.

Units with the same producer layers form a `ChannelGroup` (the DepGraph
group: one residual stream, one expansion, one plain conv). Units are
*frozen* where they reach the model's inputs or outputs, or touch an
operation the analysis does not know (its name and the reason are in
`ChannelGroups.frozen`). Layers inside nested models are grouped like the
others, but a nested model's own inputs keep their channels (its `Input`
shape is fixed when the model is cloned). tf_sparsity wrappers are analysed
as the layer they wrap (`ChannelGroups.layers` then holds the inner layer).
Elementwise operation nodes (`h + i`, `keras.ops.tanh(h)`) pass channels like
the layers that do the same. With `heads=True`, each `MultiHeadAttention`
is one more group whose units are its heads (a head: its query, key and
value projection columns and its rows of the output projection); the
attention's input and output channels are kept.

The surgery itself (`prune_groups`) and the MACs count live in `group_surgery`.
"""

import math

import keras
import numpy as np

from tf_sparsity import _compat
from tf_sparsity.layers.kernel_wrapper import KernelWrapper
from tf_sparsity.surgery.graph import as_graph_model

__all__ = ["ChannelGroup", "ChannelGroups", "channel_groups"]

# One channel in -> the same channel out, no weights per channel.
PASS_THROUGH = (
    keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D, keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D, keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D, keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
    keras.layers.UpSampling1D, keras.layers.UpSampling2D, keras.layers.UpSampling3D,
    keras.layers.Rescaling, keras.layers.Identity,
)
# Channel-wise layers with per-channel weights (sliced on their last axis).
_PER_CHANNEL = (keras.layers.BatchNormalization, keras.layers.PReLU)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_MERGES = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
           keras.layers.Maximum, keras.layers.Minimum)
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
               keras.layers.Conv3DTranspose)
PRODUCERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


class ChannelGroup:
    """Channels of one or more coupled layers, removed together index by index.

    Attributes:
        name: the first producer's name (how methods and reports refer to it).
        producers: `[(layer, channel indices)]`: unit `k` of the group is
            channel `indices[k]` of each producer's output.
        units: the atom root of each unit (what `ChannelGroups.keep_masks` takes).
        frozen: None, or why these channels cannot be removed.
    """

    def __init__(self, name, producers, units, frozen):
        self.name, self.producers, self.units, self.frozen = name, producers, units, frozen

    @property
    def size(self):
        """How many units (channels) the group has."""
        return len(self.units)

    def __repr__(self):
        layers = ", ".join(layer.name for layer, _ in self.producers)
        state = f", frozen: {self.frozen}" if self.frozen else ""
        return f"ChannelGroup({self.name!r}, size={self.size}, layers=[{layers}]{state})"


class ChannelGroups:
    """The result of `channel_groups(model)`.

    Attributes:
        model: the analysed model.
        groups: `{name: ChannelGroup}`, prunable and frozen alike.
        frozen: `{layer or tensor description: reason}` for everything the
            analysis refused to cut through.
        layers: `{id(layer): (layer, kind, input atoms, output atoms)}` for
            every leaf layer call; `kind` says how surgery treats it.
    """

    def __init__(self, model, parent, layers, frozen_roots, frozen):
        self.model, self.layers, self.frozen = model, layers, frozen
        self._parent = parent
        self._frozen_roots = frozen_roots
        self.groups = self._collect()

    def root(self, atoms):
        """Union-find roots of an array of atoms."""
        atoms = np.asarray(atoms, dtype=np.int64)
        return self._parent[atoms]

    def _collect(self):
        by_root = {}
        for layer, kind, _, out in self.layers.values():
            if kind not in ("producer", "heads"):
                continue
            for channel, root in enumerate(self.root(out)):
                by_root.setdefault(int(root), []).append((layer, channel))
        signatures = {}
        for root, members in by_root.items():
            key = tuple(sorted({id(layer) for layer, _ in members}))
            signatures.setdefault(key, []).append((root, members))
        groups = {}
        for entries in signatures.values():
            entries.sort(key=lambda e: min(c for l, c in e[1] if l is e[1][0][0]))
            first = entries[0][1]
            layers = []
            for layer, _ in first:
                if all(layer is not l for l in layers):
                    layers.append(layer)
            producers = []
            for layer in layers:
                producers.append((layer, np.array([min(c for l, c in members if l is layer)
                                                   for _, members in entries])))
            units = np.array([root for root, _ in entries], dtype=np.int64)
            reasons = {self._frozen_roots[r] for r in units if r in self._frozen_roots}
            name = layers[0].name
            while name in groups:
                name += "+"
            groups[name] = ChannelGroup(name, producers, units, "; ".join(sorted(reasons)) or None)
        return groups

    def prunable(self):
        """The groups that can lose channels, `{name: ChannelGroup}`."""
        return {n: g for n, g in self.groups.items() if g.frozen is None}

    def consumers(self, group):
        """`[(layer, rows)]`: every Dense / Conv layer reading `group`, where `rows[k]`
        are its input rows (channels; positions x channels after a `Flatten`) fed by
        unit `k` of the group (empty for units it does not read)."""
        out = []
        for layer, kind, inp, _ in self.layers.values():
            if kind != "producer":
                continue
            roots = self.root(inp)
            rows = [np.flatnonzero(roots == u) for u in group.units]
            if any(len(r) for r in rows):
                out.append((layer, rows))
        return out

    def keep_masks(self, keep):
        """`{id(layer): (input mask, output mask)}` for a choice of units.

        `keep` maps group names to the indices (0..size-1) of the units kept;
        groups not named keep everything.
        """
        removed = []
        for name, indices in keep.items():
            group = self.groups[name]
            mask = np.ones(group.size, bool)
            mask[np.asarray(indices, dtype=np.int64)] = False
            removed.append(group.units[mask])
        gone = np.zeros(len(self._parent), bool)  # a lookup over roots: faster than isin per layer
        if removed:
            gone[np.concatenate(removed)] = True
        masks = {}
        for key, (layer, kind, inp, out) in self.layers.items():
            masks[key] = (None if inp is None else ~gone[self.root(inp)],
                          None if out is None else ~gone[self.root(out)])
        return masks


class _Analysis:
    def __init__(self, heads=False):
        self.heads = heads
        self.parent = []
        self.atoms = {}  # id(tensor) -> atoms of its last axis
        self.layers = {}
        self.frozen_roots = []  # (atoms, reason)
        self.frozen = {}
        self.calls = {}

    def new(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a):
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a, b):
        for x, y in zip(a, b):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def of(self, tensor):
        key = id(tensor)
        if key not in self.atoms:
            width = tensor.shape[-1] if len(tensor.shape) else 1
            self.atoms[key] = self.new(1 if width is None else int(width))
        return self.atoms[key]

    def freeze(self, atoms, reason, name=None):
        self.frozen_roots.append((np.asarray(atoms), reason))
        if name is not None:
            self.frozen.setdefault(name, reason)

    def graph(self, model):
        nodes = _compat.graph_calls(model)
        counts = {}
        for op, _, _ in nodes:
            counts[id(op)] = counts.get(id(op), 0) + 1
        for op, inputs, outputs in nodes:
            if isinstance(op, keras.layers.InputLayer):
                continue
            in_atoms = [self.of(t) for t in inputs]
            if _compat.is_graph_model(op):
                if counts[id(op)] > 1 or len(inputs) != len(op.inputs):
                    self.unknown(op, inputs, outputs, "nested model called more than once")
                    continue
                for outer, inner in zip(in_atoms, op.inputs):
                    # Cloning keeps a nested model's Input shape: its channels stay.
                    self.freeze(outer, f"input of nested model '{op.name}'", f"{op.name} (input)")
                    self.atoms[id(inner)] = outer
                self.graph(op)
                for outer, inner in zip(outputs, op.outputs):
                    self.atoms[id(outer)] = self.of(inner)
                continue
            if counts[id(op)] > 1 or id(op) in self.layers:
                self.unknown(op, inputs, outputs, "shared layer (called more than once)")
                continue
            reason = self.layer(op, inputs, outputs, in_atoms)
            if reason is not None:
                self.unknown(op, inputs, outputs, reason)

    def unknown(self, op, inputs, outputs, reason):
        for t in list(inputs) + list(outputs):
            self.freeze(self.of(t), f"{op.name}: {reason}", op.name)
        self.layers[id(op)] = (op, "frozen", None, None)

    def layer(self, op, inputs, outputs, in_atoms):
        """Propagate atoms through one leaf layer call; a string is why it is frozen."""
        if isinstance(op, KernelWrapper):  # a wrapper's channels are its layer's (channel-STR)
            op = op.layer
        out = outputs[0] if len(outputs) == 1 else None
        x = in_atoms[0] if in_atoms else None
        if getattr(op, "data_format", "channels_last") == "channels_first":
            return "channels_first data format"
        if isinstance(op, _TRANSPOSED):
            return "transposed convolution (not handled: channels kept)"
        if isinstance(op, PRODUCERS) and len(inputs) == 1 and out is not None:
            if getattr(op, "groups", 1) != 1:
                return f"grouped convolution (groups={op.groups})"
            self.atoms[id(out)] = self.new(int(out.shape[-1]))
            self.layers[id(op)] = (op, "producer", x, self.atoms[id(out)])
            return None
        if len(inputs) == 1 and out is not None and isinstance(op, _DEPTHWISE + _PER_CHANNEL + PASS_THROUGH):
            if isinstance(op, _DEPTHWISE) and op.depth_multiplier != 1:
                return f"depthwise convolution with depth_multiplier={op.depth_multiplier}"
            if isinstance(op, keras.layers.BatchNormalization) and op.axis not in (
                    -1, [-1], (-1,), len(inputs[0].shape) - 1, [len(inputs[0].shape) - 1]):
                return f"BatchNormalization over axis {op.axis}, not channels"
            if out.shape[-1] != inputs[0].shape[-1]:
                return "changes the channel count"
            self.atoms[id(out)] = x
            kind = "depthwise" if isinstance(op, _DEPTHWISE) else (
                "per_channel" if isinstance(op, _PER_CHANNEL) else "pass")
            self.layers[id(op)] = (op, kind, x, x)
            return None
        if _compat.is_elementwise_operation(op) and len(inputs) == 1 and out is not None:
            if out.shape[-1] != inputs[0].shape[-1]:
                return "changes the channel count"
            self.atoms[id(out)] = x  # `keras.ops.tanh(h)`, `h * 0.5`: channel by channel
            self.layers[id(op)] = (op, "pass", x, x)
            return None
        if (isinstance(op, _MERGES) or _compat.is_elementwise_operation(op)) and out is not None:
            width = out.shape[-1]
            full = [a for a, t in zip(in_atoms, inputs) if t.shape[-1] == width]
            if len(full) != len(in_atoms) and any(t.shape[-1] != 1 for t in inputs if t.shape[-1] != width):
                return "inputs with different channel counts"
            for other in full[1:]:
                self.union(full[0], other)
            for a, t in zip(in_atoms, inputs):  # a broadcast (1-channel) input keeps its channel
                if t.shape[-1] != width:
                    self.freeze(a, f"{op.name}: broadcast input")
            self.atoms[id(out)] = full[0]
            self.layers[id(op)] = (op, "pass", None, None)
            return None
        if isinstance(op, keras.layers.Concatenate) and out is not None:
            rank = len(out.shape)
            if op.axis in (-1, rank - 1):
                self.atoms[id(out)] = np.concatenate(in_atoms)
            else:
                for other in in_atoms[1:]:
                    self.union(in_atoms[0], other)
                self.atoms[id(out)] = in_atoms[0]
            self.layers[id(op)] = (op, "pass", None, None)
            return None
        if isinstance(op, (keras.layers.Flatten, keras.layers.Reshape)) and out is not None:
            shape_in, shape_out = inputs[0].shape[1:], out.shape[1:]
            if None in shape_in or None in shape_out:
                return "unknown static shape"
            if len(shape_in) and len(shape_out) and shape_in[-1] == shape_out[-1] and (
                    math.prod(shape_in[:-1]) == math.prod(shape_out[:-1])):
                self.atoms[id(out)] = x  # e.g. (C,) -> (1, 1, C) in squeeze-excite
                self.layers[id(op)] = (op, "reshape", x, x)
                return None
            if len(shape_out) == 1:
                self.atoms[id(out)] = np.tile(x, math.prod(shape_in[:-1]))
                self.layers[id(op)] = (op, "flatten", x, x)
                return None
            return f"reshape {tuple(shape_in)} -> {tuple(shape_out)} mixes channels"
        if self.heads and isinstance(op, keras.layers.MultiHeadAttention) and out is not None:
            for atoms in in_atoms:
                self.freeze(atoms, f"{op.name}: attention input (its heads are the units)", op.name)
            self.atoms[id(out)] = self.new(int(out.shape[-1]))
            self.freeze(self.atoms[id(out)], f"{op.name}: attention output (its heads are the units)", op.name)
            self.layers[id(op)] = (op, "heads", None, self.new(op.num_heads))
            return None
        return f"{type(op).__name__} (not known to the channel analysis)"


def channel_groups(model, heads=False):
    """The channel dependency groups of `model` (Sequential or functional).

    Args:
        model: a built Keras model (nested models are followed; a
            subclassed model is one layer the analysis does not know).
        heads: also make each `MultiHeadAttention`'s heads a group (its
            input and output channels are then kept). Used by the L1-norm
            and random baselines; the methods that reconstruct consumers'
            inputs (greedy, channel-STR) leave attention alone.

    Returns:
        A `ChannelGroups`: `.groups` maps each group's name to a
        `ChannelGroup`, `.prunable()` the ones that can lose channels,
        `.frozen` lists what was left alone and why.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> x = keras.Input((8, 8, 3))
    >>> a = keras.layers.Conv2D(16, 3, padding="same", name="a")(x)
    >>> b = keras.layers.Conv2D(16, 3, padding="same", name="b")(a)
    >>> y = keras.layers.Add()([a, b])
    >>> y = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(y))
    >>> groups = tfs.surgery.channel_groups(keras.Model(x, y))
    >>> groups.prunable()
    {'a': ChannelGroup('a', size=16, layers=[a, b])}
    """
    if not isinstance(heads, bool):
        raise TypeError(f"`heads` must be True or False; received {heads!r}.")
    model = as_graph_model(model)
    analysis = _Analysis(heads)
    for tensor in model.inputs:
        analysis.freeze(analysis.of(tensor), "model input")
    analysis.graph(model)
    for tensor in model.outputs:
        analysis.freeze(analysis.of(tensor), "model output")
    parent = np.array([analysis.find(i) for i in range(len(analysis.parent))], dtype=np.int64)
    frozen_roots = {}
    for atoms, reason in analysis.frozen_roots:
        for root in set(parent[atoms].tolist()):
            frozen_roots.setdefault(root, reason)
    return ChannelGroups(model, parent, analysis.layers, frozen_roots, analysis.frozen)
