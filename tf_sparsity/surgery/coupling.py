"""Channel-STR over channel dependency groups: one joint magnitude per group.

`tfs.soft_threshold(model, granularity="channel")` returns a
`ChannelGroupModel`: a functional model that, whenever it is built (by
`tfs.soft_threshold`, `keras.models.load_model` or `clone_model`), runs
`channel_groups` once and hands every channel-STR wrapper a
`ChannelCoupling`. Unit `u` of a group is channel `u` of every tensor it
appears in; its slices are the producer kernels' output columns, the
depthwise filters and every consumer kernel's input rows (per position after
a `Flatten`). Its magnitude is the RMS over all those slices together, its
threshold the size-weighted mean of the thresholds of the wrappers holding
them (`sum_l n_lu * g(s_l + offset_l) / sum_l n_lu`, `n_lu` = entries of
layer `l` in unit `u`), and every slice is multiplied by the same
`ops.shrink_factor` -- so a unit tied by a residual add, a depthwise conv,
a concat or a squeeze-excite multiply shrinks and vanishes as one, and its
consumers' input rows are exact zeros when it does. `tfs.strip` then removes
it with `prune_groups` (exactly: nothing downstream reads it).

Why one threshold per layer (the existing `s` of each wrapper) rather than
a new one per group: the thresholds stay where `TargetSparsity`, the decay
steering and collapse reports look for them, `.keras` files keep their
variables, and with `learn_threshold=False` (the STR recipe) every group
meets the same steered level. An entry in two groups (input row of one unit,
output column of another) is multiplied by both factors.

Only units whose every slice sits in a channel-STR wrapper are thresholded:
a unit also read by a dense layer (`skip=`) or frozen by the analysis
(model input / output, unknown operations) is left alone, since it could not
be removed anyway.

A floor keeps every group alive: with `min_channels=k` on the wrappers (the
default 1), each unit's threshold is capped just below the k-th largest RMS
of its group (`_FLOOR_MARGIN` below it), so the k strongest units of a group
always survive -- the forward pass, the steering solver
(`solve_flops_offset`) and `tfs.strip` see the same floor. An emptied group
on the main path would cut the network (no signal reaches the classifier);
`min_channels=0` allows it (the collapse is then reported).
"""

import contextlib

import keras
import numpy as np
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity.layers.soft_threshold import SoftThreshold
from tf_sparsity.surgery.graph import wrappers
from tf_sparsity.surgery.group_surgery import group_macs
from tf_sparsity.surgery.groups import channel_groups

__all__ = ["ChannelCoupling", "ChannelGroupModel", "couple_channels", "model_structure"]


class _Plan:
    """What one wrapper needs each step: the slices of its units in every member
    kernel (`parts`), entries per unit, threshold weights, and its own ids."""

    def __init__(self, units, parts, counts, weights, own, floor=None):
        self.units, self.parts, self.counts, self.weights, self.own = units, parts, counts, weights, own
        self.floor = floor  # (members, group_of, k_per_group) of the floor, local ids; None: no floor


# How far below a group's k-th largest RMS the floor caps its thresholds: far
# above float32 rounding of an RMS, so the forward pass (float32) and the
# solver (float64) agree on which units the floor keeps.
_FLOOR_MARGIN = 1e-3


