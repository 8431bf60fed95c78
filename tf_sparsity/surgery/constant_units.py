"""Fold channel-group units that are constant on the data into their consumers' bias.

A unit whose value reaching every consumer (every Dense / Conv layer reading
it) is the same for all samples and positions of `x` carries no signal: its
contribution `constant x kernel rows` is a bias. `fold_constant_units` adds
it to each consumer's bias and removes the unit with `prune_groups` (its
`bias_shift`). Channel pruning leaves such units behind, e.g. a squeeze-excite
unit whose ReLU never fires; int8 export then collapses that tensor's range to
a point and XNNPack refuses the model (`tfs.export.convert` folds them first).
"""

import keras
import numpy as np

from tf_sparsity import _compat
from tf_sparsity.surgery.graph import as_graph_model, wrappers
from tf_sparsity.surgery.group_surgery import prune_groups
from tf_sparsity.surgery.groups import channel_groups

__all__ = ["fold_constant_units"]


def fold_constant_units(model, x, tolerance=1e-6, whole_tensors=False, batch_size=32):
    """Remove the channel-group units constant on `x`, their value folded into the consumers' bias.

    Args:
        model: a built Sequential / functional model without tf_sparsity
            wrappers (`tfs.strip` it first); it is not changed.
        x: the data: an array (one input), a list of arrays (one per model
            input) or a dict by input name, samples along the first axis.
        tolerance: a unit is constant when, at every consumer, its values over
            all samples and positions of `x` differ by at most
            `tolerance * max(1, |value|)`.
        whole_tensors: fold only units whose every consumer reads an input
            that is constant as a whole (all channels): what collapses a
            per-tensor int8 range (`tfs.export.convert` uses this); a constant
            channel next to varying ones keeps its int8 range and stays.
        batch_size: samples per forward pass.

    Exactness: a constant 0 folds exactly into any consumer. A nonzero
    constant folds exactly into Dense layers and convolutions whose receptive
    field never sees padding (1x1 kernels, or `padding="valid"`); before a
    larger kernel with "same" / "causal" padding the border would read the
    padding's zeros, so such units are left in place ("not folded"). A
    consumer without a bias gets one. A group never empties: when all its
    units are constant one is kept with its consumers' kernel rows zeroed (so
    nothing reads it; its constant is folded like the others) and its
    producers' bias set to minus the median of its pre-activation on `x`, so
    it varies there (a valid int8 range). Units inside nested models, or
    groups read by a layer inside one, are not analysed.

    Returns:
        `(new model, report)`: `model` itself when nothing is folded; the
        report has one dict per constant unit: `group`, `unit` (index in the
        group), `constant` (its value at the first consumer), `consumers`,
        `action` ("removed", "kept" as the group's last unit, or "not
        folded") and, for the last two, `reason` (and `varies` for "kept":
        whether it now varies on `x`).

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> inp = keras.Input((4,))
    >>> h = keras.layers.Dense(3, activation="relu", name="h")(inp)
    >>> m = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
    >>> _ = m.get_layer("h").bias.assign([0.0, -100.0, 0.0])  # unit 1 never fires
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> small, report = tfs.surgery.fold_constant_units(m, x)
    >>> small.get_layer("h").units, [(r["group"], r["unit"], r["constant"], r["action"]) for r in report]
    (2, [('h', 1, 0.0, 'removed')])
    >>> bool(np.allclose(small.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-5))
    True
    """
    model = as_graph_model(model)
    if wrappers(model):
        raise ValueError("`model` holds tf_sparsity wrappers; fold the stripped model (`tfs.strip(model)`), "
                         "whose kernels are the effective ones.")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"`tolerance` must be a number >= 0; received {tolerance!r}.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be a positive integer; received {batch_size!r}.")
    arrays = _as_inputs(model, x)
    groups = channel_groups(model)
    plans = {name: (group, groups.consumers(group)) for name, group in groups.prunable().items()}
    readers = {id(layer): layer for _, consumers in plans.values() for layer, _ in consumers}
    ranges = _input_ranges(model, list(readers.values()), arrays, batch_size)

    def constant(low, high):
        mid = 0.5 * (low + high)
        return np.all(high - low <= tolerance * np.maximum(1.0, np.abs(mid))), mid

    report, keep, shifts, zeroed, kept = [], {}, {}, {}, []
    for name, (group, consumers) in plans.items():
        if not consumers or any(layer.name not in ranges for layer, _ in consumers):
            continue  # read inside a nested model: not analysed
        if whole_tensors and not all(constant(*ranges[layer.name])[0] for layer, _ in consumers):
            continue
        folded = []
        for k in range(group.size):
            found = [(layer, rows[k]) for layer, rows in consumers if len(rows[k])]
            if not found:
                continue
            values = []
            for layer, rows in found:
                low, high = ranges[layer.name]
                same, mid = constant(low[rows], high[rows])
                if not same:
                    break
                values.append((layer, rows, mid))
            else:
                entry = {"group": name, "unit": k, "constant": float(values[0][2][0]),
                         "consumers": [layer.name for layer, _, _ in values]}
                blocked = [_padding_reason(layer, mid) for layer, _, mid in values]
                blocked = [b for b in blocked if b]
                if blocked:
                    entry.update(action="not folded", reason=blocked[0])
                else:
                    entry["action"] = "removed"
                    folded.append((k, values))
                report.append(entry)
        if not folded:
            continue
        for k, values in folded:
            for layer, rows, mid in values:
                shift = shifts.setdefault(layer.name, np.zeros(layer.kernel.shape[-1], np.float64))
                shift += _folded_bias(layer, rows, mid)
        removed = {k for k, _ in folded}
        if len(removed) == group.size:  # keep one, read by nobody, varying on x
            last, values = folded[0]
            removed.discard(last)
            for layer, rows, _ in values:
                zeroed.setdefault(layer.name, []).extend(rows.tolist())
            kept.append((name, last, values))
        keep[name] = np.array([k for k in range(group.size) if k not in removed], np.int64)
    if not keep:
        return model, report
    masks = groups.keep_masks(keep)
    by_name = {layer.name: layer for layer, _, _, _ in groups.layers.values()}
    for name, last, _ in kept:
        for layer, channels in groups.groups[name].producers:
            shift = shifts.setdefault(layer.name, np.zeros(layer.kernel.shape[-1], np.float64))
            shift[channels[last]] -= _median_preactivation(model, layer, int(channels[last]), arrays, batch_size)
    input_scale = {}
    for layer_name, rows in zeroed.items():
        layer = by_name[layer_name]
        scale = np.ones(layer.kernel.shape[-2], np.float32)
        scale[rows] = 0.0
        input_scale[layer_name] = scale[masks[id(layer)][0]]
    new = prune_groups(model, keep, groups, input_scale=input_scale,
                       bias_shift={n: s.astype("float32") for n, s in shifts.items()})
    _mark_kept(new, report, kept, masks, arrays, batch_size, tolerance)
    return new, report


