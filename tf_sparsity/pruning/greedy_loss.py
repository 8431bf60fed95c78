"""The paper's greedy forward selection (Ye et al., ICML 2020), `objective="loss"`.

Per channel dependency group (`tfs.surgery.channel_groups`; one group =
one layer of the paper, one unit = one of its neurons), input side first:

1. start from the empty set: every consumer of the group (each Dense/Conv
   its channels reach) sees none of its channels;
2. on a fresh random minibatch, try each of `candidates` random units not yet
   selected: with `n` units selected plus the candidate, each selected
   unit's contribution is multiplied by `N / (n + 1)` (the 1/n average of the
   selected neurons in place of the layer's 1/N average of all `N`), the
   others by 0, and the training loss is computed (cross-entropy with the
   labels, or with the original model's output for the global variant);
   the candidate with the lowest loss is added;
3. stop when the training accuracy (on a fixed evaluation subset of the
   training data) reaches `accuracy_fraction` (the paper: 0.98) of the
   reference accuracy, or the group reaches its budget;
4. remove the unselected units (`tfs.surgery.prune_groups`, the `N / n`
   folded into the consumers' kernels) and fine-tune the whole network for
   `finetune_steps` SGD steps before the next group.

As in the official code, the candidate pool holds only units not yet
selected (the theory's selection with replacement is not used), the
evaluation-subset check runs only once the minibatch accuracy is within
`skip` of the target, and the reference accuracy is that of the network
just before the group is pruned (`relative_to="layer"`; `"original"`
compares with the unpruned model instead).

Speed: a candidate only changes the group's consumers, so each minibatch
runs the network below them once (`_split`: the tensors every layer from
the earliest consumer on reads) and the candidates run only the rest, many
in one compiled call: the cut tensors are repeated once per candidate along
the batch axis and each consumer's input is multiplied by the candidate's
multipliers (the same as multiplying the kernel's input rows), so no kernel
is edited per candidate.
"""

import keras
import numpy as np

from tf_sparsity import _compat, prunable, surgery
from tf_sparsity.pruning.finetune import train_steps

__all__ = ["greedy_loss"]


def _targets(model, x, y, from_logits, batch_size):
    """Per-row targets (class ids or teacher probabilities) and whether outputs are logits."""
    out = model.predict(x, verbose=0, batch_size=max(batch_size, 256))
    if from_logits is None:  # probabilities if every row is a distribution
        from_logits = not (out.min() >= 0 and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3))
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"`data`'s labels must be integer class ids, one per row of `x`; received "
                             f"shape {y.shape} and dtype {y.dtype}.")
        if y.min() < 0 or y.max() >= out.shape[-1]:
            raise ValueError(f"`data`'s labels must lie in [0, {out.shape[-1]}); received "
                             f"[{y.min()}, {y.max()}].")
        return y.astype("int64"), bool(from_logits)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(out, axis=-1)) if from_logits else out
    return probs.astype("float32"), bool(from_logits)


def _loss_and_hits(out, target, from_logits):
    out = np.asarray(out, "float64")
    if from_logits:
        out = out - out.max(axis=-1, keepdims=True)
        logp = out - np.log(np.exp(out).sum(axis=-1, keepdims=True))
    else:
        logp = np.log(np.clip(out, 1e-12, 1.0))
    if target.ndim == 1:
        return float(-logp[np.arange(len(target)), target].mean()), out.argmax(-1) == target
    return float(-(target * logp).sum(axis=-1).mean()), out.argmax(-1) == target.argmax(-1)


class _GroupMask:
    """Multiplies each unit's input rows in every consumer of one group (kernels edited in place)."""

    def __init__(self, groups, group):
        self.group, self.consumers = group, []
        for layer, rows in groups.consumers(group):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            unit_of_row = np.full(kernel.shape[-2], -1)  # input rows: channels (positions x channels after Flatten)
            for k, r in enumerate(rows):
                unit_of_row[r] = k
            self.consumers.append((layer, unit_of_row, kernel))

    def set(self, multipliers):
        for layer, unit_of_row, kernel in self.consumers:
            scale = np.where(unit_of_row >= 0, multipliers[np.maximum(unit_of_row, 0)], 1.0)
            layer.kernel.assign((kernel * scale.reshape(-1, 1)).astype(kernel.dtype))

    def input_scale(self, masks, multipliers):
        """`{consumer name: factor per kept input row}` for `prune_groups`."""
        out = {}
        for layer, unit_of_row, _ in self.consumers:
            scale = np.where(unit_of_row >= 0, multipliers[np.maximum(unit_of_row, 0)], 1.0)
            out[layer.name] = scale[masks[id(layer)][0]]
        return out


