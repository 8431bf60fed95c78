"""Steering learned thresholds to a target sparsity: the solver behind `TargetSparsity`.

Kept apart from the callback so custom loops (and `tfs.distribute.fit`) can
steer without Keras callbacks, and so the solver can be tested on its own.
"""

import numpy as np
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity import prunable
from tf_sparsity.protocols import HoldsSteerables, Steerable

__all__ = ["solve_threshold_offset", "steerables"]


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
    sizes = [cumulative[-1] for _, cumulative, _ in layers]
    collapsed = [w.steering_name for w, z, n in zip(wrappers, layer_zeros(best), sizes) if z >= n - 0.5]
    return best, collapsed


def _numpy_threshold_fn(fn):
    # The solver evaluates g many times per update: stay in NumPy for the
    # built-in functions, go through keras.ops only for custom ones.
    if fn is sparse_ops.THRESHOLD_FUNCTIONS["sigmoid"]:
        return lambda z: float(np.float32(0.5 * (1.0 + np.tanh(0.5 * z))))
    if fn is sparse_ops.THRESHOLD_FUNCTIONS["exponential"]:
        return lambda z: float(np.float32(np.exp(min(z, 80.0))))
    return lambda z: float(ops.convert_to_numpy(fn(ops.convert_to_tensor(np.float32(z)))))