def _padding_reason(layer, mid):
    """Why a nonzero constant cannot be folded into `layer` exactly, or None."""
    if isinstance(layer, keras.layers.Dense) or not np.any(mid != 0):
        return None
    if layer.padding == "valid" or all(k == 1 for k in layer.kernel_size):
        return None
    return (f"a nonzero constant reaches '{layer.name}', a {'x'.join(map(str, layer.kernel_size))} "
            f"convolution with padding='{layer.padding}': its border positions read the padding's zeros, "
            "so the unit is not a bias there")


def _folded_bias(layer, rows, mid):
    """`constant x kernel rows`, summed over the kernel's spatial taps: the consumer's bias change."""
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    taps = np.moveaxis(kernel, -2, 0)[rows]  # (rows, *spatial, out)
    return np.asarray(mid, np.float64) @ taps.reshape(len(rows), -1, kernel.shape[-1]).sum(axis=1)


def _as_inputs(model, x):
    names = [t.name for t in model.inputs]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ValueError(f"`x` is a dict without the model inputs {missing}; keys: {sorted(x)}.")
        x = [x[n] for n in names]
    elif not isinstance(x, (list, tuple)):
        x = [x]
    if len(x) != len(names):
        raise ValueError(f"`x` must hold {len(names)} array(s), one per model input {names}; received {len(x)}.")
    arrays = [np.asarray(a) for a in x]
    for a, t in zip(arrays, model.inputs):
        if a.ndim != len(t.shape) or any(s is not None and s != d for s, d in zip(t.shape[1:], a.shape[1:])):
            raise ValueError(f"`x` for input '{t.name}' has shape {a.shape}; the model expects "
                             f"(n, {', '.join(str(s) for s in t.shape[1:])}).")
    if len({len(a) for a in arrays}) != 1 or not len(arrays[0]):
        raise ValueError("`x` must hold at least one sample, the same number for every input.")
    return arrays