def _check(accuracy_fraction, relative_to, candidates, skip, finetune_steps, eval_samples):
    if accuracy_fraction is not None and (isinstance(accuracy_fraction, bool) or not isinstance(
            accuracy_fraction, (int, float)) or not 0 < accuracy_fraction <= 1):
        raise ValueError(f"`accuracy_fraction` must be a fraction in (0, 1] or None; received "
                         f"{accuracy_fraction!r}.")
    if relative_to not in ("layer", "original"):
        raise ValueError(f"`relative_to` must be 'layer' or 'original'; received {relative_to!r}.")
    for name, value in (("candidates", candidates), ("eval_samples", eval_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; received {value!r}.")
    if not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise ValueError(f"`finetune_steps` must be an integer >= 0; received {finetune_steps!r}.")
    if not isinstance(skip, (int, float)) or not 0 <= skip < 1:
        raise ValueError(f"`skip` must be a number in [0, 1); received {skip!r}.")


def greedy_loss(model, x, y=None, width=None, flops=None, accuracy_fraction=0.98, relative_to="layer",
                candidates=50, batch_size=128, eval_samples=1024, skip=0.05, finetune_steps=0,
                learning_rate=1e-2, from_logits=None, seed=0, verbose=0):
    """Greedy forward selection on the training loss, by channel group (the paper's method).

    See the module docstring for the algorithm. `greedy_prune(...,
    objective="loss")` calls this.

    Args:
        model: a trained, built Sequential / functional classifier.
        x: training inputs (NumPy); minibatches and the evaluation subset are
            drawn from them.
        y: integer labels, or None for the global variant (the loss and the
            accuracy are against the original model's output).
        width, flops: optional cap per group (`tfs.surgery.keep_for_budget`,
            uniform width); selection stops at the cap or at the accuracy.
        accuracy_fraction: stop a group once the training accuracy reaches
            this fraction of the reference (0.98 in the paper); None: only
            the cap stops (needs `width` or `flops`).
        relative_to: "layer" (accuracy just before this group, as the
            official code) or "original" (the unpruned model).
        candidates: units evaluated per step (random subset; the paper: 50).
        batch_size: the minibatch of each step (a fresh one every step).
        eval_samples: size of the fixed training subset for the stop check.
        skip: check the subset only when the minibatch accuracy reaches
            `(accuracy_fraction - skip)` of the reference.
        finetune_steps: SGD steps (momentum 0.9, `learning_rate`) on the
            loss after each group.
        from_logits: whether `model` outputs logits; None: probabilities if
            every output row sums to 1.

    Returns `(small model, report)`; the report has one dict per group.

    Example:

    >>> m = tfs.zoo.mnist1d_cnn(filters=8, hidden=16)
    >>> x = np.random.default_rng(0).normal(size=(256, 40, 1)).astype("float32")
    >>> small, report = tfs.pruning.greedy_loss(m, x, candidates=4, batch_size=64, eval_samples=128)
    >>> all(r["accuracy"] >= 0.98 * r["reference"] or r["stopped"] != "accuracy" for r in report.values())
    True
    """
    _check(accuracy_fraction, relative_to, candidates, skip, finetune_steps, eval_samples)
    if accuracy_fraction is None and width is None and flops is None:
        raise ValueError("`accuracy_fraction=None` needs a budget (`width` or `flops`) to stop at.")
    groups = surgery.channel_groups(model)
    prunable = groups.prunable()
    zeros = {name: np.zeros(g.size) for name, g in prunable.items()}
    if width is None and flops is None:
        if not prunable:
            surgery.keep_for_budget(groups, zeros, width=1.0)  # raises, naming what is frozen
        caps = {name: g.size for name, g in prunable.items()}
    else:
        caps = {n: len(k) for n, k in surgery.keep_for_budget(groups, zeros, width=width, flops=flops).items()}
    targets, logits = _targets(model, x, y, from_logits, batch_size)
    rng = np.random.default_rng(seed)
    subset = rng.choice(len(x), min(eval_samples, len(x)), replace=False)
    batch_size = min(batch_size, len(x))
    current = surgery.prune_groups(model, {}, groups)  # a copy: `model` is never edited
    # Without fine-tuning the masks stay on the copy's kernels and one surgery
    # ends the run; with it, every group is cut before the fine-tune (else
    # training would revive the masked rows).
    per_group = finetune_steps > 0
    groups, forward, pending = surgery.channel_groups(current), _forward(current), {}

    def accuracy(rows):
        out = np.concatenate([forward(x[rows[i:i + 512]]) for i in range(0, len(rows), 512)])
        return float(_loss_and_hits(out, targets[rows], logits)[1].mean())

    original = accuracy(subset)
    report = {}
    progress = keras.utils.Progbar(len(prunable), verbose=verbose, unit_name="group")
    for step, name in enumerate(prunable):
        if per_group and step:
            groups, forward = surgery.channel_groups(current), _forward(current)
        if name not in groups.groups:  # cannot happen with name-preserving surgery; say so if it does
            raise RuntimeError(f"group '{name}' disappeared after pruning the previous groups.")
        group = groups.groups[name]
        reference = accuracy(subset) if relative_to == "layer" and step else original
        goal = None if accuracy_fraction is None else accuracy_fraction * reference
        mask = _GroupMask(groups, group)
        # Below the group's consumers nothing changes while it is selected: run it once per batch.
        head, evaluate = _split(current, mask)
        below_subset = None
        n_units, selected, stopped, reached = group.size, [], "budget", None
        multipliers = np.zeros(n_units)
        while len(selected) < caps[name]:
            rows = rng.choice(len(x), batch_size, replace=False)
            below, tb = head(x[rows]), targets[rows]
            pool = np.setdiff1d(np.arange(n_units), selected)
            if len(pool) > candidates:
                pool = rng.choice(pool, candidates, replace=False)
            tried = np.zeros((len(pool), n_units))  # one row of multipliers per candidate
            tried[:, selected] = n_units / (len(selected) + 1)
            tried[np.arange(len(pool)), pool] = n_units / (len(selected) + 1)
            best = (np.inf, None, None)
            for j, out in zip(pool, evaluate(below, tried)):
                loss, hits = _loss_and_hits(out, tb, logits)
                if loss < best[0]:
                    best = (loss, int(j), hits)
            selected.append(best[1])
            if goal is not None and best[2].mean() >= goal - skip * reference:
                multipliers[:] = 0.0
                multipliers[selected] = n_units / len(selected)
                if below_subset is None:
                    below_subset = [head(x[subset[i:i + 512]]) for i in range(0, len(subset), 512)]
                out = np.concatenate([evaluate(part, multipliers[None])[0] for part in below_subset])
                reached = float(_loss_and_hits(out, targets[subset], logits)[1].mean())
                if reached >= goal:
                    stopped = "accuracy"
                    break
        else:
            stopped = "all units" if len(selected) == n_units else "budget"
        multipliers[:] = 0.0
        multipliers[selected] = n_units / len(selected)
        kept = np.sort(np.asarray(selected))
        if per_group:
            masks = groups.keep_masks({name: kept})
            current = surgery.prune_groups(current, {name: kept}, groups,
                                           input_scale=mask.input_scale(masks, multipliers))
            forward = _forward(current)
        else:
            mask.set(multipliers)  # stays: the next groups are selected with this one pruned
            pending[name] = kept
        if reached is None or stopped != "accuracy":
            reached = accuracy(subset)  # before the fine-tune: what the stop rule saw
        if per_group and len(kept) < n_units:
            _finetune(current, x, targets, logits, finetune_steps, batch_size, learning_rate, rng)
        report[name] = {"kept": len(kept), "units": kept, "total": n_units, "stopped": stopped,
                        "accuracy": reached, "reference": reference,
                        "consumers": [layer.name for layer, _, _ in mask.consumers]}
        progress.update(step + 1, values=[("kept", len(kept) / n_units), ("accuracy", reached)])
    if not per_group:  # the kept rows already carry their N / n
        current = surgery.prune_groups(current, pending, groups)
    return current, report


# The candidates of one call are bounded so that the largest activation of the
# tail (candidates x batch x its size, float32) stays under this many bytes.
_MEMORY = 64 * 2 ** 20


def _split(model, mask, memory=None):
    """`(head, evaluate)` for one group's `_GroupMask`.

    `head(x)` runs `model` up to the tensors that the group's consumers and
    every layer after them read (the cut); `evaluate(cut, multipliers)`
    runs the rest once per row of `multipliers` (`(K, units)`: the factor of
    each unit's input rows in every consumer) and returns the `(K, batch,
    classes)` outputs, so with unit multipliers `evaluate(head(x), ones)[0]
    == model(x)`. Both compiled, NumPy in and out. The K rows go through in
    chunks of `chunk` rows, by default as many as keep the largest
    activation under `memory` bytes.

    A layer is after the consumers when it is one of them (or a nested
    model holding one) or reads a tensor computed after them; the cut is
    every tensor such a layer reads that is not itself computed after them
    (a residual stream's earlier tensors included), plus any output that is
    not.
    """
    import tensorflow as tf  # tf.function: one trace per group, not per candidate

    from tf_sparsity.layers import KernelWrapper

    memory = _MEMORY if memory is None else memory
    inputs, outputs, nodes = _compat.graph_nodes(model)
    n_units = len(mask.group.units)
    # Row r of a consumer's input takes column rows[r] of [multipliers | 1].
    rows = {id(layer): np.where(unit_of_row >= 0, unit_of_row, n_units).astype("int32")
            for layer, unit_of_row, _ in mask.consumers}

    def leaf(op):
        return op.layer if isinstance(op, KernelWrapper) else op

    def holds_consumer(op):
        return id(leaf(op)) in rows or (_compat.is_graph_model(op) and any(
            id(leaf(l)) in rows for l in prunable.iter_layers(op)))

    after, cut, largest = set(), {}, 1
    for node in nodes:
        if holds_consumer(node.operation) or any(id(t) in after for t in node.input_tensors):
            cut.update((id(t), t) for t in node.input_tensors if id(t) not in after)
            after.update(id(t) for t in node.outputs)
            largest = max([largest] + [int(np.prod(t.shape[1:])) for t in node.outputs])
    cut.update((id(t), t) for t in outputs if id(t) not in after)
    cut = list(cut.values())
    largest = max([largest] + [int(np.prod(t.shape[1:])) for t in cut])
    head_fn = tf.function(_compat.graph_slice(inputs, cut), reduce_retracing=True)
    body = _compat.graph_slice(cut, outputs)

    def masked(below, multipliers):
        k = tf.shape(multipliers)[0]
        table = tf.concat([multipliers, tf.ones([k, 1], multipliers.dtype)], axis=1)

        def scaled(op, index):
            def call(x, *args, **kwargs):
                factor = tf.cast(tf.gather(table, index, axis=1), x.dtype)[:, None, :]
                y = tf.reshape(tf.reshape(x, [k, -1, len(index)]) * factor, tf.shape(x))
                return op(y, *args, **kwargs)
            return call

        def wrap(op):
            if id(leaf(op)) in rows:
                return scaled(op, rows[id(leaf(op))])
            if _compat.is_graph_model(op) and holds_consumer(op):
                return lambda inner, *args, **kwargs: _compat.run_graph(op, tf.nest.flatten(inner), wrap)[0]
            return op

        repeated = [tf.tile(t, tf.concat([[k], tf.ones([tf.rank(t) - 1], tf.int32)], 0)) for t in below]
        return _compat.run_graph(body, repeated, wrap)[0]

    signature = [[tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype) for t in cut],
                 tf.TensorSpec((None, n_units), "float32")]
    masked_fn = tf.function(masked, input_signature=signature, autograph=False)

    def head(x):
        return [t.numpy() for t in head_fn([x])]

    def evaluate(below, multipliers, chunk=None):
        batch = len(below[0])
        chunk = max(1, memory // (4 * batch * largest)) if chunk is None else chunk
        multipliers = np.asarray(multipliers, "float32")
        outs = [masked_fn(below, multipliers[i:i + chunk]).numpy() for i in range(0, len(multipliers), chunk)]
        out = np.concatenate(outs)
        return out.reshape((len(multipliers), batch) + out.shape[1:])

    return head, evaluate


def _forward(model):
    """A compiled inference call of `model` returning NumPy."""
    import tensorflow as tf  # tf.function: one trace per model, not per candidate

    call = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)
    return lambda inputs: call(inputs).numpy()


def _finetune(model, x, targets, from_logits, steps, batch_size, learning_rate, rng):
    """`steps` SGD-momentum steps on fresh minibatches (labels or teacher probabilities)."""
    if targets.ndim == 1:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    rows = rng.choice(len(x), steps * batch_size, replace=steps * batch_size > len(x))
    batches = ((x[part], targets[part]) for part in np.split(rows, steps))
    train_steps(model, batches, loss, keras.optimizers.SGD(learning_rate, momentum=0.9))
