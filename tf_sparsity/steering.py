"""Steering learned thresholds to a target sparsity: the solver behind `TargetSparsity`.

Kept apart from the callback so custom loops (and `tfs.distribute.fit`) can
steer without Keras callbacks, and so the solver can be tested on its own.
"""

import numpy as np
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity import prunable
from tf_sparsity.protocols import HoldsSteerables, Steerable

__all__ = ["DECAY_RULES", "DecayController", "current_sparsity", "logit_bounds", "solve_flops_offset", "solve_threshold_offset", "steerables"]


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


def logit_bounds(steerables, margin=100.0):
    """Offsets `(-B, B)` that span every threshold, B = `margin` + the largest `|s|`.

    The solver's default (-100, 100) cannot reach a layer whose `s` is
    further out (the paper's `s_init=-3200`): use these bounds for it.
    """
    logits = [abs(float(ops.convert_to_numpy(w.threshold_logit))) for w in steerables]
    reach = float(margin) + max(logits, default=0.0)
    return -reach, reach


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
    (`ChannelCoupling.stripped_macs`) fall, down to the floor of
    `min_channels` units per group: bisection finds the offset
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

    caps = coupling.floor_caps(rms)  # the floor: each group's strongest units never die
    caps = np.inf if caps is None else ops.convert_to_numpy(caps)

    def alive(offset):
        return rms > np.minimum(np.array([fns[fn](s + offset) for fn, s in keys]) @ weights, caps)

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


DECAY_RULES = ("shift", "ratio")


