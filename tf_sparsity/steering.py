"""Steering learned thresholds to a target sparsity: the solver behind `TargetSparsity`.

Kept apart from the callback so custom loops (and `tfs.distribute.fit`) can
steer without Keras callbacks, and so the solver can be tested on its own.
"""

import numpy as np
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity import prunable
from tf_sparsity.protocols import HoldsSteerables, Steerable

__all__ = ["DecayController", "current_sparsity", "solve_flops_offset", "solve_threshold_offset", "steerables"]


def steerables(model):
    """Every `Steerable` threshold in `model`: STR wrappers, and the matrices of
    layers or RNN cells that hold several (low-rank cells)."""
    found = []
    for layer in prunable.iter_layers(model):
        if isinstance(layer, Steerable):
            found.append(layer)
            continue
        owner = prunable.protocol_owner(layer, HoldsSteerables)
        if owner is not None:
            found.extend(owner.thresholded_matrices())
    return found


def solve_threshold_offset(steerables, target_sparsity, bounds=(-100.0, 100.0), iterations=60):
    """Common logit offset `b` at which the wrappers' overall sparsity is closest to target.

    `steerables` are `tf_sparsity.protocols.Steerable` objects (STR
    wrappers, low-rank matrices). Returns `(b, names of those entirely zero
    at b)`. Each zeros the groups whose magnitude is <= `g(s_l + b)`, so
    overall sparsity is monotone in `b`: bisection finds it. Layer shares
    stay set by each layer's learned `s_l` and its weights.
    """
    wrappers = list(steerables)
    layers = []
    total = 0
    for w in wrappers:
        magnitudes, sizes = w.threshold_magnitudes()
        magnitudes = magnitudes.ravel()
        sizes = np.broadcast_to(np.asarray(sizes, "float64"), magnitudes.shape)
        order = np.argsort(magnitudes, kind="stable")
        # Entries zeroed when the first i groups (by magnitude) are pruned.
        cumulative = np.concatenate([[0.0], np.cumsum(sizes[order])])
        layers.append((magnitudes[order], cumulative, w))
        total += cumulative[-1]
    logits = np.array([float(ops.convert_to_numpy(w.threshold_logit)) for w in wrappers], "float64")
    goal = target_sparsity * total
    threshold_fns = [_numpy_threshold_fn(w.threshold_fn) for w in wrappers]

    def layer_zeros(offset):
        return [
            cumulative[np.searchsorted(m, fn(s + offset), side="right")]
            for (m, cumulative, _), fn, s in zip(layers, threshold_fns, logits)
        ]

    def zeros(offset):
        return sum(layer_zeros(offset))

    lo, hi = bounds
    if zeros(lo) >= goal:
        best = lo
    elif zeros(hi) <= goal:
        best = hi
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if zeros(mid) <= goal:
                lo = mid
            else:
                hi = mid
        best = lo if abs(zeros(lo) - goal) <= abs(zeros(hi) - goal) else hi
    best = _inside_plateau(zeros, best, bounds, iterations)
    sizes = [cumulative[-1] for _, cumulative, _ in layers]
    collapsed = [w.steering_name for w, z, n in zip(wrappers, layer_zeros(best), sizes) if z >= n - 0.5]
    return best, collapsed


def solve_flops_offset(coupling, target_fraction, bounds=(-100.0, 100.0), iterations=60):
    """Common logit offset `b` at which `tfs.strip` leaves `target_fraction` of the dense MACs.

    For channel-STR over channel groups (`coupling`: a
    `ChannelGroupModel`'s `channel_coupling`): unit `u` dies when its joint
    RMS is at most its threshold `sum_l w_lu g(s_l + b)`, so the dead set
    grows with `b` and the stripped model's MACs
    (`ChannelCoupling.stripped_macs`) fall: bisection finds the offset
    closest to the target, then steps inside its plateau. Returns
    `(b, MACs fraction at b, names of groups emptied at b)`.
    """
    rms = coupling.unit_rms()
    # Wrappers with the same threshold function and `s` share g(s + b): one row of weights each.
    rows = {}
    for wrapper, w in coupling.threshold_weights():
        key = (wrapper.threshold_fn, float(ops.convert_to_numpy(wrapper.threshold_logit)))
        rows[key] = rows.get(key, 0.0) + np.asarray(w, "float64")
    fns = {fn: _numpy_threshold_fn(fn) for fn, _ in rows}
    keys, weights = list(rows), np.array(list(rows.values())).reshape(len(rows), len(rms))
    dense = coupling.dense_macs()
    memo = {}

    def alive(offset):
        return rms > np.array([fns[fn](s + offset) for fn, s in keys]) @ weights

    def fraction(offset):
        key = alive(offset)
        packed = np.packbits(key).tobytes()
        if packed not in memo:
            memo[packed] = coupling.stripped_macs(key) / dense
        return memo[packed]

    lo, hi = bounds
    if fraction(lo) <= target_fraction:
        best = lo
    elif fraction(hi) >= target_fraction:
        best = hi
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if fraction(mid) >= target_fraction:
                lo = mid
            else:
                hi = mid
        best = lo if abs(fraction(lo) - target_fraction) <= abs(fraction(hi) - target_fraction) else hi
    best = _inside_plateau(lambda offset: int((~alive(offset)).sum()), best, bounds, iterations)
    return best, fraction(best), coupling.emptied_groups(alive(best))