class ChannelCoupling:
    """The channel groups of a model's channel-STR wrappers, as unit ids per kernel axis.

    Built by `couple_channels`; each coupled `SoftThreshold` holds it and
    asks it for its effective kernels and steering magnitudes.

    Attributes:
        ids: `{wrapper: [(input-axis ids, output-axis ids) per kernel]}`,
            global unit ids, -1 where a slice is left alone.
        num_units: how many units are thresholded.
        groups: the `ChannelGroups` analysis it came from.
    """

    def __init__(self, ids, num_units, groups, roots=None):
        self.ids, self.num_units, self.groups = ids, num_units, groups
        self.roots = np.zeros(0, np.int64) if roots is None else np.asarray(roots, np.int64)
        self._plans = {}
        self._strip_plan = self._dense = None
        self._all = None  # the plan over every unit at once (`unit_factors`)
        self._current = None  # {shrink: factors} of the forward pass under way (`one_pass`)
        floors = [w.min_channels for w in ids]
        self.min_channels = max(floors) if floors else 0
        # Group index (in `groups.prunable()` order) of every thresholded unit.
        number = {int(r): i for i, r in enumerate(self.roots)}
        self.unit_group = np.full(num_units, -1, np.int64)
        for g, group in enumerate(groups.prunable().values() if num_units else ()):
            for r in group.units:
                if int(r) in number:
                    self.unit_group[number[int(r)]] = g

    def _floor_layout(self, units):
        # `_Plan.floor` for the local units `units` (sorted global ids, whole groups).
        if not self.min_channels or not len(units):
            return None
        groups, group_of = np.unique(self.unit_group[units], return_inverse=True)
        sizes = np.bincount(group_of, minlength=len(groups))
        members = np.full((len(groups), sizes.max()), len(units), np.int32)  # padded with "no unit"
        fill = np.zeros(len(groups), np.int64)
        for local, g in enumerate(group_of):
            members[g, fill[g]] = local
            fill[g] += 1
        return members, group_of.astype("int32"), np.minimum(sizes, self.min_channels).astype("int32")

    def floor_caps(self, rms, plan=None):
        """Per unit, the largest threshold under which its group keeps `min_channels` units.

        `rms`: the units' joint RMS (in `plan`'s local order; default: every
        unit); a tensor of the same length, or None without a floor.
        """
        plan = self._plan_all() if plan is None else plan
        if plan.floor is None:
            return None
        members, group_of, k = plan.floor
        padded = ops.concatenate([rms, ops.full((1,), -np.inf, rms.dtype)])
        top = ops.top_k(ops.take(padded, members, axis=0), int(k.max()))[0]
        kth = ops.take_along_axis(top, ops.convert_to_tensor(k[:, None] - 1), axis=1)[:, 0]
        return ops.take(kth * (1.0 - _FLOOR_MARGIN), group_of, axis=0)

    def floor_alive(self):
        """The units the floor alone keeps (each group's `min_channels` largest by RMS), NumPy."""
        rms = self.unit_rms()
        caps = self.floor_caps(rms)
        if caps is None:
            return np.zeros(self.num_units, bool)
        return rms > ops.convert_to_numpy(caps)

    def _gather(self, local, n):
        # Every kernel slice of a unit numbered by `local` (n: "none"): parts, entries per unit,
        # threshold weights (each wrapper's share of a unit's entries).
        parts, counts, weights = [], np.zeros(n + 1), {}
        for other, pairs in self.ids.items():
            for k, (kernel, pair) in enumerate(zip(other.kernels, pairs)):
                for axis, a in zip((-2, -1), pair):
                    ids = local(a)
                    if not (ids < n).any():
                        continue
                    per_slice = int(np.prod(kernel.shape)) / kernel.shape[axis]
                    entries = np.bincount(ids, minlength=n + 1) * per_slice
                    parts.append((other, k, axis, ids))
                    counts += entries
                    weights[other] = weights.get(other, 0.0) + entries[:n]
        counts = np.maximum(counts[:n], 1.0)  # every unit has entries; no 0/0 if not
        return parts, counts, [(other, w / counts) for other, w in weights.items()]

    def _plan_all(self):
        # Like `_plan`, over every unit: local id == global id, n == "no unit".
        if self._all is None:
            n = self.num_units

            def local(a):
                return np.where(a >= 0, a, n).astype("int32")

            parts, counts, weights = self._gather(local, n)
            own = {other: [(local(i), local(o)) for i, o in pairs] for other, pairs in self.ids.items()}
            self._all = _Plan(np.arange(n), parts, counts, weights, own, self._floor_layout(np.arange(n)))
        return self._all

    def unit_factors(self, shrink=True):
        """Every unit's factor at once: a float32 vector of `num_units + 1` (the last is 1, "no unit").

        What one forward pass of a `ChannelGroupModel` computes once and
        every coupled wrapper reads (`one_pass`); equal to the factors each
        wrapper would compute for its own units.
        """
        plan = self._plan_all()
        if not self.num_units:
            return ops.ones((1,), "float32")
        return self._factors(plan, shrink)[0]

    def unit_rms(self):
        """Every unit's joint RMS (the magnitude its threshold is compared with), NumPy float64.

        `ops.segment_rms_numpy`: the steering solver reads it eagerly, where
        ~100 kernels' TensorFlow segment sums take seconds.
        """
        plan = self._plan_all()
        return sparse_ops.segment_rms_numpy([(other.kernels[k], axis, ids) for other, k, axis, ids in plan.parts],
                                            plan.counts)

    def threshold_weights(self):
        """`[(wrapper, w)]`: unit `u`'s threshold is `sum w[u] * wrapper.threshold()`."""
        return list(self._plan_all().weights)

    def stripped_macs(self, alive):
        """MACs per example of `tfs.strip` of the model when exactly the units `alive` survive.

        What `prune_dead_units` removes, without building anything: a unit
        goes when no Dense / Conv reads it, i.e. when it is thresholded or
        every output unit of each of its consumers is (each group keeps one
        unit); counted by `group_macs`. `alive` is a boolean vector over
        the `num_units` thresholded units.
        """
        if self._strip_plan is None:
            self.dense_macs()
            wrapper_of = {id(w.layer): w for w in self.ids}
            consumers = []
            for layer, kind, inp, _ in self.groups.layers.values():
                if kind != "producer" or inp is None:
                    continue
                w = wrapper_of.get(id(layer))
                none = np.full(1, -1, np.int64)
                ins, outs = self.ids[w][0] if w is not None else (np.full(len(inp), -1, np.int64), none)
                consumers.append((self.groups.root(inp), ins, outs))
            prunable = [(name, np.asarray(g.units)) for name, g in self.groups.prunable().items()]
            self._atoms = 1 + max([int(r.max()) for r, _, _ in consumers if len(r)] +
                                  [int(u.max()) for _, u in prunable if len(u)] + [0])
            self._strip_plan = consumers, prunable
        consumers, prunable = self._strip_plan
        alive = np.append(np.asarray(alive, bool), True)  # index -1: not thresholded, always alive
        read = np.zeros(self._atoms, bool)
        for roots, ins, outs in consumers:
            if alive[outs].any():
                read[roots[alive[ins]]] = True
        keep = {}
        for name, units in prunable:
            kept = np.flatnonzero(read[units])
            if len(kept) < len(units):
                keep[name] = kept if len(kept) else np.array([0])
        return float(group_macs(self.groups, keep))

    def dense_macs(self):
        """MACs per example of the model with every unit kept."""
        if self._dense is None:
            with self.one_pass():  # group_macs' first call summarizes every wrapper: one factor pass
                self._dense = float(group_macs(self.groups, {}))
        return self._dense

    def emptied_groups(self, alive):
        """Names of the groups all of whose thresholded units are dead under `alive`."""
        alive = np.asarray(alive, bool)
        out = []
        for g, (name, group) in enumerate(self.groups.prunable().items()):
            ids = np.flatnonzero(self.unit_group == g)
            if len(ids) and len(ids) == group.size and not alive[ids].any():
                out.append(name)
        return out

    @contextlib.contextmanager
    def one_pass(self):
        """Compute the unit factors once for the forward pass run inside this block.

        `ChannelGroupModel.call` runs its layers inside it, so a unit shared
        by many layers (a residual stream) has its RMS and factor computed
        once per pass, not once per layer; outside it each wrapper computes
        its own units' factors.
        """
        shrinks = sorted({bool(w.shrink) for w in self.ids})
        previous, self._current = self._current, {s: self.unit_factors(s) for s in shrinks}
        try:
            yield
        finally:
            self._current = previous

    def _plan(self, wrapper):
        if id(wrapper) in self._plans:
            return self._plans[id(wrapper)]
        mine = [a[a >= 0] for pair in self.ids[wrapper] for a in pair]
        units = np.unique(np.concatenate(mine)) if mine else np.zeros(0, np.int64)
        if self.min_channels and len(units):  # the floor compares a unit with its whole group
            units = np.flatnonzero(np.isin(self.unit_group, self.unit_group[units]))
        n = len(units)
        plan = None
        if n:
            def local(a):
                pos = np.clip(np.searchsorted(units, a), 0, n - 1)
                return np.where((a >= 0) & (units[pos] == a), pos, n).astype("int32")

            parts, counts, weights = self._gather(local, n)
            own = [(local(i), local(o)) for i, o in self.ids[wrapper]]
            plan = _Plan(units, parts, counts, weights, own, self._floor_layout(units))
        self._plans[id(wrapper)] = plan
        return plan

    def _factors(self, plan, shrink):
        rms = sparse_ops.segment_rms([(other.kernels[k], axis, ids) for other, k, axis, ids in plan.parts],
                                     plan.counts)
        threshold = 0.0
        for other, w in plan.weights:
            threshold = threshold + ops.convert_to_tensor(w.astype("float32")) * other.threshold()
        caps = self.floor_caps(rms, plan)
        if caps is not None:
            threshold = ops.minimum(threshold, caps)
        factor = sparse_ops.shrink_factor(rms, threshold, shrink)
        return ops.concatenate([factor, ops.ones((1,), "float32")]), rms

    def effective_kernels(self, wrapper):
        """`wrapper`'s kernels with every thresholded row / column scaled by its unit's factor."""
        kernels = [ops.cast(k, "float32") for k in wrapper.kernels]
        if self._current is not None:  # inside `one_pass`: read the pass's factors
            factor, own = self._current[bool(wrapper.shrink)], self._plan_all().own[wrapper]
        else:
            plan = self._plan(wrapper)
            if plan is None:
                return kernels
            (factor, _), own = self._factors(plan, wrapper.shrink), plan.own
        out = []
        for kernel, (rows, cols) in zip(kernels, own):
            kernel = kernel * ops.reshape(ops.take(factor, rows), (-1, 1))
            out.append(kernel * ops.take(factor, cols))
        return out

    def magnitudes(self, wrapper):
        """(RMS of each unit `wrapper` touches, its own entries zeroed with it), NumPy.

        A unit the floor keeps (`min_channels`) has an infinite magnitude:
        no threshold zeros it.

        An entry dies with the first of its row and column units to die;
        under one threshold that is the unit of smaller RMS, so each entry is
        counted under that unit and the counts are exact for a shared
        threshold (and close when the layers' thresholds differ).
        """
        plan = self._plan(wrapper)
        if plan is None:
            return np.zeros(0, "float32"), np.zeros(0)
        _, rms = self._factors(plan, wrapper.shrink)
        caps = self.floor_caps(rms, plan)
        rms = ops.convert_to_numpy(rms).astype("float64")
        if caps is not None:  # units the floor keeps never die: infinitely large to the solver
            rms = np.where(rms > ops.convert_to_numpy(caps), np.inf, rms)
        n = len(plan.units)
        # Index n is "no unit here": infinitely large, so the other axis's unit takes the entry.
        padded = np.concatenate([rms, [np.inf]])
        sizes = np.zeros(n + 1)
        for kernel, (rows, cols) in zip(wrapper.kernels, plan.own):
            per_entry = int(np.prod(kernel.shape)) / (kernel.shape[-2] * kernel.shape[-1])
            row_first = padded[rows][:, None] <= padded[cols][None, :]
            sizes += np.bincount(rows, weights=row_first.sum(axis=1) * per_entry, minlength=n + 1)
            sizes += np.bincount(cols, weights=(~row_first).sum(axis=0) * per_entry, minlength=n + 1)
        return rms, sizes[:n]


