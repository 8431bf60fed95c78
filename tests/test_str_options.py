"""STR's own threshold options (decay and learning-rate scale on `s`) and decay steering (issue 16)."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from support import compile_sgd
from tf_sparsity.steering import logit_bounds


def _grad_on_s(layer, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x))) + tf.add_n(layer.losses)
    return float(tape.gradient(loss, layer.threshold_logit))


def test_threshold_decay_and_lr_scale_act_on_s_only():
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    keras.utils.set_random_seed(0)
    base = tfs.layers.SoftThreshold(keras.layers.Dense(4), s_init=-2.0, weight_decay=1e-3)
    base(x)
    layer = tfs.layers.SoftThreshold(keras.layers.Dense(4), s_init=-2.0, weight_decay=1e-3,
                                     threshold_decay=0.5, threshold_lr_scale=0.1)
    layer(x)
    layer.layer.kernel.assign(base.layer.kernel)
    np.testing.assert_allclose(layer(x), base(x))  # the forward value is unchanged
    g_base = _grad_on_s(base, x)          # loss + 1e-3 * s
    g_loss = g_base - 1e-3 * (-2.0)
    g = _grad_on_s(layer, x)              # 0.1 * (loss + 0.5 * s)
    assert g == pytest.approx(0.1 * (g_loss + 0.5 * (-2.0)), rel=1e-4)
    layer.threshold_decay_scale.assign(3.0)   # the steered multiplier scales the decay on s only
    assert _grad_on_s(layer, x) == pytest.approx(0.1 * (g_loss + 1.5 * (-2.0)), rel=1e-4)


@pytest.mark.parametrize("mode, divisor", [("mean", 32.0), ("sqrt", 32.0 ** 0.5)])  # 8 x 4 entries
def test_normalized_threshold_gradient_divides_the_loss_gradient(tmp_path, mode, divisor):
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    layers = {}
    for name, gradient in (("sum", "sum"), ("mean", mode)):
        keras.utils.set_random_seed(0)
        layers[name] = tfs.layers.SoftThreshold(keras.layers.Dense(4), s_init=-2.0, weight_decay=1e-3,
                                                threshold_gradient=gradient, threshold_lr_scale=2.0)
        layers[name](x)
    layers["mean"].layer.kernel.assign(layers["sum"].layer.kernel)
    np.testing.assert_allclose(layers["mean"](x), layers["sum"](x))  # the forward value is unchanged
    decay = 2.0 * 1e-3 * (-2.0)                                       # the decay on s is not divided
    g_loss = _grad_on_s(layers["sum"], x) - decay
    assert _grad_on_s(layers["mean"], x) == pytest.approx(g_loss / divisor + decay, rel=1e-4)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    sparse = tfs.soft_threshold(model, s_init=-2.0, weight_decay=1e-3, threshold_gradient=mode)
    path = tmp_path / "mean.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[0].threshold_gradient == mode
    np.testing.assert_allclose(loaded(x), sparse(x))
    assert _grad_on_s(loaded.layers[0], x) == pytest.approx(_grad_on_s(sparse.layers[0], x), rel=1e-5)


def test_options_serialize_and_round_trip(tmp_path):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    sparse = tfs.soft_threshold(model, weight_decay=1e-4, threshold_decay=2e-3, threshold_lr_scale=0.5)
    sparse.layers[0].threshold_decay_scale.assign(7.0)
    path = tmp_path / "m.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    w = loaded.layers[0]
    assert (w.threshold_decay, w.threshold_lr_scale, w.s_decay) == (2e-3, 0.5, 2e-3)
    assert float(w.threshold_decay_scale) == 7.0
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(loaded(x), sparse(x))
    config = tfs.callbacks.TargetSparsity(0.9, steer="decay", finish="none", decay_gain=0.3).get_config()
    again = tfs.callbacks.TargetSparsity.from_config(config)
    assert (again.steer, again.finish, again.decay_gain) == ("decay", "none", 0.3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold_decay=-1.0), "`threshold_decay`"),
    (dict(threshold_lr_scale=-1.0), "`threshold_lr_scale`"),
    (dict(threshold_lr_scale=float("nan")), "`threshold_lr_scale`"),
    (dict(threshold_gradient="average"), "`threshold_gradient`"),
    (dict(threshold_gradient=None), "`threshold_gradient`"),
])
def test_bad_threshold_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfs.layers.SoftThreshold(keras.layers.Dense(4), **kwargs)


def test_bad_steer_arguments():
    with pytest.raises(ValueError, match="`steer`"):
        tfs.callbacks.TargetSparsity(0.9, steer="bias")
    with pytest.raises(ValueError, match="`finish`"):
        tfs.callbacks.TargetSparsity(0.9, finish="snap")


@pytest.mark.slow
def test_auto_mode_picks_decay_for_learned_thresholds_and_offset_otherwise(mnist1d_data):
    (x, y), _ = mnist1d_data
    for learn, expected in [(True, "decay"), (False, "offset")]:
        sparse = compile_sgd(tfs.soft_threshold(tfs.zoo.mnist1d_cnn(filters=8, hidden=16), weight_decay=5e-4,
                                                learn_threshold=learn))
        steer = tfs.callbacks.TargetSparsity(0.5, end_step=4, steer="auto")
        sparse.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0, callbacks=[steer])
        assert steer.mode == expected
        assert abs(tfs.sparsity(sparse) - 0.5) <= 0.01  # finish="offset" lands on the target


@pytest.mark.slow
def test_decay_steering_tracks_the_target_without_an_offset(mnist1d_data):
    (x, y), _ = mnist1d_data
    keras.utils.set_random_seed(0)
    sparse = compile_sgd(tfs.soft_threshold(tfs.zoo.mnist1d_cnn(filters=16, hidden=64), weight_decay=5e-4))
    steer = tfs.callbacks.TargetSparsity(0.8, steer="decay", finish="none", decay_gain=0.5)
    sparse.fit(x, y, epochs=8, batch_size=128, verbose=0, callbacks=[steer])
    wrappers = tfs.surgery.wrappers(sparse)
    assert all(float(w.threshold_offset) == 0.0 for w in wrappers)
    # The decay alone moved the thresholds (it lags the ramp in so short a run) ...
    assert 0.3 < tfs.sparsity(sparse) < 0.95 and steer.trace[-1][3] > 1.0
    # ... and every layer's s is its own.
    logits = [float(w.threshold_logit) for w in wrappers]
    assert max(logits) - min(logits) > 0.3


def _paper_regime_fit(steps, rule, finish="none", target=0.5, s_init=-3200.0, momentum=0.9, nesterov=False):
    # s_init -3200: sigmoid'(s) is exactly 0, so only the steered decay moves s.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
    sparse = tfs.soft_threshold(model, s_init=s_init, weight_decay=1e-4, threshold_decay=0.01)
    sparse.compile(keras.optimizers.SGD(0.1, momentum=momentum, nesterov=nesterov),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logits = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: logits.append([float(w.threshold_logit) for w in tfs.surgery.wrappers(sparse)]))
    steer = tfs.callbacks.TargetSparsity(target, end_step=steps // 2, update_every=10, steer="decay",
                                         finish=finish, decay_rule=rule, decay_max_rate=0.025)
    x = np.random.default_rng(0).normal(size=(16 * steps, 16)).astype("float32")
    sparse.fit(x, np.arange(len(x)) % 4, batch_size=16, epochs=1, verbose=0, callbacks=[steer, record])
    return sparse, steer, np.array(logits)


@pytest.mark.slow
def test_ratio_rule_brings_the_paper_regime_to_the_target_without_overshoot():
    sparse, steer, logits = _paper_regime_fit(400, "ratio")
    # Far from the active region |s| contracts at the capped rate: the heavy-ball root formula is exact.
    rate = np.diff(np.log(np.abs(logits[100:250, 0])))  # after the momentum transient, before s nears -10
    np.testing.assert_allclose(rate, -0.025, rtol=0.02)
    assert (logits < 0).all()                           # momentum never carried s past 0
    assert abs(tfs.sparsity(sparse) - 0.5) < 0.05       # the decay alone, no offset (finish="none")
    assert all(float(w.threshold_offset) == 0.0 for w in tfs.surgery.wrappers(sparse))
    # The linearized rule moves s by 2 logits per update at most: from -3200 it never arrives.
    sparse, _, logits = _paper_regime_fit(400, "shift")
    assert tfs.sparsity(sparse) == 0.0 and logits[-1, 0] < -3000


def test_finish_offset_reaches_far_logits():
    # Stopped while s is still ~-3000: the final offset must search past the solver's default (-100, 100).
    sparse, steer, _ = _paper_regime_fit(20, "ratio", finish="offset", target=0.3)
    assert steer.sparsity_before_finish == 0.0
    assert abs(tfs.sparsity(sparse) - 0.3) < 0.02
    lo, hi = logit_bounds(tfs.surgery.wrappers(sparse))
    assert lo < -3000 and hi > 3000


def test_decay_rule_options_serialize_and_are_checked():
    config = tfs.callbacks.TargetSparsity(0.9, steer="decay", decay_rule="ratio", decay_max_rate=0.01).get_config()
    again = tfs.callbacks.TargetSparsity.from_config(config)
    assert (again.decay_rule, again.decay_max_rate) == ("ratio", 0.01)
    assert tfs.callbacks.TargetSparsity(0.9).decay_rule == "shift"   # the default is unchanged
    with pytest.raises(ValueError, match="`rule`"):
        tfs.callbacks.TargetSparsity(0.9, decay_rule="log")
    for bad in (0.0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="`max_rate`"):
            tfs.callbacks.TargetSparsity(0.9, decay_rule="ratio", decay_max_rate=bad)


DATA = Path(__file__).parent / "data"


def test_files_saved_before_the_decay_scale_still_load():
    # Saved by the release before `threshold_decay_scale` existed (commit 632d470):
    # two SoftThreshold layers holding `s` and the offset only.
    loaded = keras.models.load_model(DATA / "soft_threshold_v0.keras")
    x = np.load(DATA / "soft_threshold_v0_input.npy")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.load(DATA / "soft_threshold_v0_output.npy"),
                               rtol=1e-6, atol=1e-6)
    for layer in loaded.layers[1:]:
        assert (float(layer.threshold_logit), float(layer.threshold_offset)) == (-2.5, 0.25)
        assert float(layer.threshold_decay_scale) == 1.0

# ------------------------------------------------ BatchNorm recalibration
def test_recalibrate_batchnorm_sets_population_statistics_and_nothing_else():
    keras.utils.set_random_seed(0)
    model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn_bn(filters=4, hidden=8), s_init=-1.0)
    x = np.random.default_rng(0).normal(2.0, 3.0, (256, 40, 1)).astype("float32")
    before = [v.numpy().copy() for v in model.trainable_variables]
    assert tfs.recalibrate_batchnorm(model, x, batch_size=64) == 4
    bn = model.get_layer("bn1")
    h = keras.Model(model.input, bn.input)(x).numpy().reshape(-1, 4)
    batches = h.reshape(4, -1, 4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), batches.var(1).mean(0), rtol=1e-3, atol=1e-6)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())
    assert bn.momentum == 0.99 and bn.trainable
    # inference now matches training-mode normalisation on the same data
    np.testing.assert_allclose(model(x[:64], training=False).numpy(), model(x[:64], training=True).numpy(),
                               rtol=0.2, atol=0.05)


def test_recalibrate_batchnorm_frozen_layer_and_bad_input():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    model.layers[0].trainable = False
    x = np.full((8, 3), 5.0, "float32")
    assert tfs.recalibrate_batchnorm(model, x, batch_size=4, max_batches=1) == 1
    np.testing.assert_allclose(model.layers[0].moving_mean.numpy(), 5.0)
    assert model.layers[0].trainable is False
    with pytest.raises(ValueError, match="batch_size"):
        tfs.recalibrate_batchnorm(model, x, batch_size=0)
    with pytest.raises(ValueError, match="fewer than one"):
        tfs.recalibrate_batchnorm(model, x, batch_size=64)
    with pytest.raises(TypeError, match="model"):
        tfs.recalibrate_batchnorm("model", x)
    assert tfs.recalibrate_batchnorm(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), x) == 0
