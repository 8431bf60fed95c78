"""Block and channel STR: group soft threshold, steering, physical channel removal."""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
from tf_sparsity import ops as sops
from support import compile_sgd, random_like

L = keras.layers


def test_group_soft_threshold_granularities():
    x = random_like((10, 6), seed=3)
    np.testing.assert_allclose(sops.group_soft_threshold(x, 0.5, "weight"), sops.soft_threshold(x, 0.5))
    block = np.asarray(sops.group_soft_threshold(x, 1.2, "block", (4, 1)))
    # Rows 0-3, 4-7, 8-9 (padded) of each column are zero or nonzero together.
    for col in range(6):
        for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
            part = block[rows, col]
            assert np.all(part == 0) or np.all(part != 0)
    assert 0 < np.mean(block == 0) < 1, np.mean(block == 0)
    # A surviving block shrinks by threshold * sqrt(block size) in L2 norm.
    norm = np.linalg.norm(x[0:4, 0])
    if norm > 2 * 1.2:
        np.testing.assert_allclose(np.linalg.norm(block[0:4, 0]), norm - 2 * 1.2, rtol=1e-5)
    channel = np.asarray(sops.group_soft_threshold(x, 0.8, "channel"))
    dead = np.sqrt(np.mean(x ** 2, axis=0)) <= 0.8
    assert dead.any() and not dead.all()
    assert np.all(channel[:, dead] == 0) and np.all(channel[:, ~dead] != 0)


@pytest.mark.slow
def test_block_str_trains_to_target_with_whole_blocks(mnist1d_data):
    (x, y), _ = mnist1d_data
    model = tfs.zoo.mnist1d_mlp(hidden=(64, 64))
    sparse = compile_sgd(tfs.soft_threshold(model, granularity="block", block_shape=(4, 1),
                                            weight_decay=5e-4, learn_threshold=False))
    sparse.fit(x, y, epochs=3, batch_size=128, verbose=0, callbacks=[tfs.callbacks.TargetSparsity(0.8)])
    assert abs(tfs.sparsity(sparse) - 0.8) <= 0.01
    plain = tfs.strip(sparse)
    kernel = plain.get_layer("fc2").kernel.numpy()  # (64, 64): 16 blocks of 4 rows per column
    blocks = kernel.reshape(16, 4, 64)
    nonzero = np.count_nonzero(blocks, axis=1)
    assert set(np.unique(nonzero)) <= {0, 4}
    path_model = tfs.soft_threshold(model, granularity="block", block_shape=(16, 1))
    assert path_model.get_layer("str_fc1").block_shape == (16, 1)


def test_channel_str_strip_removes_channels_exactly_for_dense_chains():
    inputs = keras.Input((12,))
    x = L.Dense(16, activation="relu", name="a")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Dense(8, activation="relu", name="b")(x)
    model = keras.Model(inputs, L.Dense(3, name="out")(x))
    a = model.get_layer("a")
    scale = np.where(np.arange(16) % 3 == 0, 0.01, 1.0).astype("float32")  # every third column tiny
    a.set_weights([random_like((12, 16)) * scale, random_like((16,), seed=5)])  # nonzero bias
    for w in model.get_layer("bn").weights:
        w.assign(np.random.default_rng(1).random(w.shape).astype("float32") + 0.5)
    sparse = tfs.soft_threshold(model, granularity="channel", s_init=-1.0)  # threshold 0.27
    data = random_like((6, 12))
    dead = np.sqrt(np.mean(a.kernel.numpy() ** 2, axis=0)) <= 1 / (1 + np.e)
    assert dead.sum() == 6
    plain = tfs.strip(sparse)
    assert plain.get_layer("a").units == 16 - dead.sum()
    assert plain.get_layer("bn").gamma.shape == (16 - dead.sum(),)
    np.testing.assert_allclose(plain(data), sparse(data), atol=1e-5)
    assert tfs.summary(plain, print_fn=None).params < tfs.summary(model, print_fn=None).params


@pytest.mark.slow
def test_channel_str_cnn_strip_is_smaller_and_close(mnist1d_data):
    (x, y), _ = mnist1d_data
    sparse = compile_sgd(tfs.soft_threshold(tfs.zoo.mnist1d_cnn(filters=16, hidden=64), granularity="channel",
                                            learn_threshold=False))
    sparse.fit(x[:1024], y[:1024], epochs=2, batch_size=128, verbose=0,
               callbacks=[tfs.callbacks.TargetSparsity(0.6)])
    plain = tfs.strip(sparse)
    before, after = tfs.summary(sparse, print_fn=None), tfs.summary(plain, print_fn=None)
    assert after.flops < before.flops
    # Removed filters fold into the next bias; only 'same'-padding borders differ.
    ref, out = sparse.predict(x[:64], verbose=0), plain.predict(x[:64], verbose=0)
    assert np.mean(np.argmax(ref, 1) == np.argmax(out, 1)) > 0.95


def test_bad_granularity():
    with pytest.raises(ValueError, match="`granularity`"):
        tfs.layers.SoftThreshold(L.Dense(2), granularity="row")
    with pytest.raises(ValueError, match="`block_shape`"):
        tfs.layers.SoftThreshold(L.Dense(2), granularity="block", block_shape=(0, 1))


def test_hard_group_threshold_keeps_survivors_whole():
    x = random_like((8, 5), seed=4)
    hard = np.asarray(sops.group_soft_threshold(x, 0.9, "block", (4, 1), shrink=False))
    kept = hard != 0
    np.testing.assert_array_equal(hard[kept], x[kept])  # no shrinkage
    rms = np.sqrt(np.mean(x.reshape(2, 4, 5) ** 2, axis=1))
    np.testing.assert_array_equal(kept.reshape(2, 4, 5).all(axis=1), rms > 0.9)
    with pytest.raises(ValueError, match="`shrink=False`.*learn_threshold=False"):
        tfs.layers.SoftThreshold(L.Dense(2), shrink=False)
    layer = tfs.layers.SoftThreshold(L.Dense(2), shrink=False, learn_threshold=False, granularity="block")
    assert layer.get_config()["shrink"] is False
