"""GlobalSparseMomentum: update math, global top-Q, finishing, serialization, distribution."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from tf_sparsity.optimizers import GlobalSparseMomentum, GSMMonitor, final_prune
from support import assert_same_state, fit_single_and_mirrored

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_cnn():
    return tfs.zoo.mnist1d_cnn(filters=16, hidden=64)


def pool_nonzeros(model):
    return sum(int(np.count_nonzero(v.numpy())) for v in model.trainable_variables if len(v.shape) >= 2)


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="a"), keras.layers.Dense(2, name="b"),
    ])


# ---------------------------------------------------------------- training
@pytest.mark.slow
def test_training_then_final_prune_keeps_exactly_q(mnist1d_data):
    (x, y), (xt, yt) = mnist1d_data
    model = small_cnn()
    opt = GlobalSparseMomentum(0.01, momentum=0.99, nesterov=True, compression=10)
    model.compile(opt, LOSS, metrics=["accuracy"])
    history = model.fit(x, y, epochs=6, batch_size=64, verbose=0, callbacks=[GSMMonitor()])
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables if len(v.shape) >= 2)
    assert opt.pool_size == n and opt.q == round(n / 10)
    # The last mask selected exactly Q entries, spread non-uniformly over layers.
    assert sum(opt.active_counts_by_name().values()) == opt.q
    fractions = opt.active_fractions()
    assert set(fractions) == {"conv1", "conv2", "conv3", "fc1", "logits"}
    assert max(fractions.values()) > 3 * min(fractions.values())
    assert len(history.history["gsm_active/fc1"]) == 6
    final_prune(model)
    assert pool_nonzeros(model) == opt.q
    report = tfs.summary(model, print_fn=None)
    assert report.nonzeros == opt.q and report.sparsity == pytest.approx(0.9, abs=1e-3)
    _, acc = model.evaluate(xt, yt, verbose=0)
    assert acc > 0.4  # chance is 0.1; quality is measured in benchmarks/gsm_vs_sgd.py


@pytest.mark.slow
def test_custom_training_loop_with_apply(mnist1d_data):
    (x, y), _ = mnist1d_data
    model = small_cnn()
    opt = GlobalSparseMomentum(0.01, momentum=0.9, sparsity=0.8)
    variables = model.trainable_variables

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model(xb, training=True))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    losses = [float(step(x[i:i + 128], y[i:i + 128])) for i in range(0, 2048, 128)]
    assert losses[-1] < losses[0]
    assert opt.q == round(opt.pool_size * 0.2)
    assert sum(opt.active_counts_by_name().values()) == opt.q
    assert int(opt.iterations.numpy()) == 16


# ------------------------------------------------------------- update math
def numpy_gsm(weights, grads_per_step, pool, q, lr, beta, eta, nesterov, decay_scope="kernels"):
    """Reference: z <- beta z + eta w + B*g; w <- w - lr z (PyTorch-style Nesterov).

    `decay_scope="kernels"` (the official code) decays only rank >= 2 variables."""
    w = [np.array(v, "float64") for v in weights]
    z = [np.zeros_like(v) for v in w]
    for grads in grads_per_step:
        scores = np.concatenate([np.abs(w[i] * grads[i]).ravel() for i in pool])
        keep = np.zeros(scores.size, bool)
        keep[np.argsort(-scores, kind="stable")[:q]] = True
        masks, start = {}, 0
        for i in pool:
            masks[i] = keep[start:start + w[i].size].reshape(w[i].shape)
            start += w[i].size
        for i in range(len(w)):
            g = grads[i] * masks[i] if i in masks else grads[i]
            decays = decay_scope == "all" or w[i].ndim >= 2
            d = g + eta * w[i] if decays else g
            z[i] = beta * z[i] + d
            w[i] = w[i] - lr * (d + beta * z[i] if nesterov else z[i])
    return w, z


@pytest.mark.parametrize("method", ["histogram", "sample"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("decay_scope", ["kernels", "all"])
def test_update_rule_matches_numpy(nesterov, fused, method, decay_scope, monkeypatch):
    # A 20-weight pool fits in the sample: "sample" is exact here too.
    monkeypatch.setattr(GlobalSparseMomentum, "fused_kernel", fused)
    model = tiny_model()
    variables = model.trainable_variables  # a/kernel, a/bias, b/kernel, b/bias
    start = [v.numpy() for v in variables]
    rng = np.random.default_rng(1)
    grads = [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(4)]
    opt = GlobalSparseMomentum(0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01, compression=4,
                               threshold_method=method, decay_scope=decay_scope)
    for g in grads:
        opt.apply([tf.constant(a) for a in g], variables)
    assert opt.pool_size == 20 and opt.q == 5
    expected, momenta = numpy_gsm(start, grads, pool=[0, 2], q=5, lr=0.1, beta=0.9, eta=0.01,
                                  nesterov=nesterov, decay_scope=decay_scope)
    for v, e in zip(variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=v.path)
    for z, e in zip(opt.momentums, momenta):
        np.testing.assert_allclose(z.numpy(), e, rtol=1e-5, atol=1e-6)
    assert sum(opt.active_counts_by_name().values()) == 5


def test_weight_outside_top_q_only_decays():
    w0 = np.array([[1.0, 1.0], [1.0, 1e-3]], "float32")  # entry (1, 1): tiny |w * g|
    w = keras.Variable(w0, name="kernel")
    g = tf.constant([[0.5, 0.5], [0.5, 10.0]])
    opt = GlobalSparseMomentum(0.1, momentum=0.9, weight_decay=0.05, compression=4 / 3)
    assert opt.momentum == 0.9
    decay_only, z = 1e-3, 0.0
    full, zf = 1.0, 0.0
    for _ in range(5):
        opt.apply([g], [w])
        z = 0.9 * z + 0.05 * decay_only
        decay_only -= 0.1 * z
        zf = 0.9 * zf + 0.05 * full + 0.5
        full -= 0.1 * zf
    out = w.numpy()
    # The big gradient (10.0) never reached the unselected weight: it only decayed.
    np.testing.assert_allclose(out[1, 1], decay_only, rtol=1e-5)
    assert 0 < out[1, 1] < 1e-3
    np.testing.assert_allclose(out[0, 0], full, rtol=1e-5)
    assert opt.active_counts_by_name() == {"kernel": 3}


def test_histogram_and_exact_thresholds_give_the_same_masks(mnist1d_data):
    (x, y), _ = mnist1d_data
    model = small_cnn()
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = LOSS(y[:256], model(x[:256], training=True))
    grads = tape.gradient(loss, variables)
    masks = {}
    for method in ("histogram", "exact"):
        opt = GlobalSparseMomentum(0.01, compression=30, threshold_method=method)
        opt.build(variables)
        found = [m.numpy() for m in opt._global_masks(list(grads), variables) if m is not None]
        assert len(found) == 5 and sum(int(m.sum()) for m in found) == opt.q
        masks[method] = found
    for a, b in zip(masks["histogram"], masks["exact"]):
        np.testing.assert_array_equal(a, b)


def test_sampled_threshold_selects_about_q_and_mostly_the_same_weights():
    keras.utils.set_random_seed(0)
    model = tfs.zoo.mnist1d_mlp(hidden=(512, 256))  # 154k pool weights: sampled, not whole
    variables = model.trainable_variables
    x = np.random.default_rng(0).normal(size=(256, 40)).astype("float32")
    y = np.arange(256) % 10
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, variables)
    opt = GlobalSparseMomentum(0.01, compression=10, threshold_method="sample")
    opt.build(variables)
    threshold = [t for t in opt._global_masks(list(grads), variables) if t is not None][0]
    scores = np.concatenate([np.abs(v.numpy() * g.numpy()).ravel()
                             for v, g in zip(variables, grads) if len(v.shape) >= 2])
    exact = np.sort(scores)[-opt.q]
    kept = int((scores >= float(threshold)).sum())
    assert abs(kept - opt.q) < 0.05 * opt.q, (kept, opt.q)
    assert abs(float(threshold) - exact) < 0.05 * exact


def test_magnitude_metric_and_ramp():
    model = tiny_model()
    variables = model.trainable_variables
    opt = GlobalSparseMomentum(0.0, momentum=0.0, weight_decay=0.0, compression=4, ramp_steps=4,
                               metric="magnitude", count_every=1)
    totals = []
    for _ in range(6):
        opt.apply([tf.ones_like(v) for v in variables], variables)
        totals.append(sum(opt.active_counts_by_name().values()))
    # Dense at step 0, then a cubic ramp down to Q = 5 at step 4, held after.
    assert totals[0] == 20 and totals[4:] == [5, 5]
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    # magnitude: the kept entries are the largest |w| (weights did not move: lr 0).
    kernels = [v.numpy() for v in variables if len(v.shape) == 2]
    top5 = np.sort(np.concatenate([np.abs(k).ravel() for k in kernels]))[-5:]
    final_prune(variables, compression=4)
    kept = np.concatenate([np.abs(v.numpy()).ravel() for v in variables if len(v.shape) == 2])
    np.testing.assert_allclose(np.sort(kept[kept > 0]), top5)


@pytest.mark.slow
def test_jit_compiled_step_falls_back_to_exact(mnist1d_data):
    (x, y), _ = mnist1d_data
    model = small_cnn()
    opt = GlobalSparseMomentum(0.01, compression=10)  # histogram: not XLA-compilable
    variables = model.trainable_variables

    @tf.function(jit_compile=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model(xb, training=True))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    step(x[:64], y[:64])
    assert sum(opt.active_counts_by_name().values()) == opt.q


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(compression=1), "`compression` must be a number > 1"),
    (dict(compression=0.5), "`compression` must be a number > 1"),
    (dict(compression="10"), "`compression` must be a number > 1"),
    (dict(sparsity=0), r"`sparsity` must be a number in \(0, 1\)"),
    (dict(sparsity=1.0), r"`sparsity` must be a number in \(0, 1\)"),
    (dict(sparsity=-0.1), r"`sparsity` must be a number in \(0, 1\)"),
    (dict(), "exactly one of `compression`"),
    (dict(compression=10, sparsity=0.9), "exactly one of `compression`"),
    (dict(compression=10, momentum=1.0), r"`momentum` must be a number in \[0, 1\)"),
    (dict(compression=10, momentum=-0.5), r"`momentum` must be a number in \[0, 1\)"),
    (dict(compression=10, weight_decay=-1e-4), "`weight_decay` must be a number >= 0"),
    (dict(compression=10, threshold_method="fast"), "`threshold_method`"),
    (dict(compression=10, metric="snip"), "`metric`"),
    (dict(compression=10, ramp_steps=-1), "`ramp_steps`"),
    (dict(compression=10, pool=3), "`pool` must be None"),
    (dict(compression=10, count_every=0), "`count_every`"),
    (dict(compression=10, decay_scope="bias"), "`decay_scope`"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalSparseMomentum(0.01, **kwargs)


def test_bad_pools_raise_at_build():
    model = tiny_model()
    variables = model.trainable_variables
    with pytest.raises(ValueError, match="`pool`: no variable"):
        GlobalSparseMomentum(0.01, compression=10, pool=lambda v: False).build(variables)
    biases_only = [v for v in variables if len(v.shape) < 2]
    with pytest.raises(ValueError, match="`pool`: no variable"):
        GlobalSparseMomentum(0.01, compression=10).build(biases_only)
    # Pool of 20 entries: compression 1.01 keeps round(19.8) = 20 -> nothing pruned.
    with pytest.raises(ValueError, match="nothing would be pruned"):
        GlobalSparseMomentum(0.01, compression=1.01).build(variables)
    with pytest.raises(ValueError, match="nothing would be pruned"):
        GlobalSparseMomentum(0.01, sparsity=0.01).build(variables)
    with pytest.raises(ValueError, match="at least one weight"):
        GlobalSparseMomentum(0.01, compression=100).build(variables)
    with pytest.raises(ValueError, match="not built"):
        GlobalSparseMomentum(0.01, compression=10).final_prune()
    with pytest.raises(TypeError, match="`model_or_vars`"):
        final_prune("model", compression=10)


# -------------------------------------------------------- serialization
def test_config_round_trip():
    schedule = keras.optimizers.schedules.CosineDecay(0.02, 100)
    opt = GlobalSparseMomentum(schedule, momentum=0.95, nesterov=True, weight_decay=1e-3,
                               sparsity=0.9, threshold_method="exact", metric="magnitude",
                               ramp_steps=50, pool=[r"/kernel$"], count_every=3, clipnorm=1.0,
                               decay_scope="all")
    config = opt.get_config()
    assert config["decay_scope"] == "all" and GlobalSparseMomentum(0.1, compression=2).decay_scope == "kernels"
    assert config["weight_decay"] == 1e-3 and opt.weight_decay is None  # coupled L2 lives in `l2`
    clone = GlobalSparseMomentum.from_config(config)
    assert clone.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, GlobalSparseMomentum) and restored.get_config() == config
    config = keras.saving.serialize_keras_object(GSMMonitor(every_n_steps=5))
    monitor = keras.saving.deserialize_keras_object(config)
    assert isinstance(monitor, GSMMonitor) and monitor.every_n_steps == 5


@pytest.mark.slow
def test_resume_from_keras_file_continues_the_same_trajectory(mnist1d_data, tmp_path):
    (x, y), _ = mnist1d_data
    x, y = x[:1024], y[:1024]

    def fresh():
        keras.utils.set_random_seed(7)
        model = small_cnn()
        schedule = keras.optimizers.schedules.CosineDecay(0.01, 32)
        model.compile(GlobalSparseMomentum(schedule, nesterov=True, compression=20, ramp_steps=12,
                                           pool=r"^(conv\d|fc1)/kernel$"), LOSS)
        return model

    straight = fresh()
    straight.fit(x, y, epochs=4, batch_size=128, shuffle=False, verbose=0)
    first = fresh()
    first.fit(x, y, epochs=2, batch_size=128, shuffle=False, verbose=0)
    path = tmp_path / "gsm.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed.optimizer, GlobalSparseMomentum)
    assert resumed.optimizer.get_config() == first.optimizer.get_config()
    assert int(resumed.optimizer.iterations.numpy()) == 16
    resumed.fit(x, y, epochs=4, initial_epoch=2, batch_size=128, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations.numpy()) == int(straight.optimizer.iterations.numpy()) == 32
    assert_same_state(straight, resumed, optimizer=True)
    # Only the four matched kernels are in the pool; logits trained densely.
    assert set(straight.optimizer.active_counts_by_name()) == {"conv1", "conv2", "conv3", "fc1"}
    assert sum(straight.optimizer.active_counts_by_name().values()) == straight.optimizer.q


# --------------------------------------------------------- distribution
@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(mnist1d_data, mirrored_strategy):
    (x, y), _ = mnist1d_data

    def build():
        keras.utils.set_random_seed(3)
        model = small_cnn()
        model.compile(GlobalSparseMomentum(0.01, momentum=0.9, nesterov=True, compression=10), LOSS)
        return model

    single, mirrored = fit_single_and_mirrored(build, mirrored_strategy, x[:256], y[:256])
    assert_same_state(single, mirrored, atol=1e-5)
    # Every replica applied the same global mask (its size per layer agrees
    # on both replicas and with the single-device run).
    assert mirrored.optimizer.active_counts_by_name() == single.optimizer.active_counts_by_name()
    for count in mirrored.optimizer.active_counts:
        per_replica = [int(c.numpy()) for c in count.value.values]
        assert len(per_replica) == 2 and per_replica[0] == per_replica[1]
    final_prune(mirrored)
    assert pool_nonzeros(mirrored) == mirrored.optimizer.q


@pytest.mark.slow
def test_mixed_float16_with_loss_scaling(mnist1d_data):
    (x, y), _ = mnist1d_data
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = small_cnn()
    opt = GlobalSparseMomentum(0.01, compression=10)
    model.compile(opt, LOSS)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x[:1024], y[:1024], epochs=2, batch_size=128, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert sum(opt.active_counts_by_name().values()) == opt.q
    final_prune(model)  # finds the GSM inside the LossScaleOptimizer
    assert pool_nonzeros(model) == opt.q


@pytest.mark.slow
def test_monitor_warns_about_double_l2_and_traces(mnist1d_data):
    (x, y), _ = mnist1d_data
    model = tfs.zoo.mnist1d_cnn(filters=8, hidden=16, weight_decay=5e-4)  # kernel_regularizer set
    model.compile(GlobalSparseMomentum(0.01, compression=5), LOSS)
    monitor = GSMMonitor(every_n_steps=2)
    with pytest.warns(RuntimeWarning, match="counted twice"):
        model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0, callbacks=[monitor])
    assert [step for step, _ in monitor.trace] == [2, 4]
    assert set(monitor.trace[0][1]) == {"conv1", "conv2", "conv3", "fc1", "logits"}
    plain = tfs.zoo.mnist1d_cnn(filters=8, hidden=16)
    plain.compile(keras.optimizers.SGD(0.01), LOSS)
    with pytest.raises(ValueError, match="GSMMonitor needs"):
        plain.fit(x[:64], y[:64], epochs=1, verbose=0, callbacks=[GSMMonitor()])