def couple_channels(model):
    """Hand every channel-STR wrapper of `model` the channel groups it belongs to.

    Runs `channel_groups(model)` once; returns the `ChannelCoupling` (None
    when `model` has no channel-granularity `SoftThreshold`). Called by
    `ChannelGroupModel`; call it yourself only on a model you rebuilt by
    hand.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> x = keras.Input((8,))
    >>> h = keras.layers.Dense(6, name="h")(x)
    >>> m = keras.Model(x, keras.layers.Dense(2)(keras.layers.Add()([h, keras.layers.Dense(6, name="r")(h)])))
    >>> sparse = tfs.soft_threshold(m, granularity="channel")
    >>> sparse.channel_coupling.num_units  # the Add ties h's and r's 6 outputs (r's inputs too)
    6
    """
    members = {id(w.layer): w for w in wrappers(model)
               if isinstance(w, SoftThreshold) and w.granularity == "channel"}
    for w in members.values():
        w.coupling = None
    if not members:
        return None
    groups = channel_groups(model)
    prunable = groups.prunable()
    roots = np.concatenate([g.units for g in prunable.values()]) if prunable else np.zeros(0, np.int64)
    left_alone = set()  # units read or written by a layer that is not a channel-STR wrapper
    for layer, kind, inp, out in groups.layers.values():
        if kind in ("producer", "depthwise") and id(layer) not in members:
            left_alone.update(int(r) for r in groups.root(inp if kind == "depthwise" else np.concatenate([inp, out])))
    roots = np.array([r for r in roots if int(r) not in left_alone], np.int64)
    number = {int(r): i for i, r in enumerate(roots)}

    def unit_ids(atoms):
        return np.array([number.get(int(r), -1) for r in groups.root(atoms)], np.int64)

    ids = {}
    for layer, kind, inp, out in groups.layers.values():
        wrapper = members.get(id(layer))
        if wrapper is None or kind not in ("producer", "depthwise"):
            continue
        kernel = wrapper.kernels[0]
        cols = unit_ids(out) if kind == "producer" else np.full(kernel.shape[-1], -1, np.int64)
        ids[wrapper] = [(unit_ids(inp), cols)]
    coupling = ChannelCoupling(ids, len(roots), groups, roots)
    for wrapper in ids:
        wrapper.coupling = coupling
    return coupling


