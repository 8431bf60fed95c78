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
    sparse = tfs.soft_threshold(model, granularity="channel", s_init=-1.0,  # threshold 0.27
                                channel_groups=False)  # per-layer channels (the chain surgery)
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


# ------------------------------------------------- channel-STR over channel dependency groups
def _residual_toy():
    from test_groups import _toy

    model = _toy()
    for layer in model.layers:  # non-trivial BN statistics: removed channels are not all alike
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([random_like(w.shape, i) ** 2 * 0.5 + 0.5 for i, w in enumerate(layer.get_weights())])
    return model


def _kill(sparse, fraction):
    """Steer the common offset so that about `fraction` of the entries are zero."""
    from tf_sparsity import steering

    found = steering.steerables(sparse)
    offset, _ = steering.solve_threshold_offset(found, fraction)
    for w in found:
        w.threshold_offset.assign(offset)


def _check_stripped(sparse, x, dense_flops):
    plain = tfs.strip(sparse)
    assert type(plain) is not tfs.surgery.ChannelGroupModel
    want = np.asarray(sparse(x, training=False))
    assert np.std(want) > 0  # outputs still depend on the input
    np.testing.assert_allclose(np.asarray(plain(x, training=False)), want, atol=1e-5)
    flops = tfs.summary(plain, print_fn=None).flops
    assert flops < dense_flops
    return plain


def test_channel_groups_vanish_together_and_strip_exactly():
    model = _residual_toy()
    # Residual channels 1 and 5 tiny in every kernel slice they touch (producers stem and
    # project, consumers expand, side and fc): only their joint RMS is under the threshold.
    tiny = np.isin(np.arange(8), [1, 5])
    for name, axis in (("stem", -1), ("project", -1), ("expand", -2), ("side", -2)):
        kernel = model.get_layer(name).kernel
        scale = np.where(tiny, 1e-4, 1.0).reshape([-1 if a == axis % 4 else 1 for a in range(4)])
        kernel.assign(kernel.numpy() * scale)
    fc = model.get_layer("fc").kernel
    fc.assign(fc.numpy() * np.where(np.tile(np.r_[tiny, np.zeros(6, bool)], 16), 1e-4, 1.0)[:, None])
    sparse = tfs.soft_threshold(model, granularity="channel", learn_threshold=False)  # threshold 0.0067
    assert isinstance(sparse, tfs.surgery.ChannelGroupModel)
    # The residual stream: stem's and project's filters, and every consumer's input rows
    # (expand, side, and fc per position after the Flatten), are zero for the same channels.
    effective = {w.layer.name: np.asarray(w.effective_kernels()[0]) for w in tfs.surgery.wrappers(sparse)}
    dead = np.all(effective["stem"].reshape(-1, 8) == 0, axis=0)
    np.testing.assert_array_equal(dead, tiny)
    np.testing.assert_array_equal(np.all(effective["project"].reshape(-1, 8) == 0, axis=0), dead)
    for consumer in ("expand", "side"):
        np.testing.assert_array_equal(np.all(effective[consumer][0, 0] == 0, axis=1), dead)
    fc_rows = np.all(effective["fc"] == 0, axis=1).reshape(16, 14)  # 4x4 positions x (8 + 6) channels
    assert np.all(fc_rows[:, :8] == dead)
    x = random_like((4, 8, 8, 3))
    plain = _check_stripped(sparse, x, tfs.summary(model, print_fn=None).flops)
    assert plain.get_layer("stem").filters == plain.get_layer("project").filters == 8 - dead.sum()