class DecayController:
    """Steers learned thresholds by the decay on `s`, with no offset.

    The paper's own knob: the coupled L2 on each layer's `s` pulls `s`
    towards 0 (a negative `s` rises: the threshold grows). At each update
    the exact offset solver says how far the logits would have to move for
    the overall sparsity to reach the scheduled target (`b`); the
    controller then sets one multiplier `m` on every layer's
    `threshold_decay` so the decay alone moves the logit that moves most
    (largest `|threshold_decay * s|`, the reference layer) by `gain * b`
    over the next `update_every` steps, so no layer moves more than that.
    `m` may be negative (pushing `s` away from 0) when the loss itself
    raises the thresholds too fast; it is clipped to
    `[-max_scale, max_scale]`. Every `s_l` stays free: the decay moves each
    in proportion to its own value, the loss moves each by its own
    gradient, and no common offset is added to (or cancels) their shared
    drift.

    Two rules size `m` (`rule`):

    - "shift" (default): linearized, in logits. SGD with momentum `beta`
      moves `s` by `-lr * decay * m * s / (1 - beta)` per step; the shift
      aimed for is clipped to `[-max_shift, max_shift]` logits per update
      and the solver searches offsets in [-100, 100]. From the paper's
      `s_init = -3200` it never reaches the active region (2 logits per
      update).
    - "ratio": multiplicative, for any `s_init` (the paper regime). The
      decay scales `s` by a factor `q` per step, so the reference layer is
      sent from `s` to `s + b` by `q = ((s + b) / s) ** (gain / update_every)`,
      with `|log q|` capped at `max_rate`. Under momentum `beta`, pure decay
      `a = lr * decay * m` on `s` contracts it by the dominant root `q` of
      `z**2 - (1 + beta - a) z + beta` (heavy ball), so
      `a = (1 - q) * (1 - beta / q)`: exact far from the target, equal to
      "shift" for small moves. Above `|log q| = -log(beta) / 2` (0.053 at
      beta 0.9, critical damping) the roots are complex and momentum
      carries `s` past 0 (measured: the unsteered paper regime at
      threshold_decay 0.05 went 100% sparse in epoch 1), so keep `max_rate`
      below it (default 0.025). Near the active region the loss gradient on
      `s` resists the decay and that cap is too slow (measured on the BN
      CNN: sparsity lagged the ramp by 4 points at the end of training),
      so the multiplier is the larger of this one and the "shift" rule's.
      The solver's offsets span the logits' own range, and a solved move
      against the sparsity error (the flat plateau of offsets at a target
      of 0) counts as no move.

    Args:
        gain: share of the solved move to make per `update_every` steps
            (in logits for "shift", in `log |s|` for "ratio").
        max_scale: bound on `|m|`.
        max_shift: "shift" only: largest move aimed for per update (logits).
        rule: "shift" or "ratio" (see above).
        max_rate: "ratio" only: largest `|log q|` per step, in (0, 1).

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> w = tfs.layers.SoftThreshold(keras.layers.Dense(4), s_init=-3200.0, threshold_decay=0.01)
    >>> _ = w(keras.ops.ones((1, 8)))
    >>> scale, sparsity = DecayController(rule="ratio").update([w], 0.5, learning_rate=0.1, momentum=0.9)
    >>> round(scale, 2), sparsity   # s shrinks by exp(-0.025) per step, below critical damping
    (1.91, 0.0)
    """

    def __init__(self, gain=1.0, max_scale=1e4, max_shift=2.0, rule="shift", max_rate=0.025):
        if rule not in DECAY_RULES:
            raise ValueError(f"`rule` must be one of {list(DECAY_RULES)}; received {rule!r}.")
        if isinstance(max_rate, bool) or not isinstance(max_rate, (int, float)) or not 0 < max_rate < 1:
            raise ValueError(f"`max_rate` must be a number in (0, 1) (largest |log q| per step); "
                             f"received {max_rate!r}.")
        self.gain = float(gain)
        self.max_shift = float(max_shift)
        self.max_scale = float(max_scale)
        self.rule = rule
        self.max_rate = float(max_rate)

    def update(self, steerables, target_sparsity, learning_rate, momentum=0.0, update_every=1):
        """One control step; returns `(multiplier, sparsity before the step)`."""
        steerables = list(steerables)
        sparsity = current_sparsity(steerables)
        logits = np.array([float(ops.convert_to_numpy(w.threshold_logit)) for w in steerables])
        rates = np.array([w.s_decay * w.threshold_lr_scale for w in steerables], "float64")
        # The decay moves layer l by about -lr * rate_l * m * s_l per step: the
        # layer with the largest |rate_l * s_l| moves most. Size m so THAT
        # layer moves `gain * shift` (not the mean layer: with one s near 0
        # and another at -3, a mean-based m moved the far one many times the
        # shift, and a negative m then grew it exponentially -- measured:
        # sparsity 90% -> 0.1% -> 99.5% within three epochs).
        pull = rates * logits
        index = int(np.argmax(np.abs(pull))) if len(pull) else 0
        ref = float(pull[index]) if len(pull) else 0.0
        beta = float(momentum)
        lr = float(learning_rate)
        n = max(1, update_every)
        if lr <= 0 or abs(ref) < 1e-9:
            scale = 0.0
        elif self.rule == "shift":
            shift, _ = solve_threshold_offset(steerables, target_sparsity)
            scale = self._shift_scale(shift, lr, beta, ref, n)
        else:
            shift, _ = solve_threshold_offset(steerables, target_sparsity, bounds=logit_bounds(steerables))
            if (sparsity <= target_sparsity and shift < 0) or (sparsity >= target_sparsity and shift > 0):
                shift = 0.0  # a move against the error: the solver stepped inside a flat plateau
            s = float(logits[index])
            ratio = (s + shift) / s
            log_q = self.gain * np.log(ratio) / n if ratio > 0 else -np.inf
            q = float(np.exp(np.clip(log_q, -self.max_rate, self.max_rate)))
            a = (1.0 - q) * (1.0 - beta / q)  # per-step decay giving the dominant root q
            # Far out the capped ratio is the faster move; near the active
            # region, where the loss gradient on s resists the decay, the
            # shift rule asks more: take the larger (both have the sign of b).
            scale = max(a / (lr * rates[index]), self._shift_scale(shift, lr, beta, ref, n), key=abs)
        scale = float(np.clip(scale, -self.max_scale, self.max_scale))
        for w in steerables:
            w.threshold_decay_scale.assign(scale)
        return scale, sparsity

    def _shift_scale(self, shift, lr, beta, ref, n):
        # The "shift" rule: the reference layer moves by gain * shift (at most
        # max_shift logits, no leaps at the ramp's ends) over n steps.
        shift = float(np.clip(shift, -self.max_shift, self.max_shift))
        return -self.gain * shift / (lr / max(1e-6, 1.0 - beta) * ref * n)
