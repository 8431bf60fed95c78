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


def test_factors_once_per_pass_round_trip(tmp_path):
    sparse = _grouped("mnist1d_resnet", False)
    path = tmp_path / "grouped.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    x = random_like((4, 40, 1), seed=3)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(sparse(x, training=False)))
    np.testing.assert_allclose(np.asarray(tfs.strip(loaded)(x, training=False)),
                               np.asarray(sparse(x, training=False)), atol=1e-5)