def _batches(arrays, batch_size):
    for start in range(0, len(arrays[0]), batch_size):
        yield [a[start:start + batch_size] for a in arrays]


def _input_tensors(model, layers):
    """`{layer name: its input tensor}` for the top-level graph calls of `layers`."""
    wanted = {id(layer) for layer in layers}
    inputs, _, nodes = _compat.graph_nodes(model)
    found = {}
    for node in nodes:
        if id(node.operation) in wanted and len(node.input_tensors) == 1:
            found[node.operation.name] = node.input_tensors[0]
    return inputs, found


def _input_ranges(model, layers, arrays, batch_size):
    """`{layer name: (min, max) per input channel}` over all samples and positions of the data."""
    inputs, tensors = _input_tensors(model, layers)
    if not tensors:
        return {}
    names = list(tensors)
    run = _compat.graph_slice(inputs, [tensors[n] for n in names])
    ranges = {}
    for batch in _batches(arrays, batch_size):
        for name, h in zip(names, run(batch)):
            h = keras.ops.convert_to_numpy(h).astype(np.float64)
            h = h.reshape(-1, h.shape[-1])
            low, high = h.min(axis=0), h.max(axis=0)
            if name in ranges:
                low, high = np.minimum(low, ranges[name][0]), np.maximum(high, ranges[name][1])
            ranges[name] = (low, high)
    return ranges


def _median_preactivation(model, layer, channel, arrays, batch_size):
    """Median over the data of `layer`'s output `channel` before its activation."""
    inputs, tensors = _input_tensors(model, [layer])
    if layer.name not in tensors:  # inside a nested model
        return 0.0
    run = _compat.graph_slice(inputs, [tensors[layer.name]])
    kernel = layer.kernel[..., channel:channel + 1]
    values = []
    for batch in _batches(arrays, batch_size):
        h = run(batch)[0]
        z = keras.ops.matmul(h, kernel) if isinstance(layer, keras.layers.Dense) else layer.convolution_op(h, kernel)
        values.append(keras.ops.convert_to_numpy(z).ravel())
    bias = float(keras.ops.convert_to_numpy(layer.bias)[channel]) if layer.use_bias else 0.0
    return float(np.median(np.concatenate(values))) + bias


def _mark_kept(new, report, kept, masks, arrays, batch_size, tolerance):
    """Record for each kept last unit whether it varies on the data in `new` (its int8 range is valid)."""
    if not kept:
        return
    layers = {layer.name: new.get_layer(layer.name) for _, _, values in kept for layer, _, _ in values}
    ranges = _input_ranges(new, list(layers.values()), arrays, batch_size)
    for name, last, values in kept:
        varies = True
        for layer, rows, mid in values:
            position = np.cumsum(masks[id(layer)][0]) - 1
            low, high = ranges[layer.name]
            spread = high[position[rows]] - low[position[rows]]
            varies = varies and bool(np.any(spread > tolerance))
        entry = next(e for e in report if e["group"] == name and e["unit"] == last)
        entry.update(action="kept", varies=varies,
                     reason="the last unit of its group (a layer keeps one channel): its constant is folded, "
                            "its consumers' kernel rows are zero, its bias re-centred on the data"
                            + ("" if varies else "; it is still constant on the data (its int8 range collapses)"))