@pytest.mark.slow
def test_channel_groups_train_with_fit():
    model = _residual_toy()
    sparse = compile_sgd(tfs.soft_threshold(model, granularity="channel", s_init=-3.0, weight_decay=1e-3))
    x, y = random_like((32, 8, 8, 3)), np.arange(32) % 5
    before = [np.array(w) for w in sparse.trainable_weights]
    sparse.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[tfs.callbacks.TargetSparsity(0.3)])
    after = sparse.trainable_weights
    assert all(np.all(np.isfinite(w)) for w in after)
    moved = {v.path for v, b in zip(after, before) if not np.array_equal(np.asarray(v), b)}
    assert any("threshold_logit" in p for p in moved) and any("kernel" in p for p in moved)
    _check_stripped(sparse, x[:4], tfs.summary(model, print_fn=None).flops)


def test_channel_groups_round_trip(tmp_path):
    model = _residual_toy()
    sparse = tfs.soft_threshold(model, granularity="channel", learn_threshold=False)
    x = random_like((4, 8, 8, 3))
    _kill(sparse, 0.3)
    path = tmp_path / "grouped.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tfs.surgery.ChannelGroupModel)
    assert loaded.channel_coupling.num_units == sparse.channel_coupling.num_units
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(sparse(x, training=False)))
    _check_stripped(loaded, x, tfs.summary(model, print_fn=None).flops)


def test_channel_groups_bad_input():
    with pytest.raises(TypeError, match="`channel_groups` must be True or False"):
        tfs.soft_threshold(keras.Sequential([keras.Input((4,)), L.Dense(2)]), granularity="channel",
                           channel_groups="yes")
    with pytest.raises(ValueError, match="no channel group of `model` can be thresholded"):
        tfs.soft_threshold(keras.Sequential([keras.Input((4,)), L.Dense(2)]), granularity="channel")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_channel_groups_on_keras_applications_strip_exactly(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10,
                                              classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([random_like(w.shape, 1) ** 2 * 0.5 + 0.5 for w in layer.get_weights()])
    sparse = tfs.soft_threshold(model, granularity="channel", learn_threshold=False)
    _kill(sparse, 0.2)
    _check_stripped(sparse, random_like((2, 32, 32, 3)), tfs.summary(model, print_fn=None).flops)


def test_steered_hard_mask_threshold_stays_clear_of_every_group():
    # The solver's bisection ends where a group's RMS equals its threshold; a
    # hard mask there is decided by rounding (predict vs the eager pass strip
    # bakes in). The chosen offset must sit inside its plateau.
    from tf_sparsity import steering

    model = keras.Sequential([keras.Input((16,)), L.Dense(32), L.Dense(8)])
    sparse = tfs.soft_threshold(model, granularity="channel", channel_groups=False, shrink=False,
                                learn_threshold=False, s_init=-4.0)
    found = steering.steerables(sparse)
    for fraction in (0.3, 0.5, 0.8):
        offset, _ = steering.solve_threshold_offset(found, fraction)
        for w in found:
            w.threshold_offset.assign(offset)
            magnitudes, _ = w.threshold_magnitudes()
            gap = np.min(np.abs(magnitudes - w.threshold_value()) / w.threshold_value())
            assert gap > 1e-4, (fraction, w.name, gap)
        assert abs(steering.current_sparsity(found) - fraction) < 0.1


@pytest.mark.parametrize("net", ["mnist1d_resnet", pytest.param("mnist1d_mobilenet", marks=pytest.mark.slow)])
def test_steering_over_channel_groups_counts_the_zeros_exactly(net):
    # An entry dies with the first of its row and column groups: the solver's
    # count must equal the sparsity the model then has (it overshot by up to 0.3).
    from tf_sparsity import steering

    keras.utils.set_random_seed(0)
    sparse = tfs.soft_threshold(getattr(tfs.zoo, net)(), granularity="channel", learn_threshold=False,
                                shrink=False, s_init=-4.0)
    found = steering.steerables(sparse)
    for fraction in (0.3, 0.6):
        offset, _ = steering.solve_threshold_offset(found, fraction)
        for w in found:
            w.threshold_offset.assign(offset)
        assert abs(tfs.sparsity(sparse) - fraction) < 0.01
        assert abs(steering.current_sparsity(found) - tfs.sparsity(sparse)) < 1e-3


def _weak_middle_mlp():
    # Three hidden groups; the middle one's kernels are 100x smaller, so one common
    # threshold reaches all its units before any other group's.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), L.Dense(16, name="a"), L.Dense(16, name="b"),
                              L.Dense(16, name="c"), L.Dense(4, name="out")])
    for name in ("b", "c"):  # c's input rows are part of b's group
        kernel = model.get_layer(name).kernel
        kernel.assign(kernel.numpy() * 0.01)
    return model


