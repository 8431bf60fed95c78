"""SoftThreshold on every prunable layer type: math, gradients, strip, save/load."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from support import random_like

L = keras.layers

# (layer factory, input shape without batch)
CASES = {
    "Dense": (lambda: L.Dense(6), (5,)),
    "EinsumDense": (lambda: L.EinsumDense("ab,bc->ac", output_shape=6, bias_axes="c"), (5,)),
    "Conv1D": (lambda: L.Conv1D(4, 3), (9, 3)),
    "Conv2D": (lambda: L.Conv2D(4, 3), (7, 7, 3)),
    "Conv3D": (lambda: L.Conv3D(2, 2), (4, 4, 4, 2)),
    "DepthwiseConv1D": (lambda: L.DepthwiseConv1D(3, depth_multiplier=2), (9, 3)),
    "DepthwiseConv2D": (lambda: L.DepthwiseConv2D(3), (7, 7, 3)),
    "SeparableConv1D": (lambda: L.SeparableConv1D(4, 3), (9, 3)),
    "SeparableConv2D": (lambda: L.SeparableConv2D(4, 3), (7, 7, 3)),
    "Conv1DTranspose": (lambda: L.Conv1DTranspose(4, 3, strides=2), (5, 3)),
    "Conv2DTranspose": (lambda: L.Conv2DTranspose(4, 3, strides=2), (4, 4, 3)),
    "Conv3DTranspose": (lambda: L.Conv3DTranspose(2, 2), (3, 3, 3, 2)),
    "Embedding": (lambda: L.Embedding(20, 4), None),
}


def make_model(name):
    factory, shape = CASES[name]
    if shape is None:
        inputs = keras.Input((7,), dtype="int32")
        data = np.random.default_rng(0).integers(0, 20, size=(4, 7)).astype("int32")
    else:
        inputs = keras.Input(shape)
        data = random_like((4, *shape))
    model = keras.Model(inputs, factory()(inputs))
    # Known weight scale (std 0.1) so a 0.047 threshold prunes about a third.
    for i, kernel in enumerate(tfs.prunable.prunable_kernels(model.layers[1])):
        kernel.assign(0.1 * random_like(kernel.shape, seed=i + 1))
    return model, data


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_baked_soft_threshold(name):
    model, data = make_model(name)
    sparse = tfs.soft_threshold(model, s_init=-3.0)  # threshold 0.047: some zeros
    wrapper = sparse.layers[1]
    assert isinstance(wrapper, tfs.layers.SoftThreshold)
    threshold = 1 / (1 + np.exp(3.0))
    # Reference: the original layer with every prunable kernel soft-thresholded by hand.
    reference = model.layers[1]
    for kernel in tfs.prunable.prunable_kernels(reference):
        w = kernel.numpy()
        kernel.assign(np.sign(w) * np.maximum(np.abs(w) - threshold, 0))
    np.testing.assert_allclose(sparse(data), model(data), rtol=1e-5, atol=1e-6)
    assert 0 < tfs.sparsity(sparse) < 1
    # strip: same class as the original, exact zeros, same outputs.
    plain = tfs.strip(sparse)
    assert type(plain.layers[1]) is type(model.layers[1])
    np.testing.assert_array_equal(plain(data), sparse(data))
    assert tfs.sparsity(plain) == pytest.approx(tfs.sparsity(sparse))


@pytest.mark.parametrize("name", ["Dense", "Conv2D", "SeparableConv2D", "Embedding"])
def test_save_load_round_trip(name, tmp_path):
    model, data = make_model(name)
    sparse = tfs.soft_threshold(model, s_init=-2.0, weight_decay=1e-3, threshold_fn="exponential")
    path = tmp_path / "m.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(data), sparse(data))
    wrapper = loaded.layers[1]
    assert isinstance(wrapper, tfs.layers.SoftThreshold)
    assert (wrapper.s_init, wrapper.weight_decay) == (-2.0, 1e-3)


def test_gradients_pruned_weights_get_none_but_decay_and_threshold_do():
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.Dense(3, use_bias=False)(inputs))
    sparse = tfs.soft_threshold(model, s_init=-1.0, weight_decay=0.1)
    wrapper = sparse.layers[1]
    kernel = wrapper.layer.kernel
    x = random_like((8, 5))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(sparse(x) ** 2)
    grads = dict(zip([v.path for v in sparse.trainable_variables],
                     tape.gradient(loss, sparse.trainable_variables)))
    pruned = np.abs(kernel.numpy()) <= wrapper.threshold_value()
    assert pruned.any() and (~pruned).any()
    assert np.all(grads[kernel.path].numpy()[pruned] == 0)  # no loss gradient
    assert np.all(grads[kernel.path].numpy()[~pruned] != 0)
    assert grads[wrapper.threshold_logit.path].numpy() != 0
    # Coupled L2: the decay term is in the losses and reaches every weight.
    with tf.GradientTape() as tape:
        sparse(x)
        decay = tf.add_n(sparse.losses)
    w = kernel.numpy()
    s = wrapper.threshold_logit.numpy()
    np.testing.assert_allclose(decay, 0.05 * (np.sum(w ** 2) + s ** 2), rtol=1e-5)
    decay_grad = tape.gradient(decay, kernel)
    np.testing.assert_allclose(decay_grad, 0.1 * w, rtol=1e-5)


def test_wrap_single_layer_in_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = tfs.layers.SoftThreshold(L.Dense(8, activation="relu"), s_init=-2.0)
            self.out = L.Dense(2)

        def call(self, x):
            return self.out(self.hidden(x))

    net = Net()
    x = random_like((4, 6))
    y = net(x)
    assert y.shape == (4, 2)
    report = tfs.summary(net, print_fn=None)
    assert [r.name for r in report.layers if r.threshold is not None] == [net.hidden.layer.name]
    plain_hidden = tfs.strip(net.hidden)
    np.testing.assert_allclose(plain_hidden(x), net.hidden(x), atol=1e-6)


def test_wrapper_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`layer`.*no prunable kernel"):
        tfs.layers.SoftThreshold(L.BatchNormalization())
    with pytest.raises(TypeError, match="`layer` must be a Keras layer"):
        tfs.layers.SoftThreshold("dense")
    with pytest.raises(ValueError, match="`s_init`"):
        tfs.layers.SoftThreshold(L.Dense(2), s_init=float("nan"))
    with pytest.raises(ValueError, match="`weight_decay`"):
        tfs.layers.SoftThreshold(L.Dense(2), weight_decay=-1)
    with pytest.raises(ValueError, match="`threshold_fn`"):
        tfs.layers.SoftThreshold(L.Dense(2), threshold_fn="tanhh")


def test_mixed_float16_threshold_math_stays_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.Dense(4)(inputs))
    sparse = tfs.soft_threshold(model, s_init=-1.5, weight_decay=1e-3)
    wrapper = sparse.layers[1]
    assert wrapper.threshold_logit.dtype == "float32"
    assert wrapper.effective_kernels()[0].dtype == "float32"
    x = random_like((3, 6))
    assert sparse(x).dtype == "float16"
    np.testing.assert_allclose(np.asarray(tfs.strip(sparse)(x), "float32"),
                               np.asarray(sparse(x), "float32"), atol=1e-3)
