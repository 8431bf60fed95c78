"""Shared sparsity math, written once and used by every method."""

import keras
import numpy as np
from keras import ops

# Threshold functions g for STR: monotone increasing maps from the learned
# logit `s` to a non-negative threshold.
THRESHOLD_FUNCTIONS = {
    "sigmoid": ops.sigmoid,
    "exponential": ops.exp,
}


def get_threshold_fn(threshold_fn):
    """Resolve `threshold_fn` (a name in `THRESHOLD_FUNCTIONS` or a callable).

    >>> float(get_threshold_fn("sigmoid")(0.0))
    0.5
    """
    if callable(threshold_fn):
        return threshold_fn
    if isinstance(threshold_fn, str) and threshold_fn in THRESHOLD_FUNCTIONS:
        return THRESHOLD_FUNCTIONS[threshold_fn]
    if isinstance(threshold_fn, dict):
        return keras.saving.deserialize_keras_object(threshold_fn)
    raise ValueError(
        f"`threshold_fn` must be one of {sorted(THRESHOLD_FUNCTIONS)} or a "
        f"callable; received {threshold_fn!r}."
    )


def serialize_threshold_fn(threshold_fn):
    """Config form of a threshold function (its name, or a Keras object)."""
    if isinstance(threshold_fn, str):
        return threshold_fn
    for name, fn in THRESHOLD_FUNCTIONS.items():
        if fn is threshold_fn:
            return name
    return keras.saving.serialize_keras_object(threshold_fn)


def soft_threshold(x, threshold):
    """STR's reparameterization `sign(x) * relu(|x| - threshold)`.

    Entries with `|x| <= threshold` become exact zeros and get no gradient;
    the rest shrink towards zero by `threshold`.

    >>> y = soft_threshold(keras.ops.array([-1.0, 0.2, 0.7]), 0.5)
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(y)]
    [-0.5, 0.0, 0.2]
    """
    return ops.sign(x) * ops.relu(ops.abs(x) - threshold)