@pytest.mark.parametrize("min_channels", [1, 3])
def test_channel_floor_keeps_every_group_alive(min_channels):
    from tf_sparsity import steering

    model = _weak_middle_mlp()
    sparse = tfs.soft_threshold(model, granularity="channel", learn_threshold=False, shrink=False,
                                min_channels=min_channels)
    coupling = sparse.channel_coupling
    assert coupling.min_channels == min_channels
    # A cut deep enough to empty group b without the floor: the solver keeps b's strongest units.
    offset, reached, emptied = steering.solve_flops_offset(coupling, 0.2)
    assert emptied == []
    for w in tfs.surgery.wrappers(sparse):
        w.threshold_offset.assign(offset)
    effective = {w.layer.name: np.asarray(w.effective_kernels()[0]) for w in tfs.surgery.wrappers(sparse)}
    alive_b = np.any(effective["b"] != 0, axis=0)
    assert alive_b.sum() == min_channels
    rms = np.sqrt((model.get_layer("b").kernel.numpy() ** 2).sum(0) + (model.get_layer("c").kernel.numpy() ** 2).sum(1))
    np.testing.assert_array_equal(np.flatnonzero(alive_b), np.sort(np.argsort(rms)[-min_channels:]))
    # The forward pass, the solver's count and strip agree.
    x = random_like((8, 12))
    plain = _check_stripped(sparse, x, tfs.summary(model, print_fn=None).flops)
    assert plain.get_layer("b").units == min_channels
    macs = tfs.summary(plain, print_fn=None).flops / tfs.summary(model, print_fn=None).flops
    assert abs(macs - reached) < 1e-6


def test_channel_floor_zero_lets_a_group_empty_and_says_so():
    from tf_sparsity import steering

    sparse = tfs.soft_threshold(_weak_middle_mlp(), granularity="channel", learn_threshold=False,
                                shrink=False, min_channels=0)
    _, _, emptied = steering.solve_flops_offset(sparse.channel_coupling, 0.2)
    assert emptied == ["b"]
    with pytest.raises(ValueError, match="`min_channels` must be an integer >= 0; received -1"):
        tfs.soft_threshold(_weak_middle_mlp(), granularity="channel", min_channels=-1)


def test_channel_floor_round_trips_and_bounds_the_budget(tmp_path):
    sparse = tfs.soft_threshold(_weak_middle_mlp(), granularity="channel", learn_threshold=False,
                                shrink=False, min_channels=4)
    path = tmp_path / "floor.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.channel_coupling.min_channels == 4
    sparse.compile("sgd", keras.losses.MeanSquaredError())
    x, y = random_like((16, 12)), random_like((16, 4), seed=1)
    with pytest.raises(ValueError, match=r"`flops=0.05` cannot be reached: with every thresholdable channel "
                                         r"group at 4 unit\(s\) \(`min_channels`\)"):
        sparse.fit(x, y, epochs=1, verbose=0, callbacks=[tfs.callbacks.TargetFlops(0.05, end_step=1)])


def test_files_without_a_floor_load_without_one():
    sparse = tfs.soft_threshold(_weak_middle_mlp(), granularity="channel", learn_threshold=False, shrink=False)
    config = sparse.get_layer("str_b").get_config()
    del config["min_channels"]  # as written before the floor existed
    assert tfs.layers.SoftThreshold.from_config(config).min_channels == 0
    assert tfs.layers.SoftThreshold.from_config(sparse.get_layer("str_b").get_config()).min_channels == 1