def model_structure(model):
    """`(inputs, outputs)` of a built functional / Sequential model, single tensors
    unwrapped (so a new `keras.Model` over them takes the same call structure)."""
    def one(tensors):
        return tensors[0] if len(tensors) == 1 else list(tensors)

    return one(model.inputs), one(model.outputs)


@keras.saving.register_keras_serializable(package="tf_sparsity")
class ChannelGroupModel(keras.Model):
    """A functional model whose channel-STR wrappers threshold channel groups jointly.

    What `tfs.soft_threshold(model, granularity="channel")` returns. It is
    an ordinary functional model (`fit`, `.keras` files, `clone_model`),
    except that constructing it -- also when loading -- runs
    `couple_channels`, so each channel dependency group is compared with
    its threshold as one unit (see this module's docstring). Its coupling is
    in `.channel_coupling`.

    Args:
        inputs: the model's input tensor(s).
        outputs: its output tensor(s).
        name: the model's name.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    >>> type(tfs.soft_threshold(m, granularity="channel")).__name__
    'ChannelGroupModel'
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.channel_coupling = couple_channels(self)

    def call(self, inputs, training=None, mask=None, **kwargs):
        """The functional forward pass, with every unit factor computed once for it."""
        if self.channel_coupling is None:
            return super().call(inputs, training=training, mask=mask, **kwargs)
        with self.channel_coupling.one_pass():
            return super().call(inputs, training=training, mask=mask, **kwargs)