def _blocked(x, block_shape):
    """Reshape a kernel `[..., in, out]` (padded with zeros to multiples of
    `block_shape = (block_in, block_out)`) to `[..., in/bi, bi, out/bo, bo]`."""
    bi, bo = block_shape
    n_in, n_out = x.shape[-2], x.shape[-1]
    pad_in, pad_out = (-n_in) % bi, (-n_out) % bo
    if pad_in or pad_out:
        x = ops.pad(x, [(0, 0)] * (len(x.shape) - 2) + [(0, pad_in), (0, pad_out)])
    lead = tuple(x.shape[:-2])
    return ops.reshape(x, lead + ((n_in + pad_in) // bi, bi, (n_out + pad_out) // bo, bo))


def group_magnitudes(x, granularity="weight", block_shape=(4, 1)):
    """Magnitude of each pruning group of a kernel `[..., in, out]`: its RMS.

    "weight": `|x|`; "block": RMS of each `block_shape` block of the last
    two axes (zero-padded at the edges); "channel": RMS of each output unit
    (all axes but the last). RMS, not the L2 norm, so that groups of
    different sizes (a 5-tap filter and a 640-input unit) meet one threshold
    on equal terms -- the sqrt(group size) weighting of group lasso.
    """
    if granularity == "weight":
        return ops.abs(x)
    if granularity == "channel":
        return ops.sqrt(ops.mean(ops.square(x), axis=tuple(range(len(x.shape) - 1))))
    blocks = _blocked(x, block_shape)
    rank = len(blocks.shape)
    return ops.sqrt(ops.mean(ops.square(blocks), axis=(rank - 3, rank - 1)))


def group_soft_threshold(x, threshold, granularity="weight", block_shape=(4, 1), shrink=True):
    """Soft threshold applied to groups: `x_G * relu(1 - threshold / rms(x_G))`.

    Each group shrinks by `threshold * sqrt(|G|)` in L2 norm and is zeroed as
    a whole when its RMS is at most `threshold` (the proximal step of group
    lasso with the usual sqrt(group size) weights). With
    `granularity="weight"` this is exactly `soft_threshold`; "block" groups
    `block_shape` blocks of the last two (in, out) axes -- `(4, 1)` is
    LiteRT's 1x4 sparse FULLY_CONNECTED block along the input axis --
    and "channel" groups each output unit. `shrink=False` keeps surviving
    groups unshrunk (a hard group threshold: `x_G * [rms(x_G) > threshold]`).

    >>> w = keras.ops.array([[3.0, 0.1], [4.0, 0.1]])
    >>> y = group_soft_threshold(w, 1.0, "channel")  # column RMS 3.54 and 0.1
    >>> [[round(float(v), 2) for v in row] for row in keras.ops.convert_to_numpy(y)]
    [[2.15, 0.0], [2.87, 0.0]]
    """
    def scale(rms):
        return ops.cast(shrink_factor(rms, threshold, shrink), x.dtype)

    if granularity == "weight":
        return soft_threshold(x, threshold) if shrink else x * scale(ops.abs(x))
    if granularity == "channel":
        return x * scale(group_magnitudes(x, "channel"))
    n_in, n_out = x.shape[-2], x.shape[-1]
    blocks = _blocked(x, block_shape)
    rank = len(blocks.shape)
    rms = ops.sqrt(ops.mean(ops.square(blocks), axis=(rank - 3, rank - 1), keepdims=True))
    shrunk = blocks * scale(rms)
    padded_shape = tuple(x.shape[:-2]) + (blocks.shape[-4] * blocks.shape[-3], blocks.shape[-2] * blocks.shape[-1])
    return ops.reshape(shrunk, padded_shape)[..., :n_in, :n_out]


def shrink_factor(magnitude, threshold, shrink=True):
    """The group soft threshold's factor on a group of RMS `magnitude`.

    `relu(1 - threshold / magnitude)` (STR's shrinkage: exactly 0 when the
    group's RMS is at most `threshold`), or with `shrink=False` the hard
    `magnitude > threshold`. `group_soft_threshold` and the channel groups
    of `tfs.surgery.ChannelGroupModel` both multiply by it.

    >>> [round(float(v), 2) for v in keras.ops.convert_to_numpy(shrink_factor(keras.ops.array([0.5, 2.0]), 1.0))]
    [0.0, 0.5]
    """
    if shrink:
        return ops.relu(1.0 - threshold / ops.maximum(magnitude, 1e-12))
    return ops.cast(magnitude > threshold, "float32")


def segment_rms(parts, counts):
    """RMS of each channel group over slices of several kernels.

    Args:
        parts: `[(kernel, axis, ids)]`: slice `i` of `kernel` along `axis`
            belongs to group `ids[i]` (an integer in `[0, len(counts)]`;
            `len(counts)` means "no group").
        counts: entries per group (a NumPy vector), what the sum of squares
            is divided by: the group's RMS, so one threshold treats small
            and large groups alike (group lasso's sqrt(|G|) weighting).

    >>> k = keras.ops.array([[3.0, 0.0], [4.0, 0.0]])
    >>> rms = segment_rms([(k, 1, np.array([0, 1])), (k, 0, np.array([1, 2]))], np.array([2.0, 4.0]))
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(rms)]
    [3.536, 1.5]
    """
    n = len(counts)
    total = ops.zeros((n,), "float32")
    for kernel, axis, ids in parts:
        x = ops.cast(kernel, "float32")
        axis = axis % len(x.shape)
        squares = ops.sum(ops.square(x), axis=tuple(a for a in range(len(x.shape)) if a != axis))
        total = total + ops.segment_sum(squares, ops.convert_to_tensor(np.asarray(ids, "int32")),
                                        num_segments=n + 1)[:n]
    # max(): an all-zero group has RMS ~0 and no NaN gradient from sqrt.
    return ops.sqrt(ops.maximum(total / ops.convert_to_tensor(np.asarray(counts, "float32")), 1e-30))


def segment_rms_numpy(parts, counts):
    """`segment_rms` in NumPy float64, for eager readers (steering) where TF's segment sums are slow.

    >>> k = np.array([[3.0, 0.0], [4.0, 0.0]])
    >>> rms = segment_rms_numpy([(k, 1, np.array([0, 1])), (k, 0, np.array([1, 2]))], np.array([2.0, 4.0]))
    >>> [round(float(v), 3) for v in rms]
    [3.536, 1.5]
    """
    n = len(counts)
    total = np.zeros(n + 1)
    for kernel, axis, ids in parts:
        x = np.asarray(ops.convert_to_numpy(kernel), "float64")
        axis = axis % x.ndim
        squares = np.square(x).sum(axis=tuple(a for a in range(x.ndim) if a != axis))
        total += np.bincount(ids, weights=squares, minlength=n + 1)
    return np.sqrt(np.maximum(total[:n] / np.asarray(counts, "float64"), 1e-30))


def topk_mask(scores, k, method="histogram"):
    """Boolean mask with exactly `k` True entries at the largest `scores`.

    The global-threshold hot path of GSM, SynFlow and every global mask.
    `method="exact"` is `top_k` over all entries. `method="histogram"` (the
    default) bins the scores on a log scale (4096 bins), finds the bin holding
    the k-th largest, and runs `top_k` only inside that bin: exact, but
    touching every entry only with a histogram. Ties are broken by position
    (earlier flat index wins), so exactly `k` entries survive even when many
    scores are equal.

    Works eagerly and inside `tf.function` (TensorFlow backend).

    >>> mask = topk_mask(keras.ops.array([0.1, 3.0, 2.0, 2.0]), 2)
    >>> keras.ops.convert_to_numpy(mask).tolist()
    [False, True, True, False]
    """
    import tensorflow as tf  # dynamic-size gathers; TF backend only

    scores = tf.reshape(tf.convert_to_tensor(scores), [-1])
    if scores.dtype != tf.float64:  # float64 keeps SynFlow's huge/tiny scores apart
        scores = tf.cast(scores, tf.float32)
    n = tf.size(scores)
    k = tf.cast(k, tf.int32)
    if method == "exact":
        _, idx = tf.math.top_k(scores, k=k, sorted=False)
        return tf.scatter_nd(idx[:, None], tf.ones_like(idx, tf.bool), [n])
    if method != "histogram":
        raise ValueError(f"`method` must be 'histogram' or 'exact'; received {method!r}.")
    # Bin by the float32 bit pattern: for non-negative floats it is monotone
    # in the value, and its top 12 bits (exponent + 4 mantissa bits) form a
    # log-scale histogram with 1/16-octave bins -- one cheap pass, so heavy-
    # tailed scores (|w*g|, SynFlow's path products) still spread out.
    # Entries <= 0 share bin 0; the refinement below compares raw scores.
    bins = 4096  # fixed by the bit layout: 2**31 >> 19
    bits = tf.bitcast(tf.maximum(tf.cast(scores, tf.float32), 0.0), tf.int32)
    bin_index = tf.bitwise.right_shift(bits, 19)
    counts = tf.math.bincount(bin_index, minlength=bins, maxlength=bins)
    # Count from the top: above[b] = entries in bins > b.
    from_top = tf.cumsum(counts, reverse=True)
    above = from_top - counts
    # Boundary bin: the highest bin where entries at or above reach k.
    boundary = tf.reduce_max(tf.where(from_top >= k, tf.range(bins), -1))
    keep_above = bin_index > boundary
    need = k - tf.gather(above, tf.maximum(boundary, 0))
    in_bin = tf.where(tf.equal(bin_index, boundary))[:, 0]
    candidates = tf.gather(scores, in_bin)
    # top_k prefers the lower index on ties: deterministic, exactly `need` picked.
    _, picked = tf.math.top_k(candidates, k=need, sorted=False)
    chosen = tf.gather(in_bin, picked)
    boundary_mask = tf.scatter_nd(chosen[:, None], tf.ones_like(chosen, tf.bool), tf.cast([n], tf.int64))
    return tf.logical_or(keep_above, boundary_mask)


def topk_mask_numpy(scores, k):
    """`topk_mask` on the host: NumPy's introselect instead of TensorFlow ops.

    The same mask as `topk_mask(scores, k)` (exactly `k` True entries at the
    largest scores, ties broken by position: earlier flat index wins), found
    with one `np.partition` (the k-th largest value `t`) and two comparisons:
    every entry `> t` plus the first `k - count(> t)` entries `== t`. About
    10x faster than the TensorFlow ops on CPU for tens of millions of
    entries, so it is the threshold of eager loops like `prune_at_init`'s
    rounds. Scores are compared in their own dtype (float64 stays float64,
    other dtypes become float32, as in `topk_mask`).

    Args:
        scores: array of any shape (flattened).
        k: number of entries to keep, clipped to [0, size].

    >>> topk_mask_numpy(np.array([0.1, 3.0, 2.0, 2.0]), 2).tolist()
    [False, True, True, False]
    """
    scores = np.asarray(scores).reshape(-1)
    if scores.dtype != np.float64:
        scores = scores.astype(np.float32, copy=False)
    n = scores.size
    k = int(min(max(int(k), 0), n))
    if k == n or k == 0:
        return np.full(n, k == n, bool)
    t = np.partition(scores, n - k)[n - k]
    keep = scores > t
    need = k - int(np.count_nonzero(keep))
    if need:
        keep[np.flatnonzero(scores == t)[:need]] = True
    return keep


def global_topk_masks(score_list, k, method="histogram"):
    """`topk_mask` over several tensors at once: one global pool, masks per tensor.

    The one global selection: GSM's step, `final_prune` and `prune_at_init`
    all call it. `k` is clipped to the pool size; tensors may have dynamic
    shapes (inside `tf.function`).

    >>> masks = global_topk_masks([keras.ops.ones((2, 2)), keras.ops.zeros((3,))], 4)
    >>> [int(keras.ops.sum(keras.ops.cast(m, "int32"))) for m in masks]
    [4, 0]
    """
    import tensorflow as tf  # dynamic-size split; TF backend only

    tensors = [tf.convert_to_tensor(s) for s in score_list]
    dtype = tf.float64 if any(t.dtype == tf.float64 for t in tensors) else tf.float32
    flat = tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)
    mask = topk_mask(flat, tf.minimum(tf.cast(k, tf.int32), tf.size(flat)), method=method)
    pieces = tf.split(mask, tf.stack([tf.size(t) for t in tensors]))
    return [tf.reshape(p, tf.shape(t)) for p, t in zip(pieces, tensors)]


def _coprime_stride(stride, last_dim):
    # A stride sharing a factor with the row length would sample the same few
    # columns of every row; step to the next stride coprime with it.
    while np.gcd(stride, last_dim) != 1:
        stride += 1
    return stride


def sampled_threshold(score_list, k, sample_size=32768, offset=0):
    """Estimate of the `k`-th largest score over several tensors, from a sample.

    The fast, approximate partner of `global_topk_masks`: `scores >= t` keeps
    about `k` entries (relative error ~ sqrt((n - k) / (k * sample_size / n))
    -- about 1.7% at k = n/10 with the default sample). Each tensor contributes
    a strided sample proportional to its size (stride coprime with its last
    axis, shifted by `offset` so successive calls see different entries;
    tensors smaller than their share are taken whole), each sample weighted
    by the entries it stands for. The threshold is then found by bisection on
    the float32 bit pattern (monotone for non-negative floats, resolved to
    0.05% of the value): 20 counting passes over the sample, static shapes,
    so it compiles with XLA and never
    touches the unsampled entries -- inside one XLA program the score
    expression is evaluated only at the sampled positions. Scores must be
    non-negative.

    >>> t = sampled_threshold([keras.ops.arange(100.0)], 10)
    >>> float(t)  # exact here: the whole tensor fits in the sample
    90.0
    """
    import tensorflow as tf  # float bit patterns; TF backend only

    sizes = [int(np.prod(s.shape)) for s in score_list]
    total = sum(sizes)
    samples, weights = [], []
    for s, n in zip(score_list, sizes):
        flat = tf.reshape(tf.cast(s, tf.float32), [-1])
        m = min(n, max(1, round(sample_size * n / total)))
        if 2 * m > n:  # a stride of 1 would be the whole tensor anyway
            samples.append(flat)
            weights.append(tf.ones([n], tf.float32))
            continue
        last = int(s.shape[-1]) if len(s.shape) else 1
        stride = _coprime_stride(n // m, last)
        m = -(-n // stride) - 1  # positions start + stride * i < n for every start < stride
        start = tf.math.floormod(tf.cast(offset, tf.int32), stride)
        samples.append(tf.gather(flat, start + stride * tf.range(m)))
        weights.append(tf.fill([m], n / m))
    sample = tf.bitcast(tf.maximum(tf.concat(samples, 0), 0.0), tf.int32)
    weight = tf.concat(weights, 0)
    k = tf.cast(k, tf.float32)
    # Bisection fixes one bit per pass from the top: after 20 passes the
    # exponent and 11 mantissa bits are set (0.05% of the value, far below
    # the sampling error) -- the remaining 11 passes would buy nothing.
    low, step = tf.constant(0, tf.int32), 1 << 30
    for _ in range(20):  # invariant: weighted count(sample >= low) >= k
        enough = tf.reduce_sum(tf.where(sample >= low + step, weight, 0.0)) >= k
        low = tf.where(enough, low + step, low)
        step //= 2
    return tf.bitcast(low, tf.float32)
