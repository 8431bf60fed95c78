"""Greedy forward selection of neurons/channels (Ye et al., ICML 2020 and
NeurIPS 2020), plus the L1-norm filter pruning baseline (Li et al., ICLR 2017).

Both produce a physically smaller Keras model through
`tf_sparsity.surgery.prune_channels`.
"""


import keras
import numpy as np
from keras import ops

from tf_sparsity import _compat, prunable, surgery
from tf_sparsity.pruning.finetune import train_steps
from tf_sparsity.pruning.greedy_loss import greedy_loss
from tf_sparsity.summarize import summary

OBJECTIVES = ("local", "global", "auto", "reconstruction", "loss")


def _check_fraction(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be a fraction in (0, 1); received {value!r}.")
    return float(value)


def _inputs_of(data, model):
    x = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
    if x is None:
        raise ValueError("`data` is required: pass `x` or `(x, y)` with a batch of real inputs.")
    x = np.asarray(x)
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
        raise ValueError(f"`data` must have shape (n, {', '.join(str(e) for e in expected)}) to fit "
                         f"the model's input; received {x.shape}.")
    if len(x) == 0:
        raise ValueError("`data` is empty.")
    return x.astype(model.inputs[0].dtype)


def _uniform_width_for_flops(model, chains, flops):
    """Fraction of channels kept per layer so that MACs ≈ `flops` × dense MACs."""
    dense = summary(model, print_fn=None).flops

    def ratio(width):
        keep = {n: range(max(1, round(width * c.width))) for n, c in chains.items()}
        return summary(surgery.prune_channels(model, keep), print_fn=None).flops / dense

    lo, hi = 0.0, 1.0
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > flops:
            hi = mid
        else:
            lo = mid
    return max(lo, 1e-6)


def _budgets(model, chains, width, flops):
    if width is not None and flops is not None:
        raise ValueError("Pass at most one budget: `width` or `flops`.")
    if flops is not None:
        width = _uniform_width_for_flops(model, chains, flops)
    if width is None:
        return {n: c.width for n, c in chains.items()}
    return {n: max(1, round(width * c.width)) for n, c in chains.items()}


class _LocalFit:
    """Least squares of the full contribution by a subset of channels, in Gram form."""

    def __init__(self, contributions):
        c = contributions.astype("float64")
        self.means = c.mean(axis=1)  # (N, M): per-channel mean contribution per output unit
        centered = (c - self.means[:, None, :]).reshape(len(c), -1)
        self.gram = centered @ centered.T
        self.b = self.gram.sum(axis=1)  # <c_j, T> with T = sum_j c_j
        self.total = max(float(self.b.sum()), 1e-30)  # ||T||^2

    def solve(self, selected):
        s = np.asarray(selected)
        g = self.gram[np.ix_(s, s)] + 1e-10 * np.eye(len(s)) * max(1.0, np.trace(self.gram) / len(self.gram))
        alpha = np.linalg.solve(g, self.b[s])
        error = 1.0 - float(self.b[s] @ alpha) / self.total
        return alpha, max(error, 0.0)

    def gains(self, selected):
        """Reduction of the squared residual from adding each channel."""
        diag = np.diag(self.gram)
        if not selected:
            return self.b ** 2 / np.maximum(diag, 1e-30)
        s = np.asarray(selected)
        g_inv = np.linalg.pinv(self.gram[np.ix_(s, s)])
        v = self.gram[:, s]
        alpha = g_inv @ self.b[s]
        num = (self.b - v @ alpha) ** 2
        den = diag - np.einsum("ij,jk,ik->i", v, g_inv, v)
        gains = num / np.maximum(den, 1e-12 * max(diag.max(), 1e-30))
        gains[s] = -np.inf
        return gains

    def bias_shift(self, selected, alpha):
        return self.means.sum(axis=0) - alpha @ self.means[np.asarray(selected)]


def _select_local(fit, budget, tolerance, candidates, rng):
    selected, error = [], 1.0
    alpha = np.zeros(0)
    while len(selected) < budget and error > tolerance:
        gains = fit.gains(selected)
        pool = np.flatnonzero(np.isfinite(gains))
        if candidates is not None and len(pool) > candidates:
            pool = rng.choice(pool, candidates, replace=False)
        selected.append(int(pool[np.argmax(gains[pool])]))
        alpha, error = fit.solve(selected)
    return selected, alpha, error


def _select_global(fit, budget, tolerance, h, tail, reference, candidates, taylor, rng):
    """Add the channel that best keeps the network's final output (MSE vs the original)."""
    mean = h.mean(axis=tuple(range(h.ndim - 1)))
    scale = max(float(np.var(reference)), 1e-30)
    import tensorflow as tf  # GradientTape for the Taylor ranking

    def outputs(multipliers):
        # Removed channels are replaced by their mean, kept ones re-weighted:
        # for the linear consumer this equals LS re-weighting plus bias shift.
        m = multipliers.reshape((len(multipliers),) + (1,) * (h.ndim - 1) + (-1,))
        x = mean + m * (h[None] - mean)
        return ops.convert_to_numpy(tail(x.reshape((-1,) + h.shape[1:]))).reshape(
            (len(multipliers), -1) + reference.shape[1:])

    def multipliers_for(sets):
        out = np.zeros((len(sets), h.shape[-1]), "float32")
        for row, s in enumerate(sets):
            alpha, _ = fit.solve(s)
            out[row, s] = alpha
        return out

    selected, error = [], 1.0
    while len(selected) < budget and error > tolerance:
        pool = np.setdiff1d(np.arange(h.shape[-1]), selected)
        if taylor and selected and len(pool) > (candidates or 16):
            base = multipliers_for([selected])[0]
            m = tf.Variable(base)
            with tf.GradientTape() as tape:
                x = mean + tf.reshape(m, (1,) * (h.ndim - 1) + (-1,)) * (h - mean)
                loss = tf.reduce_mean((tail(x) - reference) ** 2)
            grad = tape.gradient(loss, m).numpy()
            # First-order change from switching a channel on at weight 1.
            pool = pool[np.argsort(grad[pool])[: candidates or 16]]
        elif candidates is not None and len(pool) > candidates:
            pool = rng.choice(pool, candidates, replace=False)
        results = []
        for start in range(0, len(pool), 8):
            chunk = pool[start:start + 8]
            out = outputs(multipliers_for([selected + [int(j)] for j in chunk]))
            results.extend(((out - reference[None]) ** 2).reshape(len(chunk), -1).mean(axis=1))
        selected.append(int(pool[int(np.argmin(results))]))
        error = float(np.min(results)) / scale
    alpha, _ = fit.solve(selected)
    return selected, alpha, error


def _sub_models(model, chain):
    source = chain.flatten.input if chain.flatten is not None else chain.consumer.input
    head = _compat.graph_slice(model.inputs, source)
    try:
        tail = _compat.graph_slice([source], model.outputs)
    except Exception:  # the rest of the graph needs other tensors: no global objective here
        return head, None
    return head, lambda x: tail([x])[0]


def greedy_prune(model, data, objective="auto", width=None, flops=None, tolerance=1e-3,
                 candidates=None, taylor=False, finetune_steps=0, batch_size=256, seed=0,
                 verbose=1, return_report=False, accuracy_fraction=0.98, learning_rate=1e-2,
                 allocation="uniform"):
    """Structured pruning by greedy forward selection; returns a smaller model.

    Layer by layer (units of Dense, filters of Conv1D/Conv2D, input side
    first), starts from no channels and repeatedly adds the channel that most
    reduces an imitation loss on a batch of `data`:

    - "local": match the next layer's original pre-activation, with the best
      least-squares re-weighting of the kept channels (folded into the next
      layer's weights) and a bias correction for the removed ones;
    - "global": match the network's final output (MSE to the original);
    - "auto": run both per layer and keep whichever needs fewer channels
      (at equal count, the lower final-output error);
    - "loss": **the paper's method** (`tfs.pruning.greedy_loss`): per
      channel dependency group, units added one at a time to minimise the
      training loss (labels from `data=(x, y)`, or the original model's
      output when `data` is `x` only: the global variant) on a fresh
      minibatch, each with the paper's `N / n` rescale, `candidates`
      (default 50) random candidates per step, stopping at
      `accuracy_fraction` (0.98) of the training accuracy, and
      `finetune_steps` SGD steps (`learning_rate`) after every group;
      `width` / `flops` cap each group (uniform width);
    - "reconstruction": "local" over channel dependency groups
      (`tfs.surgery.channel_groups`): residual-tied, depthwise, concatenated
      and squeeze-excite channels are selected as one unit, reconstructing
      every consumer's pre-activation at once (each consumer weighted
      alike). Works on keras.applications networks; see `greedy_groups`.

    Selection stops when the objective's relative error falls to `tolerance`
    or the layer reaches its budget: `width` (fraction of channels per
    layer) or `flops` (fraction of the dense MACs, spent as a uniform width).
    Layers whose outputs meet others in Add/Concatenate/Multiply, shared
    layers and the output layer are left alone (listed in the report).

    Args:
        model: built Sequential / functional model.
        data: `x` or `(x, y)`; a batch (the first `batch_size` rows) is used.
        candidates: evaluate only this many (random) candidates per step.
        taylor: for "global", rank candidates by a first-order estimate and
            evaluate only the best `candidates` (default 16).
        finetune_steps: Adam steps on the MSE to the original model's outputs
            after pruning (imitation; labels are not needed); for "loss", SGD
            steps on the loss after every group (the paper's short
            fine-tuning between layers).
        accuracy_fraction, learning_rate: "loss" only (see `greedy_loss`).
        allocation: "reconstruction" with `flops` only: "uniform" (every group
            keeps the same fraction) or "global" (one relative-error level
            across groups; see `greedy_groups`).
        return_report: also return a dict per layer (kept/total, error, objective).

    Example:

    >>> (x, y), _ = tfs.datasets.mnist1d()  # doctest: +SKIP
    >>> small = tfs.greedy_prune(model, x[:512], width=0.5, verbose=0)  # doctest: +SKIP
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {list(OBJECTIVES)}; received {objective!r}.")
    width, flops = _check_fraction("width", width), _check_fraction("flops", flops)
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a number >= 0; received {tolerance!r}.")
    if candidates is not None and (not isinstance(candidates, int) or candidates < 1):
        raise ValueError(f"`candidates` must be an integer >= 1; received {candidates!r}.")
    if allocation not in surgery.ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(surgery.ALLOCATIONS)}; received {allocation!r}.")
    if allocation != "uniform" and (objective != "reconstruction" or flops is None):
        raise ValueError("`allocation='global'` needs `objective='reconstruction'` and a `flops` budget; "
                         f"received objective={objective!r}, flops={flops!r}.")
    model = surgery.as_graph_model(model)
    x = _inputs_of(data, model)
    if objective == "loss":
        y = data[1] if isinstance(data, (tuple, list)) and len(data) == 2 else None
        current, report = greedy_loss(model, x, y, width=width, flops=flops,
                                      accuracy_fraction=accuracy_fraction,
                                      candidates=50 if candidates is None else candidates,
                                      batch_size=batch_size, finetune_steps=finetune_steps,
                                      learning_rate=learning_rate, seed=seed, verbose=verbose)
        return (current, report) if return_report else current
    if objective == "reconstruction":
        if width is None and flops is None:
            width = 1.0 - 1e-9
        current, report = greedy_groups(model, x[:batch_size], width=width, flops=flops,
                                        tolerance=tolerance, candidates=candidates, seed=seed,
                                        allocation=allocation, verbose=verbose)
        if finetune_steps:
            _imitate(current, model, x, finetune_steps, batch_size, seed)
        return (current, report) if return_report else current
    batch = x[:batch_size]
    chains, left_alone = surgery.channel_chains(model)
    if not chains:
        raise ValueError("`model` has no layer whose channels can be removed "
                         f"(Dense/Conv1D/Conv2D feeding one Dense/Conv): {left_alone}.")
    budgets = _budgets(model, chains, width, flops)
    rng = np.random.default_rng(seed)
    reference = ops.convert_to_numpy(model(batch, training=False))
    current = model
    report = {name: {"kept": None, "total": c.width, "left_alone": False} for name, c in chains.items()}
    for name, reason in left_alone.items():
        report[name] = {"left_alone": True, "reason": reason}
    progress = keras.utils.Progbar(len(chains), verbose=verbose, unit_name="layer")
    for i, name in enumerate(chains):
        chain = surgery.channel_chains(current)[0][name]
        head, tail = _sub_models(current, chain)
        h = ops.convert_to_numpy(head([batch])).astype("float32")
        fit = _LocalFit(surgery.channel_contributions(h, chain.consumer, chain.flatten))
        results = {}
        if objective in ("local", "auto") or tail is None:
            results["local"] = _select_local(fit, budgets[name], tolerance, candidates, rng)
        if objective in ("global", "auto") and tail is not None:
            results["global"] = _select_global(fit, budgets[name], tolerance, h, tail, reference,
                                               candidates, taylor, rng)
        chosen = min(results, key=lambda k: (len(results[k][0]), results[k][2]))
        selected, alpha, error = results[chosen]
        order = np.argsort(selected)
        kept = np.asarray(selected)[order]
        current = surgery.prune_channels(
            current, {name: kept}, input_scale={name: alpha[order]},
            bias_shift={name: fit.bias_shift(selected, alpha).astype("float32")})
        report[name].update(kept=len(kept), error=error, objective=chosen)
        progress.update(i + 1, values=[("kept", len(kept) / chain.width), ("error", error)])
    if finetune_steps:
        _imitate(current, model, x, finetune_steps, batch_size, seed)
    return (current, report) if return_report else current


def _unit_contributions(h, layer, rows, max_elements=20_000_000):
    """Each unit's contribution to `layer`'s pre-activation, `(units, samples, outputs)`.

    `rows[k]` are the input rows (channels, or flattened positions x
    channels for a Dense after Flatten) fed by unit `k`.
    """
    kernel = ops.convert_to_numpy(layer.kernel).astype("float32")
    if isinstance(layer, keras.layers.Dense):
        h = h.reshape(-1, h.shape[-1])
        return np.stack([h[:, r] @ kernel[r] for r in rows])
    if any(len(r) != 1 for r in rows):
        raise ValueError(f"'{layer.name}': a unit feeds several input channels of a convolution.")
    idx = np.array([r[0] for r in rows])
    n, out = len(idx), kernel.shape[-1]
    positions = max(1, int(np.prod(h.shape[1:-1])))
    keep = max(1, min(len(h), max_elements // max(1, n * out * positions)))
    y = ops.convert_to_numpy(ops.depthwise_conv(
        h[:keep][..., idx], kernel[..., idx, :], strides=layer.strides, padding=layer.padding,
        dilation_rate=layer.dilation_rate))
    return np.transpose(y.reshape(keep, -1, n, out), (2, 0, 1, 3)).reshape(n, -1, out)


def _orthogonal_select(gram, b, budget, tolerance, candidates, rng):
    """Forward selection minimising ||T - sum_S alpha_j c_j||^2 in Gram form, with
    incremental Gram-Schmidt (O(N k) per step, not a solve per candidate).

    Returns the units in the order they were added and the relative error
    after each addition (non-increasing).
    """
    n = len(gram)
    total = max(float(b.sum()), 1e-30)
    diag = np.diag(gram).copy()
    floor = 1e-12 * max(float(diag.max()), 1e-30)
    u = np.zeros((n, min(budget, n)))
    w = np.zeros(min(budget, n))
    proj_b = np.zeros(n)  # G_jS G_SS^-1 b_S
    proj_d = np.zeros(n)  # G_jS G_SS^-1 G_Sj
    selected, errors, explained, error = [], [], 0.0, 1.0
    while len(selected) < min(budget, n) and error > tolerance:
        den = diag - proj_d
        gains = (b - proj_b) ** 2 / np.maximum(den, floor)
        gains[selected] = -np.inf
        pool = np.flatnonzero(np.isfinite(gains))
        if candidates is not None and len(pool) > candidates:
            pool = rng.choice(pool, candidates, replace=False)
        j = int(pool[np.argmax(gains[pool])])
        t = len(selected)
        norm = np.sqrt(max(den[j], floor))
        u[:, t] = (gram[:, j] - u[:, :t] @ u[j, :t]) / norm
        w[t] = (b[j] - u[j, :t] @ w[:t]) / norm
        proj_b += u[:, t] * w[t]
        proj_d += u[:, t] ** 2
        explained += w[t] ** 2
        selected.append(j)
        error = max(1.0 - explained / total, 0.0)
        errors.append(error)
    return selected, errors


def _refit(gram, b, kept):
    """Least-squares weights of the units `kept` and the relative error they leave."""
    n = len(gram)
    g = gram[np.ix_(kept, kept)] + 1e-10 * np.eye(len(kept)) * max(1.0, np.trace(gram) / n)
    alpha = np.linalg.solve(g, b[kept])
    return alpha, max(1.0 - float(alpha @ b[kept]) / max(float(b.sum()), 1e-30), 0.0)


def _selection_scores(size, order, errors):
    """Per-unit scores for a global allocation: the relative error left just before the unit
    was added (1 for the first), so one threshold keeps a prefix of every group's order; units
    never added (the group met `tolerance` first) rank below all."""
    scores = -1.0 - np.arange(size) * 1e-9
    before = np.concatenate([[1.0], errors[:-1]]) if len(order) else np.zeros(0)
    scores[np.asarray(order, dtype=np.int64)] = before - np.arange(len(order)) * 1e-12
    return scores


def greedy_groups(model, x, width=None, flops=None, tolerance=1e-3, candidates=None, seed=0,
                  allocation="uniform", verbose=0):
    """Greedy forward selection by channel dependency group ("reconstruction").

    For each prunable group of `tfs.surgery.channel_groups(model)`, the
    consumers are the Dense/Conv layers its channels feed (through BN,
    depthwise convolutions, adds, squeeze-excite, ...). Units are added one
    at a time to best reconstruct all consumers' pre-activations on `x`
    (each consumer's error relative to its own energy, summed), with the
    least-squares re-weighting folded into every consumer and the removed
    units' mean into their biases. Statistics come from the original model;
    one surgery at the end.

    A `flops` budget is spread over the groups by `allocation`: "uniform"
    (every group keeps the same fraction, the largest within the budget) or
    "global" (every group is selected to the end of its order, then one
    relative-error level is found, by bisection, such that each group keeps
    the units added before its error fell below it: the same stopping rule in
    every group, as the paper's per-layer stop, at the level that meets the
    MACs; groups that are easy to reconstruct lose more).

    Args:
        model: built Sequential / functional model.
        x: a batch of inputs (NumPy).
        width, flops: the budget (see `tfs.surgery.keep_for_budget`).
        tolerance: stop a group early at this relative reconstruction error.
        candidates: evaluate only this many random candidates per step.
        allocation: "uniform" or "global" (`flops` only).

    Returns `(small model, report)`; the report has one dict per group.

    Example:

    >>> m = tfs.zoo.mnist1d_cnn()
    >>> x = np.random.default_rng(0).normal(size=(64, 40, 1)).astype("float32")
    >>> small, report = tfs.pruning.greedy_groups(m, x, flops=0.5)
    >>> tfs.summary(small, print_fn=None).flops <= 0.5 * tfs.summary(m, print_fn=None).flops
    True
    >>> small, report = tfs.pruning.greedy_groups(m, x, flops=0.5, allocation="global")
    >>> tfs.summary(small, print_fn=None).flops <= 0.5 * tfs.summary(m, print_fn=None).flops
    True
    """
    if allocation not in surgery.ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(surgery.ALLOCATIONS)}; received {allocation!r}.")
    if allocation == "global" and flops is None:
        raise ValueError("`allocation='global'` spreads a `flops` budget; pass `flops`, not `width`.")
    groups = surgery.channel_groups(model)
    prunable = groups.prunable()
    if allocation == "global":  # every group to the end of its order; the budget is checked first
        surgery.check_budget(groups, flops)
        caps = {name: g.size for name, g in prunable.items()}
    else:
        zeros = {name: np.zeros(g.size) for name, g in prunable.items()}
        caps = {n: len(k) for n, k in surgery.keep_for_budget(groups, zeros, width=width,
                                                              flops=flops).items()}
    rng = np.random.default_rng(seed)
    fits, orders, report = {}, {}, {}
    progress = keras.utils.Progbar(len(prunable), verbose=verbose, unit_name="group")
    for step, (name, group) in enumerate(prunable.items()):
        consumers = groups.consumers(group)
        inputs = _compat.graph_slice(model.inputs, [layer.input for layer, _ in consumers])([x])
        parts = []
        for (layer, rows), h in zip(consumers, inputs):
            c = _unit_contributions(ops.convert_to_numpy(h).astype("float32"), layer, rows)
            energy = max(float(np.sum(c.sum(axis=0) ** 2)), 1e-30)
            parts.append((layer, rows, c.astype("float64") / np.sqrt(energy), np.sqrt(energy)))
        centered = [(c - c.mean(axis=1, keepdims=True)).reshape(len(c), -1) for _, _, c, _ in parts]
        gram = sum(m @ m.T for m in centered)
        # Only the Gram matrix and each consumer's per-unit means outlive the loop (the
        # contributions can be hundreds of MB per group on a keras.applications network).
        means = [(layer, rows, c.mean(axis=1) * norm) for layer, rows, c, norm in parts]
        fits[name] = (gram, gram.sum(axis=1), means)
        orders[name] = _orthogonal_select(gram, fits[name][1], caps[name], tolerance, candidates, rng)
        report[name] = {"total": group.size, "consumers": [layer.name for layer, _ in consumers]}
        progress.update(step + 1, values=[("error", orders[name][1][-1])])
    if allocation == "global":
        scores = {name: _selection_scores(prunable[name].size, *orders[name]) for name in prunable}
        keep = surgery.keep_for_budget(groups, scores, flops=flops, allocation="global")
    else:
        keep = {name: np.sort(order) for name, (order, _) in orders.items()}
    scales, shifts = {}, {}
    for name, (gram, b, means) in fits.items():
        kept = np.asarray(keep[name], dtype=np.int64)
        alpha, error = _refit(gram, b, kept)
        for layer, rows, mean in means:
            scale = scales.setdefault(layer.name, np.ones(layer.kernel.shape[-2]))
            for k, a in zip(kept, alpha):
                scale[rows[k]] = a
            shifts[layer.name] = shifts.get(layer.name, 0.0) + mean.sum(axis=0) - alpha @ mean[kept]
        report[name].update(kept=len(kept), error=error)
    masks = groups.keep_masks(keep)
    input_scale = {}
    for layer, kind, _, _ in groups.layers.values():
        if kind == "producer" and layer.name in scales:
            input_scale[layer.name] = scales[layer.name][masks[id(layer)][0]]
    small = surgery.prune_groups(model, keep, groups, input_scale=input_scale,
                                 bias_shift={n: v.astype("float32") for n, v in shifts.items()})
    return small, report


def _imitate(student, teacher, x, steps, batch_size, seed):
    """Fine-tune `student` for `steps` Adam steps to reproduce `teacher`'s outputs (no labels)."""
    import tensorflow as tf  # tf.data input pipeline

    targets = teacher.predict(x, verbose=0, batch_size=512)
    data = tf.data.Dataset.from_tensor_slices((x, targets)).shuffle(len(x), seed=seed).repeat().batch(batch_size)
    train_steps(student, data.take(steps), keras.losses.MeanSquaredError(), keras.optimizers.Adam(1e-3))


def _prune_by_group_scores(model, score, width, flops, data, finetune_steps, batch_size, seed,
                           allocation="uniform"):
    """Shared path of the group-wise baselines: score units, meet the budget, cut, fine-tune."""
    width, flops = _check_fraction("width", width), _check_fraction("flops", flops)
    if width is None and flops is None:
        raise ValueError("Pass a budget: `width` or `flops` (a fraction in (0, 1)).")
    if width is not None and flops is not None:
        raise ValueError("Pass at most one budget: `width` or `flops`.")
    groups = surgery.channel_groups(model, heads=True)
    scores = {name: score(group) for name, group in groups.prunable().items()}
    keep = surgery.keep_for_budget(groups, scores, width=width, flops=flops, allocation=allocation)
    pruned = surgery.prune_groups(model, keep, groups)
    if finetune_steps:
        if data is None:
            raise ValueError("`data` is required for `finetune_steps`.")
        _imitate(pruned, model, _inputs_of(data, model), finetune_steps, batch_size, seed)
    return pruned


def group_l1_scores(group):
    """Per-unit L1 norm of a group's producer filters, summed over its layers (each
    layer's norms divided by their mean, so wide and narrow layers weigh alike)."""
    total = np.zeros(group.size)
    for layer, channels in group.producers:
        norms = _unit_l1(layer)[channels]
        total += norms / max(float(norms.mean()), 1e-30)
    return total


def _unit_l1(layer):
    """L1 norm of each output unit's weights (an attention layer's units: its heads)."""
    if isinstance(layer, keras.layers.MultiHeadAttention):
        # query/key/value kernels (input, heads, size), then the output kernel (heads, size, output)
        *qkv, out = [np.abs(ops.convert_to_numpy(k)) for k in prunable.prunable_kernels(layer)]
        return sum(k.sum(axis=(0, 2)) for k in qkv) + out.reshape(out.shape[0], -1).sum(axis=1)
    kernel = np.abs(ops.convert_to_numpy(layer.kernel))
    return kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)


def l1_norm_prune(model, width=None, flops=None, data=None, finetune_steps=0, batch_size=256, seed=0,
                  allocation="uniform"):
    """Baseline: keep the channels with the largest L1 kernel norm (Li et al. 2017).

    Channels are removed by dependency group (`tfs.surgery.channel_groups`):
    channels tied by residual adds, depthwise convolutions, concatenations or
    squeeze-excite go together, scored by the summed norms of their filters.
    With `allocation="uniform"` (Li et al.'s per-layer ratio) every prunable
    group keeps the same fraction (`width`, or for `flops` the largest
    uniform width within that fraction of the dense MACs); with
    `allocation="global"` (`flops` only) one threshold on the scores (each
    layer's norms relative to their mean) ranks all groups' units together,
    so layers with weak filters lose more. Both then add single channels
    while they fit: the MACs land within ~1% under `flops` where the groups
    allow.

    Args:
        model: built Sequential / functional model.
        width: fraction of channels kept per group.
        flops: fraction of the dense MACs to keep (`tfs.summary(...).flops`).
        data: `x` or `(x, y)`, needed with `finetune_steps`.
        finetune_steps: Adam steps on the MSE to `model`'s outputs afterwards.
        allocation: "uniform" or "global" (see above).

    Example:

    >>> small = tfs.pruning.l1_norm_prune(tfs.zoo.mnist1d_cnn(), flops=0.5)
    >>> round(tfs.summary(small, print_fn=None).flops / tfs.summary(tfs.zoo.mnist1d_cnn(), print_fn=None).flops, 1)
    0.5
    """
    if allocation == "global" and flops is None:
        raise ValueError("`allocation='global'` spreads a `flops` budget; pass `flops`, not `width`.")
    return _prune_by_group_scores(model, group_l1_scores, width, flops, data, finetune_steps,
                                  batch_size, seed, allocation)


def random_prune(model, width=None, flops=None, data=None, finetune_steps=0, batch_size=256, seed=0):
    """Baseline: keep random channels of every dependency group (same budgets as `l1_norm_prune`).

    Args:
        model: built Sequential / functional model.
        width: fraction of channels kept per group.
        flops: fraction of the dense MACs to keep.
        data: `x` or `(x, y)`, needed with `finetune_steps`.
        finetune_steps: Adam steps on the MSE to `model`'s outputs afterwards.
        seed: seeds the choice and the fine-tune.

    Example:

    >>> small = tfs.pruning.random_prune(tfs.zoo.mnist1d_cnn(), width=0.5)
    >>> [l.filters for l in small.layers if isinstance(l, keras.layers.Conv1D)]
    [16, 16, 16]
    """
    rng = np.random.default_rng(seed)
    return _prune_by_group_scores(model, lambda group: rng.random(group.size), width, flops, data,
                                  finetune_steps, batch_size, seed)