# How far (in logit units) the chosen offset stays from the edges of its
# plateau: ~0.1% of the threshold, far above float32 rounding of a group's RMS.
_EDGE_MARGIN = 1e-3


def _inside_plateau(zeros, best, bounds, iterations):
    # Bisection ends on an edge of the interval of offsets that zero the same
    # entries, i.e. with some group's magnitude equal to its threshold. A hard
    # mask (shrink=False) is then decided by rounding: `predict` and an eager
    # pass (what `strip` bakes in) may disagree on that group. Step inside.
    count = zeros(best)

    def edge(inside, outside):
        for _ in range(iterations):
            mid = 0.5 * (inside + outside)
            if zeros(mid) == count:
                inside = mid
            else:
                outside = mid
        return inside

    lo, hi = bounds
    low = lo if zeros(lo) == count else edge(best, lo)
    high = hi if zeros(hi) == count else edge(best, hi)
    margin = min(_EDGE_MARGIN, 0.5 * (high - low))
    return float(np.clip(best, low + margin, high - margin))


def _numpy_threshold_fn(fn):
    # The solver evaluates g many times per update: stay in NumPy for the
    # built-in functions, go through keras.ops only for custom ones.
    if fn is sparse_ops.THRESHOLD_FUNCTIONS["sigmoid"]:
        return lambda z: float(np.float32(0.5 * (1.0 + np.tanh(0.5 * z))))
    if fn is sparse_ops.THRESHOLD_FUNCTIONS["exponential"]:
        return lambda z: float(np.float32(np.exp(min(z, 80.0))))
    return lambda z: float(ops.convert_to_numpy(fn(ops.convert_to_tensor(np.float32(z)))))


def current_sparsity(steerables):
    """Overall share of zeroed entries over `steerables` at their current thresholds."""
    zeros = total = 0.0
    for w in steerables:
        magnitudes, sizes = w.threshold_magnitudes()
        magnitudes = magnitudes.ravel()
        sizes = np.broadcast_to(np.asarray(sizes, "float64"), magnitudes.shape)
        zeros += float(sizes[magnitudes <= w.threshold_value()].sum())
        total += float(sizes.sum())
    return zeros / max(total, 1.0)


class DecayController:
    """Steers learned thresholds by the decay on `s`, with no offset.

    The paper's own knob: the coupled L2 on each layer's `s` pulls `s`
    towards 0 (a negative `s` rises: the threshold grows). At each update
    the exact offset solver says how far the logits would have to move for
    the overall sparsity to reach the scheduled target (`b`); the
    controller then sets one multiplier `m` on every layer's
    `threshold_decay` so the decay alone moves the logit that moves most
    (largest `|threshold_decay * s|`) by `gain * b` over the next
    `update_every` steps, so no layer moves more than that (SGD with momentum `beta`
    moves `s` by `-lr * decay * m * s / (1 - beta)` per step). `m` may be
    negative (pushing `s` away from 0) when the loss itself raises the
    thresholds too fast; it is clipped to `[-max_scale, max_scale]`, and
    the shift aimed for to `[-max_shift, max_shift]` logits per update.
    Every `s_l` stays free: the decay moves each in proportion to its own
    value, the loss moves each by its own gradient, and no common offset
    is added to (or cancels) their shared drift.
    """

    def __init__(self, gain=1.0, max_scale=1e4, max_shift=2.0):
        self.gain = float(gain)
        self.max_shift = float(max_shift)
        self.max_scale = float(max_scale)

    def update(self, steerables, target_sparsity, learning_rate, momentum=0.0, update_every=1):
        """One control step; returns `(multiplier, sparsity before the step)`."""
        steerables = list(steerables)
        sparsity = current_sparsity(steerables)
        shift, _ = solve_threshold_offset(steerables, target_sparsity)
        shift = float(np.clip(shift, -self.max_shift, self.max_shift))  # no leaps at the ramp's ends
        logits = np.array([float(ops.convert_to_numpy(w.threshold_logit)) for w in steerables])
        rates = np.array([w.s_decay * w.threshold_lr_scale for w in steerables], "float64")
        momentum_factor = 1.0 / max(1e-6, 1.0 - float(momentum))
        # The decay moves layer l by about -lr * rate_l * m * s_l per step: the
        # layer with the largest |rate_l * s_l| moves most. Size m so THAT
        # layer moves `gain * shift` (not the mean layer: with one s near 0
        # and another at -3, a mean-based m moved the far one many times the
        # shift, and a negative m then grew it exponentially -- measured:
        # sparsity 90% -> 0.1% -> 99.5% within three epochs).
        pull = rates * logits
        ref = float(pull[int(np.argmax(np.abs(pull)))]) if len(pull) else 0.0
        per_step = float(learning_rate) * momentum_factor
        if per_step <= 0 or abs(ref) < 1e-9:
            scale = 0.0
        else:
            scale = -self.gain * shift / (per_step * ref * max(1, update_every))
        scale = float(np.clip(scale, -self.max_scale, self.max_scale))
        for w in steerables:
            w.threshold_decay_scale.assign(scale)
        return scale, sparsity
