"""Surgery on channel dependency groups: the physically smaller model, its MACs.

`prune_groups` removes units of `groups.channel_groups(model)` from every
layer they touch; `group_macs` counts the MACs a choice of units leaves,
without building anything (what budget searches call); `uniform_keep` and
`keep_for_budget` turn a `width` / `flops` budget and per-unit scores into
a choice of units; `dead_units` / `prune_dead_units` find and remove the units
no consumer reads (what `tfs.strip` does after channel-STR).
"""

import keras
import numpy as np

from tf_sparsity import _compat, prunable
from tf_sparsity.summarize import summary
from tf_sparsity.surgery.graph import map_layers
from tf_sparsity.surgery.groups import channel_groups

__all__ = ["ALLOCATIONS", "check_budget", "dead_units", "group_macs", "keep_for_budget", "prune_dead_units", "prune_groups",
           "uniform_keep"]


def _check_keep(groups, keep):
    for name, indices in keep.items():
        if name not in groups.groups:
            raise ValueError(f"`keep` names unknown group '{name}'; groups: {sorted(groups.groups)}.")
        group = groups.groups[name]
        indices = np.asarray(indices, dtype=np.int64)
        if group.frozen is not None and len(np.unique(indices)) != group.size:
            raise ValueError(f"`keep['{name}']`: group '{name}' is frozen ({group.frozen}).")
        if len(indices) == 0:
            raise ValueError(f"`keep['{name}']` would empty group '{name}' (layers "
                             f"{[l.name for l, _ in group.producers]}); keep at least one channel.")
        if indices.min() < 0 or indices.max() >= group.size:
            raise ValueError(f"`keep['{name}']` must hold indices in [0, {group.size}).")


def group_macs(groups, keep):
    """MACs per example of the model after keeping `keep` (no model is built).

    Args:
        groups: `channel_groups(model)`.
        keep: `{group name: kept unit indices}`; unnamed groups keep all.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    >>> g = tfs.surgery.channel_groups(m)
    >>> int(tfs.surgery.group_macs(g, {})), int(tfs.surgery.group_macs(g, {m.layers[0].name: [0, 1]}))
    (48, 12)
    """
    rows = getattr(groups, "_layer_macs", None)
    if rows is None:  # the dense count per layer, once per analysis
        rows = {r.name: r.flops or 0 for r in summary(groups.model, print_fn=None).layers}
        groups._layer_macs = rows
    total = sum(rows.values())
    masks = groups.keep_masks(keep)
    for layer, kind, _, _ in groups.layers.values():
        if kind not in ("producer", "depthwise", "heads") or not rows.get(layer.name):
            continue
        inp, out = masks[id(layer)]
        # An attention layer's projections scale with its heads.
        fraction = out.mean() if kind == "heads" else inp.mean() * (out.mean() if kind == "producer" else 1.0)
        total -= rows[layer.name] * (1.0 - fraction)
    return total


def uniform_keep(groups, width, scores=None):
    """Keep `width` of every prunable group (at least one unit), best `scores` first.

    `scores` maps group names to per-unit scores (higher is kept); without
    them the first units are kept.
    """
    keep = {}
    for name, group in groups.prunable().items():
        n = max(1, int(round(width * group.size)))
        if scores is None:
            keep[name] = np.arange(n)
        else:
            keep[name] = np.sort(np.argsort(-np.asarray(scores[name]), kind="stable")[:n])
    return keep


