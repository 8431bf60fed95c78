"""Channel-STR over channel groups: unit factors once per forward pass, the MACs target."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from tf_sparsity import steering
from support import random_like


def _grouped(net, shrink):
    keras.utils.set_random_seed(0)
    sparse = tfs.soft_threshold(getattr(tfs.zoo, net)(), granularity="channel", learn_threshold=False,
                                shrink=shrink, s_init=-4.0)
    offset, _ = steering.solve_threshold_offset(steering.steerables(sparse), 0.4)
    for w in steering.steerables(sparse):
        w.threshold_offset.assign(offset)
    return sparse


@pytest.mark.slow
@pytest.mark.parametrize("net,shrink", [("mnist1d_resnet", True), ("mnist1d_mobilenet", False)])
def test_factors_once_per_pass_equal_the_per_wrapper_ones(net, shrink):
    sparse = _grouped(net, shrink)
    # The same layers run by a plain functional model: each wrapper computes its own units' factors.
    per_wrapper = keras.Model(sparse.inputs, sparse.outputs)
    x = random_like((8, 40, 1), seed=2)
    y = np.arange(8) % 10
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def outputs_and_grads(model):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            value = loss(y, out)
        return np.asarray(out), [np.asarray(g) for g in tape.gradient(value, model.trainable_variables)]

    out, grads = outputs_and_grads(sparse)
    out_old, grads_old = outputs_and_grads(per_wrapper)
    np.testing.assert_allclose(out, out_old, atol=1e-5)
    assert len(grads) == len(grads_old)
    for g, g_old in zip(grads, grads_old):
        np.testing.assert_allclose(g, g_old, atol=1e-5, rtol=1e-4)
    # Graph mode (what fit runs) too, and the factors are gone after the pass.
    np.testing.assert_allclose(np.asarray(tf.function(sparse)(x)), np.asarray(per_wrapper(x)), atol=1e-5)
    assert sparse.channel_coupling._current is None
    coupling = sparse.channel_coupling
    factors = np.asarray(coupling.unit_factors(shrink))
    assert factors.shape == (coupling.num_units + 1,) and factors[-1] == 1.0
    assert 0 < np.mean(factors[:-1] == 0) < 1


@pytest.mark.slow
def test_factors_once_per_pass_round_trip(tmp_path):
    sparse = _grouped("mnist1d_resnet", False)
    path = tmp_path / "grouped.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    x = random_like((4, 40, 1), seed=3)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(sparse(x, training=False)))
    np.testing.assert_allclose(np.asarray(tfs.strip(loaded)(x, training=False)),
                               np.asarray(sparse(x, training=False)), atol=1e-5)


def _macs_fraction(small, model):
    return tfs.summary(small, print_fn=None).flops / tfs.summary(model, print_fn=None).flops


def _fit_to_flops(model, x, y, flops, epochs=1, batch_size=32, run_eagerly=False):
    sparse = tfs.soft_threshold(model, granularity="channel", learn_threshold=False, shrink=False,
                                weight_decay=5e-4)
    sparse.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=run_eagerly)
    steps = epochs * int(np.ceil(len(x) / batch_size))
    steer = tfs.callbacks.TargetFlops(flops, end_step=steps - 1, update_every=2)
    sparse.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[steer])
    return sparse, steer


@pytest.mark.slow
@pytest.mark.parametrize("flops", [0.5, 0.3])
def test_target_flops_strips_to_the_macs_budget_exactly(flops, mnist1d_data):
    (x, y), _ = mnist1d_data
    keras.utils.set_random_seed(0)
    model = tfs.zoo.mnist1d_resnet()
    sparse, steer = _fit_to_flops(model, x[:256], y[:256], flops)
    small = tfs.strip(sparse)
    assert abs(_macs_fraction(small, model) - flops) <= 0.02, _macs_fraction(small, model)
    assert abs(steer.flops_reached - _macs_fraction(small, model)) < 1e-6  # the count is the strip's
    assert small.count_params() < model.count_params()
    np.testing.assert_allclose(np.asarray(small(x[:64], training=False)),
                               np.asarray(sparse(x[:64], training=False)), atol=1e-5)


@pytest.mark.slow
def test_target_flops_on_efficientnet_b0():
    keras.utils.set_random_seed(0)
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10,
                                              classifier_activation=None)
    x, y = random_like((64, 32, 32, 3), seed=1), np.arange(64) % 10
    # Eager: four steps run faster than tracing EfficientNetB0's train step (46 s); the traced
    # step is covered on the zoo nets above.
    sparse, steer = _fit_to_flops(model, x, y, 0.5, batch_size=16, run_eagerly=True)
    small = tfs.strip(sparse)
    assert abs(_macs_fraction(small, model) - 0.5) <= 0.02, _macs_fraction(small, model)
    assert small.count_params() < model.count_params()
    np.testing.assert_allclose(np.asarray(small(x[:4], training=False)),
                               np.asarray(sparse(x[:4], training=False)), atol=1e-5)


def test_target_flops_round_trip_and_bad_input():
    steer = tfs.callbacks.TargetFlops(0.4, end_step=10, update_every=3)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(steer))
    assert isinstance(again, tfs.callbacks.TargetFlops) and again.get_config() == steer.get_config()
    for bad in (0, 1.0, 1.5, "half", True):
        with pytest.raises(ValueError, match="`flops` must be the fraction of the dense MACs"):
            tfs.callbacks.TargetFlops(bad)
    plain = tfs.soft_threshold(keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)]))
    plain.compile("sgd", "mse")
    with pytest.raises(ValueError, match="TargetFlops steers channel-STR over channel groups"):
        plain.fit(np.zeros((4, 4)), np.zeros((4, 2)), verbose=0, callbacks=[tfs.callbacks.TargetFlops(0.5, end_step=1)])
