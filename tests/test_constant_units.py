"""tfs.surgery.fold_constant_units: units constant on the data, folded into a bias, exactly."""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs

fold = tfs.surgery.fold_constant_units


def _set(layer, kernel=None, bias=None):
    weights = layer.get_weights()
    if kernel is not None:
        weights[0] = kernel(weights[0])
    if bias is not None:
        weights[1] = bias(weights[1])
    layer.set_weights(weights)


def _same(a, b, x):
    return float(np.max(np.abs(a.predict(x, verbose=0) - b.predict(x, verbose=0))))


def dense_se(seed=0):
    """Dense squeeze-excite: reduce (relu) -> expand (sigmoid) scales the features, a Dense head."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12,))
    f = keras.layers.Dense(16, activation="relu", name="features")(inp)
    s = keras.layers.Dense(6, activation="relu", name="reduce")(f)
    s = keras.layers.Dense(16, activation="sigmoid", name="expand")(s)
    out = keras.layers.Dense(3, name="head")(keras.layers.Multiply()([f, s]))
    model = keras.Model(inp, out)
    x = np.random.default_rng(seed).normal(size=(128, 12)).astype("float32")
    return model, x


def test_dead_and_constant_units_of_a_dense_se_path_fold_exactly():
    model, x = dense_se()
    reduce = model.get_layer("reduce")
    # unit 1 never fires (0); unit 4 reads nothing and sits at relu(0.7) = 0.7, a nonzero constant
    _set(reduce, kernel=lambda k: k * np.array([1, 1, 1, 1, 0, 1.0], "float32"),
         bias=lambda b: b + np.array([0, -100, 0, 0, 0.7, 0], "float32"))
    before = [w.copy() for w in model.get_weights()]
    small, report = fold(model, x)
    assert {(r["group"], r["unit"], r["action"]) for r in report} == {("reduce", 1, "removed"), ("reduce", 4, "removed")}
    assert next(r["constant"] for r in report if r["unit"] == 4) == pytest.approx(0.7)
    assert small.get_layer("reduce").units == 4 and small.get_layer("expand").units == 16
    assert _same(small, model, x) < 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the input model is untouched
    # nothing constant left: the model comes back as it is
    again, report = fold(small, x)
    assert again is small and report == []


def test_a_nonzero_constant_folds_exactly_into_a_1x1_conv_without_bias():
    keras.utils.set_random_seed(1)
    inp = keras.Input((10, 3))
    h = keras.layers.Conv1D(8, 3, padding="same", activation="relu", name="h")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Conv1D(5, 1, use_bias=False, name="pointwise")(h)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(out)))
    bn = model.get_layer("bn")
    bn.set_weights([np.linspace(0.5, 2, 8).astype("float32"), np.linspace(-1, 1, 8).astype("float32"),
                    np.linspace(0, 0.3, 8).astype("float32"), np.linspace(0.5, 1.5, 8).astype("float32")])
    _set(model.get_layer("h"), kernel=lambda k: k * (np.arange(8) != 2), bias=lambda b: b + (np.arange(8) == 2) * 1.5)
    x = np.random.default_rng(1).normal(size=(64, 10, 3)).astype("float32")
    small, report = fold(model, x)
    assert [(r["group"], r["unit"], r["action"]) for r in report] == [("h", 2, "removed")]
    assert report[0]["constant"] != 0 and report[0]["consumers"] == ["pointwise"]
    assert small.get_layer("h").filters == 7 and small.get_layer("pointwise").use_bias  # a bias was created
    assert _same(small, model, x) < 1e-5


def same_conv_model(bias):
    keras.utils.set_random_seed(2)
    inp = keras.Input((12, 2))
    h = keras.layers.Conv1D(6, 1, activation="relu", name="h")(inp)
    out = keras.layers.Conv1D(4, 3, padding="same", name="spatial")(h)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(out)))
    _set(model.get_layer("h"), kernel=lambda k: k * (np.arange(6) != 3), bias=lambda b: b + (np.arange(6) == 3) * bias)
    return model, np.random.default_rng(2).normal(size=(64, 12, 2)).astype("float32")


def test_a_nonzero_constant_before_a_same_padded_3x3_conv_is_not_folded_but_a_zero_is():
    model, x = same_conv_model(bias=0.9)  # relu(0.9): a 0.9 everywhere, but the border reads padding zeros
    small, report = fold(model, x)
    assert small is model
    assert [(r["unit"], r["action"]) for r in report] == [(3, "not folded")]
    assert "padding='same'" in report[0]["reason"]
    model, x = same_conv_model(bias=-5.0)  # relu(-5) = 0: exact anywhere
    small, report = fold(model, x)
    assert [(r["unit"], r["action"]) for r in report] == [(3, "removed")]
    assert small.get_layer("h").filters == 5 and _same(small, model, x) < 1e-5


def test_a_group_never_empties_its_last_unit_stays_unread_and_varying():
    model, x = dense_se(seed=3)
    _set(model.get_layer("reduce"), bias=lambda b: b - 100.0)  # the whole squeeze-excite branch is constant
    small, report = fold(model, x)
    assert sorted(r["action"] for r in report) == ["kept"] + ["removed"] * 5
    kept = next(r for r in report if r["action"] == "kept")
    assert kept["varies"] and "last unit" in kept["reason"]
    assert small.get_layer("reduce").units == 1
    assert not np.any(small.get_layer("expand").kernel.numpy())  # nobody reads the kept unit
    assert _same(small, model, x) < 1e-5
    h = keras.Model(small.inputs, small.get_layer("reduce").output).predict(x, verbose=0)
    assert np.ptp(h) > 0 and np.mean(h > 0) > 0.3  # it fires on the data: an int8 range that is not a point


def test_whole_tensors_only_folds_units_whose_consumer_input_is_constant():
    model, x = dense_se(seed=4)
    _set(model.get_layer("reduce"), bias=lambda b: b + np.array([0, -100, 0, 0, 0, 0], "float32"))
    small, report = fold(model, x, whole_tensors=True)  # the other 5 units vary: the tensor's range is fine
    assert small is model and report == []
    assert [r["unit"] for r in fold(model, x)[1]] == [1]


def test_bad_arguments_are_named():
    model, x = dense_se()
    with pytest.raises(ValueError, match="`x` for input"):
        fold(model, x[:, :5])
    with pytest.raises(ValueError, match="`tolerance`"):
        fold(model, x, tolerance=-1)
    with pytest.raises(ValueError, match="tfs.strip"):
        fold(tfs.soft_threshold(model), x)
