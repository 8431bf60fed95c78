"""GSM's per-step math: selection scores, the global selection, and the fused
XLA update (selection, masked gradient, coupled L2 and momentum in one pass)."""

import tensorflow as tf  # XLA programs
from keras import ops

from tf_sparsity import ops as sparse_ops

__all__ = ["fused_step", "magnitude_masks", "sampled_threshold", "scores"]


def magnitude_masks(variables, k, method):
    if method == "sample":  # final_prune is always exact
        method = "histogram"
    magnitudes = [scores(v, None, "magnitude") for v in variables]
    return sparse_ops.global_topk_masks(magnitudes, k, method=method)


def scores(w, g, metric):
    """GSM's selection score in float32: `|w * g|` ("taylor") or `|w|`."""
    w = ops.cast(w, "float32")
    return ops.abs(w * ops.cast(g, "float32")) if metric == "taylor" else ops.abs(w)


def _keep(w, g, selection, metric):
    if len(selection.shape):
        return selection
    score = scores(w, g, metric)
    # threshold 0 means "fewer than k non-zero scores": keep just those.
    return ops.where(selection > 0, score >= selection, score > 0)


# Both are XLA programs: inside one, only the sampled scores are ever computed,
# and the selection, masked gradient, L2 and momentum fuse into one pass.
@tf.function(jit_compile=True)
def sampled_threshold(ws, gs, k, step, metric):
    pool_scores = [scores(w, g, metric) for w, g in zip(ws, gs)]
    return sparse_ops.sampled_threshold(pool_scores, k, offset=step)


@tf.function(jit_compile=True)
def fused_step(w, g, z, selection, lr, l2, beta, metric, nesterov):
    keep = _keep(w, g, selection, metric)
    g = tf.cast(g, w.dtype)
    d = tf.where(keep, g, tf.zeros_like(g)) + l2 * w
    z = beta * z + d
    w = w - lr * (d + beta * z if nesterov else z)
    return w, z, tf.reduce_sum(tf.cast(keep, tf.int32))
