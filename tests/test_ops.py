"""Shared math: soft threshold and the exact global top-k."""

import numpy as np
import pytest
import tensorflow as tf

from tf_sparsity import ops as sops


def test_soft_threshold_values_and_zero_gradient_below():
    x = tf.Variable([-1.0, -0.3, 0.2, 0.5, 0.9])
    with tf.GradientTape() as tape:
        y = sops.soft_threshold(x, 0.4)
        total = tf.reduce_sum(y)
    np.testing.assert_allclose(y, [-0.6, 0, 0, 0.1, 0.5], atol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, x), [1, 0, 0, 1, 1])


@pytest.mark.parametrize("method", ["histogram", "exact"])
@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_topk_mask_selects_exactly_the_top_k(method, k):
    rng = np.random.default_rng(k)
    scores = np.abs(rng.standard_cauchy(1000)).astype("float32")  # heavy tailed
    mask = sops.topk_mask(scores, k, method=method).numpy()
    assert mask.sum() == k
    expected = np.argsort(-scores, kind="stable")[:k]
    assert set(np.flatnonzero(mask)) == set(expected)


def test_topk_mask_breaks_ties_so_exactly_k_survive():
    scores = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0], "float32")
    mask = sops.topk_mask(scores, 3).numpy()
    assert mask.tolist() == [False, True, True, False, False, True, False]
    all_equal = sops.topk_mask(np.ones(50, "float32"), 10).numpy()
    assert all_equal.sum() == 10 and all_equal[:10].all()
    zeros = sops.topk_mask(np.zeros(8, "float32"), 3).numpy()
    assert zeros.sum() == 3


def test_topk_mask_in_tf_function_matches_exact():
    scores = np.random.default_rng(0).random(20000).astype("float32") ** 4
    f = tf.function(lambda s, k: sops.topk_mask(s, k))
    for k in (1, 1234, 19999):
        np.testing.assert_array_equal(f(scores, k).numpy(), sops.topk_mask(scores, k, method="exact").numpy())


def test_global_topk_masks_keeps_shapes():
    a = np.arange(6, dtype="float32").reshape(2, 3)
    b = np.array([10.0, -1.0], "float32")
    ma, mb = sops.global_topk_masks([a, b], 3)
    assert ma.shape == (2, 3) and mb.shape == (2,)
    assert np.asarray(ma).tolist() == [[False, False, False], [False, True, True]]
    assert np.asarray(mb).tolist() == [True, False]


def test_topk_mask_rejects_unknown_method():
    with pytest.raises(ValueError, match="`method`"):
        sops.topk_mask(np.ones(3, "float32"), 1, method="fast")


@pytest.mark.slow
def test_sampled_threshold_is_exact_on_small_pools_and_close_on_large():
    scores = np.random.default_rng(0).permutation(1000).astype("float32")
    assert float(sops.sampled_threshold([scores[:600], scores[600:]], 25)) == 975.0
    rng = np.random.default_rng(1)
    a = np.abs(rng.normal(size=(1024, 512))).astype("float32")
    b = np.abs(rng.standard_cauchy(size=(64, 256))).astype("float32")  # heavy tail, other scale
    every = np.concatenate([a.ravel(), b.ravel()])
    k = every.size // 10  # expected relative error ~1.7%
    xla = tf.function(lambda a, b, off: sops.sampled_threshold([a, b], k, offset=off), jit_compile=True)
    kept = [int((every >= float(xla(a, b, off))).sum()) for off in range(4)]
    assert all(abs(n - k) < 0.07 * k for n in kept), kept
    assert len(set(kept)) > 1  # the offset moves the sample