def prune_groups(model, keep, groups=None, input_scale=None, bias_shift=None):
    """Return a smaller copy of `model` keeping the units `keep` of each group.

    Args:
        model: a built Sequential / functional model.
        keep: `{group name: indices of units kept}` for groups of
            `channel_groups(model)`; unnamed groups keep every channel.
        groups: the `channel_groups(model)` result, if already computed.
        input_scale: optional `{consumer layer name: factors per kept input row}`
            folded into that layer's kernel.
        bias_shift: optional `{consumer layer name: vector over its original
            outputs}` added to its bias (a bias is created if it had none).

    Every layer the removed units touch is sliced: producer filters and
    bias, BatchNormalization / PReLU entries, depthwise filters, the input
    rows of every consumer (per position after a Flatten), `Reshape` targets.
    With every unit kept it equals the original exactly.

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> x = keras.Input((8,))
    >>> h = keras.layers.Dense(6, name="h")(x)
    >>> m = keras.Model(x, keras.layers.Dense(2)(keras.layers.Add()([h, keras.layers.Dense(6)(h)])))
    >>> small = tfs.surgery.prune_groups(m, {"h": [0, 2, 4]})  # h and the Dense it is added to
    >>> [l.units for l in small.layers if isinstance(l, keras.layers.Dense)]
    [3, 3, 2]
    """
    groups = groups if groups is not None else channel_groups(model)
    _check_keep(groups, keep)
    masks = groups.keep_masks(keep)
    input_scale, bias_shift = input_scale or {}, bias_shift or {}
    info = {id(layer): (kind,) + masks[key] for key, (layer, kind, _, _) in groups.layers.items()}

    def replace(layer):
        if id(layer) not in info:
            return None
        kind, inp, out = info[id(layer)]
        config = layer.get_config()
        changed = False
        if kind == "producer" and not out.all():
            config["units" if "units" in config else "filters"] = int(out.sum())
            changed = True
        if kind == "producer" and layer.name in bias_shift and not config.get("use_bias", True):
            config["use_bias"] = changed = True
        if kind == "heads" and not out.all():
            config["num_heads"] = int(out.sum())
            changed = True
        if kind == "reshape" and "target_shape" in config and not out.all():  # Flatten infers its shape
            config["target_shape"] = tuple(config["target_shape"][:-1]) + (int(out.sum()),)
            changed = True
        if kind == "flatten" and "target_shape" in config and not out.all():
            config["target_shape"] = (int(np.prod(config["target_shape"])) // len(out) * int(out.sum()),)
            changed = True
        if not changed:
            return None
        with _compat.unsafe_deserialization():
            return layer.__class__.from_config(config)

    def transfer(old, new):
        if id(old) in info and info[id(old)][0] == "heads":
            _transfer_heads(old, new, info[id(old)][2])
            return
        weights = [w.copy() for w in old.get_weights()]
        if id(old) in info:
            kind, inp, out = info[id(old)]
            if kind == "producer":
                kernel = weights[0][..., inp, :][..., out]
                scale = input_scale.get(old.name)
                if scale is not None:
                    kernel = kernel * np.asarray(scale, kernel.dtype).reshape((-1, 1))
                weights[0] = kernel
                if len(weights) > 1:
                    weights[1] = weights[1][out]
                shift = bias_shift.get(old.name)
                if shift is not None:
                    shift = np.asarray(shift)[out]  # given over the original outputs
                    if len(weights) == 1:
                        weights.append(np.zeros(kernel.shape[-1], kernel.dtype))
                    weights[1] = (weights[1] + shift).astype(kernel.dtype)
            elif kind == "depthwise":
                weights[0] = weights[0][..., inp, :]
                if len(weights) > 1:
                    weights[1] = weights[1][inp]
            elif kind == "per_channel":
                width = len(inp)
                weights = [w[..., inp] if w.ndim and w.shape[-1] == width else w for w in weights]
        new.set_weights(weights)

    return map_layers(model, replace, transfer=transfer)


def _transfer_heads(old, new, keep):
    """Copy the kept heads of a `MultiHeadAttention`: the query/key/value kernels
    are (input, heads, size), their biases (heads, size); the output kernel is
    (heads, size, output)."""
    for name in ("query_dense", "key_dense", "value_dense"):
        kernel, *bias = getattr(old, name).get_weights()
        getattr(new, name).set_weights([kernel[:, keep]] + [b[keep] for b in bias])
    kernel, *bias = old.output_dense.get_weights()
    new.output_dense.set_weights([kernel[keep]] + bias)


ALLOCATIONS = ("uniform", "global")


def keep_for_budget(groups, scores, width=None, flops=None, allocation="uniform"):
    """The units to keep for a `width` or `flops` budget, best `scores` first.

    Args:
        groups: `channel_groups(model)`.
        scores: `{group name: per-unit scores}` for every prunable group.
        width: fraction of every prunable group's channels kept.
        flops: fraction of the dense MACs kept (exact count, `group_macs`).
        allocation: how `flops` is spread over the groups: "uniform" (the
            largest uniform width within the budget, by bisection) or
            "global" (one threshold on the scores across all groups, by
            bisection: groups with weak units lose more; scores must be
            comparable between groups). Either way, single units are then
            added (best score first) while the MACs stay within `flops`.

    Raises a `ValueError` when no prunable group exists or the frozen
    channels make `flops` unreachable (naming them and the smallest MACs).

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="h"), keras.layers.Dense(2)])
    >>> g = tfs.surgery.channel_groups(m)
    >>> keep = tfs.surgery.keep_for_budget(g, {"h": np.arange(8.0)}, flops=0.5)
    >>> [int(i) for i in keep["h"]]
    [4, 5, 6, 7]
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(ALLOCATIONS)}; received {allocation!r}.")
    prunable = groups.prunable()
    check_budget(groups, flops)
    missing = sorted(set(prunable) - set(scores))
    if missing:
        raise ValueError(f"`scores` lacks the prunable groups {missing}.")
    if width is not None:
        return uniform_keep(groups, width, scores)
    dense = group_macs(groups, {})
    make = (lambda t: uniform_keep(groups, t, scores)) if allocation == "uniform" else (
        _threshold_keep(prunable, scores))
    lo, hi = 0.0, 1.0
    best = make(0.0)
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        keep = make(mid)
        if group_macs(groups, keep) / dense > flops:
            hi = mid
        else:
            lo, best = mid, keep
    return _fill(groups, best, scores, flops, dense)


def check_budget(groups, flops=None):
    """Raise a `ValueError` when no group can lose channels or `flops` is below what the
    frozen channels allow (naming them and the smallest reachable MACs)."""
    if not groups.prunable():
        raise ValueError("`model` has no channel group that can lose channels; frozen: "
                         f"{groups.frozen or {n: g.frozen for n, g in groups.groups.items()}}.")
    if flops is None:
        return
    smallest = group_macs(groups, uniform_keep(groups, 0.0)) / group_macs(groups, {})
    if flops < smallest:
        frozen = {n: g.frozen for n, g in groups.groups.items() if g.frozen}
        raise ValueError(
            f"`flops={flops}` is below the smallest reachable MACs ({smallest:.3f} of dense, one "
            f"channel per group); frozen groups: {frozen or 'none'}; frozen layers: "
            f"{groups.frozen or 'none'}.")


def _threshold_keep(prunable, scores):
    """`fraction -> keep`: the units above the global score quantile `1 - fraction` (>= 1 per group)."""
    pooled = np.sort(np.concatenate([np.asarray(scores[n], float) for n in prunable]))

    def keep(fraction):
        n_keep = int(round(fraction * len(pooled)))
        cut = np.inf if n_keep == 0 else pooled[len(pooled) - n_keep]
        out = {}
        for name in prunable:
            s = np.asarray(scores[name], float)
            chosen = np.flatnonzero(s >= cut)
            out[name] = chosen if len(chosen) else np.array([int(np.argmax(s))])
        return out

    return keep


def _fill(groups, keep, scores, flops, dense, tol=1e-3):
    """Spend what the bisection left: add single units (each group's next best, the
    globally best-scored first) while the MACs stay within `flops`."""
    keep = {n: np.asarray(k) for n, k in keep.items()}
    full = set()
    while flops - group_macs(groups, keep) / dense > tol:
        added = False
        nexts = []
        for name, group in groups.prunable().items():
            if name in full or len(keep[name]) >= group.size:
                continue
            order = np.argsort(-np.asarray(scores[name]), kind="stable")
            taken = set(keep[name].tolist())
            extra = next(int(i) for i in order if i not in taken)
            nexts.append((-float(np.asarray(scores[name])[extra]), name, extra))
        for _, name, extra in sorted(nexts):
            trial = dict(keep)
            trial[name] = np.sort(np.append(keep[name], extra))
            if group_macs(groups, trial) / dense <= flops:
                keep, added = trial, True
            else:
                full.add(name)  # its next unit does not fit now; it will not later either
        if not added:
            break
    return keep


def dead_units(groups):
    """`{group name: kept unit indices}` dropping every unit no consumer reads.

    A unit is dead when every input row it feeds (in every Dense / Conv
    consumer, per position after a `Flatten`) is exactly zero: nothing
    downstream depends on it, so `prune_groups` removes it without changing
    any output. Each group keeps at least one unit (a layer cannot have zero
    channels). Groups with nothing dead are left out.

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="h"), keras.layers.Dense(2)])
    >>> _ = m.layers[1].kernel.assign(np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], "float32"))
    >>> {n: [int(i) for i in k] for n, k in tfs.surgery.dead_units(tfs.surgery.channel_groups(m)).items()}
    {'h': [0, 2]}
    """
    read = set()
    for layer, kind, inp, _ in groups.layers.values():
        if kind != "producer":
            continue
        kernel = keras.ops.convert_to_numpy(prunable.prunable_kernels(layer)[0])  # reads the input channels
        rows = np.any(np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1) != 0, axis=1)
        read.update(int(r) for r in groups.root(inp)[rows])
    keep = {}
    for name, group in groups.prunable().items():
        alive = np.array([k for k, r in enumerate(group.units) if int(r) in read], np.int64)
        if len(alive) < group.size:
            keep[name] = alive if len(alive) else np.array([0])
    return keep


def prune_dead_units(model):
    """`prune_groups(model, dead_units(channel_groups(model)))`: the smaller model with
    every unit no consumer reads removed; outputs unchanged. What `tfs.strip` does
    after channel-STR over channel groups."""
    groups = channel_groups(model)
    keep = dead_units(groups)
    return prune_groups(model, keep, groups) if keep else model
