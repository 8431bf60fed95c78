"""soft_threshold / strip / summary at model level, and bad input."""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
from support import random_like

L = keras.layers


def functional_net():
    inputs = keras.Input((12, 3))
    x = L.Conv1D(8, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    shared = L.Dense(8, name="shared")
    a = shared(x)
    b = shared(L.Lambda(lambda t: t * 0.5)(x))
    x = L.Add()([a, b])
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x), name="functional_net")


def nested_net():
    block = keras.Sequential([keras.Input((6,)), L.Dense(6, name="inner1"), L.Dense(6, name="inner2")], name="block")
    inputs = keras.Input((6,))
    x = block(inputs)
    return keras.Model(inputs, L.Dense(2, name="out")(x), name="outer")


def test_functional_with_bn_and_shared_layer():
    model = functional_net()
    x = random_like((5, 12, 3))
    sparse = tfs.soft_threshold(model, s_init=-2.0)
    kinds = {l.name: type(l).__name__ for l in sparse.layers}
    assert kinds["str_conv"] == kinds["str_shared"] == kinds["str_head"] == "SoftThreshold"
    assert kinds["bn"] == "BatchNormalization"  # never thresholded
    # The shared Dense stays one layer (one wrapper, one threshold).
    assert len(tfs.surgery.wrappers(sparse)) == 3
    # The original is untouched.
    assert all(type(l).__name__ != "SoftThreshold" for l in model.layers)
    plain = tfs.strip(sparse)
    np.testing.assert_allclose(plain(x), sparse(x), atol=1e-6)
    assert [type(l) for l in plain.layers] == [type(l) for l in model.layers]


def test_nested_model_is_wrapped_recursively():
    model = nested_net()
    sparse = tfs.soft_threshold(model, skip=["out"])
    names = {w.layer.name for w in tfs.surgery.wrappers(sparse)}
    assert names == {"inner1", "inner2"}
    x = random_like((3, 6))
    np.testing.assert_allclose(tfs.strip(sparse)(x), sparse(x), atol=1e-6)


def test_skip_everything_raises():
    model = keras.Sequential([keras.Input((10,)), L.Dense(8), L.Dense(3)])
    with pytest.raises(ValueError, match="no prunable layer left after `skip`"):
        tfs.soft_threshold(model, skip=L.Dense)
    sparse = tfs.soft_threshold(model, skip=lambda layer: layer.units == 3)
    assert [type(l).__name__ for l in sparse.layers] == ["SoftThreshold", "Dense"]


@pytest.mark.parametrize(
    "model, kwargs, error, pattern",
    [
        (lambda: keras.Sequential([keras.Input((3,)), L.BatchNormalization()]), {}, ValueError, "no prunable layer"),
        (lambda: keras.Sequential([keras.Input((3,)), L.Dense(2)]), {"skip": ["dens"]}, ValueError, "unknown layer 'dens'"),
        (lambda: "model.keras", {}, TypeError, "`model` must be a Keras 3"),
        (lambda: keras.Sequential([L.Dense(2)]), {}, ValueError, "must be built"),
        (lambda: keras.Sequential([keras.Input((3,)), L.Dense(2)]), {"skip": [3]}, TypeError, "`skip`"),
    ],
)
def test_bad_input(model, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tfs.soft_threshold(model(), **kwargs)


def test_subclassed_model_is_wrapped_whole():
    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    x = np.ones((1, 3), "float32")
    net(x)
    sparse = tfs.soft_threshold(net, s_init=-50.0)
    assert [type(l).__name__ for l in sparse.layers] == ["InputLayer", "SoftThreshold"]
    np.testing.assert_allclose(sparse(x), net(x), atol=1e-6)
    with pytest.raises(ValueError, match="must be built"):
        tfs.soft_threshold(Net())

    class NoConfig(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    bare = NoConfig()
    bare(x)
    with pytest.raises(TypeError, match="cannot be re-created from its config"):
        tfs.soft_threshold(bare)


def test_summary_counts_params_nonzeros_and_flops_exactly():
    inputs = keras.Input((16, 2))
    x = L.Conv1D(4, 3, padding="same", name="conv")(inputs)  # 16 positions
    x = L.Flatten()(x)
    outputs = L.Dense(5, name="fc")(x)
    model = keras.Model(inputs, outputs)
    conv, fc = model.get_layer("conv"), model.get_layer("fc")
    k = conv.kernel.numpy()
    k[0] = 0  # 8 of 24 zero
    conv.kernel.assign(k)
    w = fc.kernel.numpy()
    w[:10] = 0  # 50 of 320 zero
    fc.kernel.assign(w)
    report = tfs.summary(model, print_fn=None)
    rows = {r.name: r for r in report.layers}
    assert (rows["conv"].params, rows["conv"].prunable, rows["conv"].nonzeros) == (28, 24, 16)
    assert (rows["conv"].flops, rows["conv"].effective_flops) == (24 * 16, 16 * 16)
    assert (rows["fc"].params, rows["fc"].nonzeros) == (325, 270)
    assert (rows["fc"].flops, rows["fc"].effective_flops) == (320, 270)
    assert report.sparsity == pytest.approx(58 / 344)
    assert report.bytes == (28 + 325) * 4
    text = str(report)
    assert "conv" in text and "fc" in text and "total" in text
    assert report.to_dict()["layers"][0]["sparsity"] == pytest.approx(8 / 24)
    assert tfs.sparsity(model) == pytest.approx(58 / 344)


def test_summary_marks_collapse_and_threshold():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")])
    sparse = tfs.soft_threshold(model, s_init=10.0)  # threshold ~1: everything pruned
    report = tfs.summary(sparse, print_fn=None)
    assert report.collapsed == ["d"]
    assert report.layers[0].threshold == pytest.approx(1 / (1 + np.exp(-10.0)), rel=1e-6)
    assert "COLLAPSED" in str(report)


def test_summary_rejects_non_keras():
    with pytest.raises(TypeError, match="`model`"):
        tfs.summary(object())
