"""Every Keras 3 model: operation nodes, layers inside layers, subclassed models.

Each model goes through the chain a user runs: wrap / prune -> train ->
strip (outputs equal) -> `.keras` round trip (identical) -> LiteRT.
"""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
from support import assert_same_state, compile_sgd, fit_single_and_mirrored, random_like


@keras.saving.register_keras_serializable(package="tests")
class TwoDense(keras.layers.Layer):
    """A custom layer that owns two Dense sublayers (created in `__init__`)."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="relu")
        self.outer = keras.layers.Dense(units)

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.outer.build(tuple(input_shape)[:-1] + (self.units,))

    def call(self, x):
        return x[..., : self.units] + self.outer(self.inner(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="tests")
class SubclassedNet(keras.Model):
    def __init__(self, hidden=16, classes=4, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.classes = hidden, classes
        self.conv = keras.layers.Conv1D(8, 3, activation="relu")
        self.pool = keras.layers.GlobalAveragePooling1D()
        self.dense = keras.layers.Dense(hidden)
        self.head = keras.layers.Dense(classes)

    def call(self, x):
        h = self.pool(self.conv(x))
        return self.head(keras.ops.tanh(self.dense(h)) * 2.0)

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "classes": self.classes}


def operators():
    i = keras.Input((12, 1))
    h = keras.layers.Conv1D(8, 3, padding="same")(i)
    h = keras.ops.tanh(h) + h[..., :1] * 0.5           # keras.ops call, slicing, operators
    h = keras.layers.Flatten()(h)
    o = keras.layers.Dense(4)(keras.ops.relu(keras.layers.Dense(16)(h)) - 0.1)
    return keras.Model(i, o, name="operators")


def attention():
    i = keras.Input((12, 1))
    h = keras.layers.Dense(8)(i)
    a = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    f = keras.layers.Dense(8)(keras.activations.gelu(keras.layers.Dense(16)(h)))
    h = keras.layers.LayerNormalization()(h + f)
    return keras.Model(i, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h)), name="attention")


def owners():
    i = keras.Input((12, 1))
    h = keras.layers.TimeDistributed(keras.layers.Dense(16))(i)
    h = TwoDense(8, name="two_dense")(h)
    return keras.Model(i, keras.layers.Dense(4)(keras.layers.Flatten()(h)), name="owners")


def subclassed():
    model = SubclassedNet(name="subclassed")
    model(np.zeros((1, 12, 1), "float32"))
    return model


BUILDERS = {"operators": operators, "attention": attention, "owners": owners, "subclassed": subclassed}
X = random_like((64, 12, 1), seed=1)
Y = np.random.default_rng(0).integers(0, 4, 64)


def _kernels_inside(model):
    """Every prunable kernel of `model`, wherever it lives; wrapped ones through their wrapper."""
    layers = tfs.prunable.iter_layers(model)
    return ([k for w in tfs.surgery.wrappers(model) for k in w.kernels]
            + [k for l in layers if tfs.prunable.is_prunable(l) for k in tfs.prunable.prunable_kernels(l)])


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_str_reaches_every_kernel_and_round_trips(kind, tmp_path):
    keras.utils.set_random_seed(0)
    base = BUILDERS[kind]()
    n_kernels = sum(1 for l in base._flatten_layers() if tfs.prunable._leaf_kernel_names(l)
                    for _ in tfs.prunable._leaf_kernel_names(l))
    sparse = tfs.soft_threshold(base, s_init=-5.0, learn_threshold=False, shrink=False)
    assert len(tfs.surgery.wrappers(sparse)) and len(_kernels_inside(sparse)) == n_kernels
    assert all(tfs.prunable.is_prunable(l) is False for l in tfs.prunable.iter_layers(sparse))  # none left dense
    compile_sgd(sparse, lr=0.01)
    sparse.fit(X, Y, epochs=1, batch_size=32, verbose=0,
               callbacks=[tfs.callbacks.TargetSparsity(0.8, end_step=1, update_every=1)])
    assert tfs.sparsity(sparse) == pytest.approx(0.8, abs=0.02)
    expected = sparse.predict(X, verbose=0)

    plain = tfs.strip(sparse)
    np.testing.assert_allclose(plain.predict(X, verbose=0), expected, atol=1e-5)
    assert tfs.sparsity(plain) == pytest.approx(0.8, abs=0.02)
    for model, name in ((sparse, "wrapped"), (plain, "plain")):
        path = tmp_path / f"{name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    tfs.summary(plain, print_fn=lambda *a, **k: None)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_export_litert_float_matches_keras(kind, tmp_path):
    plain = tfs.strip(tfs.soft_threshold(BUILDERS[kind]()))
    result = tfs.export.convert(plain, target="litert", path=tmp_path / "m.tflite", representative_data=X[:8])
    assert result.report.verification["max_abs_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["synflow", "snip", "grasp", "magnitude", "random"])
@pytest.mark.parametrize("kind", ["operators", "attention", "subclassed"])
def test_prune_at_init_every_score(kind, method):
    keras.utils.set_random_seed(0)
    base = BUILDERS[kind]()
    data = (X, Y) if method in ("snip", "grasp") else None
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True) if data else None
    sparse = tfs.prune_at_init(base, method, compression=5, data=data, loss=loss, iterations=5, verbose=0,
                               on_collapse="ignore")
    assert tfs.sparsity(sparse) == pytest.approx(0.8, abs=0.01)
    assert len(_kernels_inside(sparse)) == len(_kernels_inside(base))
    np.testing.assert_allclose(tfs.strip(sparse).predict(X, verbose=0), sparse.predict(X, verbose=0), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_gsm_trains_every_model(kind):
    keras.utils.set_random_seed(0)
    model = BUILDERS[kind]()
    model.compile(tfs.optimizers.GlobalSparseMomentum(0.01, momentum=0.9, compression=5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, epochs=1, batch_size=32, verbose=0)
    tfs.optimizers.final_prune(model)
    assert tfs.sparsity(model) == pytest.approx(0.8, abs=0.01)


def test_attention_projections_are_thresholded_with_the_layer():
    sparse = tfs.soft_threshold(attention(), learn_threshold=False, shrink=False)
    mha = [w for w in tfs.surgery.wrappers(sparse) if w.layer.name == "mha"]
    assert len(mha) == 1
    assert list(mha[0].kernel_names) == [f"{n}_kernel" for n in ("query", "key", "value", "attention_output")]


def test_subclassed_model_with_several_inputs_is_refused_by_name():
    class TwoInputs(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, inputs):
            return self.d(inputs[0] + inputs[1])

    model = TwoInputs()
    model([np.zeros((1, 3), "float32"), np.zeros((1, 3), "float32")])
    with pytest.raises(ValueError, match="subclassed model \\(TwoInputs\\)"):
        tfs.soft_threshold(model)


def test_synflow_on_the_vit_keeps_index_arithmetic_exact():
    # The position indices are `cumsum(ones_like(x)) - 1`: only activations are linearized,
    # arithmetic on constants runs as written (else the Embedding reads index 10 of 10).
    sparse = tfs.prune_at_init(tfs.zoo.mnist1d_vit(), "synflow", compression=10, iterations=5, verbose=0)
    assert tfs.sparsity(sparse) == pytest.approx(0.9, abs=0.01)
    assert np.isfinite(sparse.predict(np.zeros((2, 40, 1), "float32"), verbose=0)).all()


def test_attention_heads_are_structured_units(tmp_path):
    keras.utils.set_random_seed(0)
    model = attention()
    groups = tfs.surgery.channel_groups(model, heads=True)
    assert groups.prunable()["mha"].size == 2
    assert "mha" not in tfs.surgery.channel_groups(model).prunable()  # opt-in: greedy / channel-STR keep it
    with pytest.raises(TypeError, match="`heads` must be True or False"):
        tfs.surgery.channel_groups(model, heads="yes")
    small = tfs.surgery.prune_groups(model, {"mha": [1]}, groups)
    assert small.get_layer("mha").num_heads == 1
    # The masked model: head 0 writes nothing (its value projection and output rows zeroed).
    masked = keras.models.clone_model(model)
    masked.set_weights(model.get_weights())
    mha = masked.get_layer("mha")
    for layer, index in ((mha.value_dense, (slice(None), 0)), (mha.output_dense, (0,))):
        weights = layer.get_weights()
        weights[0][index] = 0
        if layer is mha.value_dense:
            weights[1][0] = 0
        layer.set_weights(weights)
    np.testing.assert_allclose(small.predict(X, verbose=0), masked.predict(X, verbose=0), atol=1e-5)
    macs = [{r.name: r.flops for r in tfs.summary(m, print_fn=None).layers}["mha"] for m in (model, small)]
    assert macs[1] * 2 == macs[0]
    small.save(tmp_path / "small.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "small.keras").predict(X, verbose=0),
                                  small.predict(X, verbose=0))


def test_l1_norm_prune_cuts_heads_and_ffn_units_of_the_vit():
    model = tfs.zoo.mnist1d_vit()
    small = tfs.pruning.l1_norm_prune(model, flops=0.5)
    ratio = tfs.summary(small, print_fn=None).flops / tfs.summary(model, print_fn=None).flops
    assert 0.45 <= ratio <= 0.5
    assert [l.num_heads for l in small.layers if isinstance(l, keras.layers.MultiHeadAttention)] == [1, 1]
    assert small.get_layer("block0_ffn1").units < 64


@pytest.mark.slow
def test_vit_exports_to_tflm_with_relu_and_names_gelu_otherwise():
    x = np.random.default_rng(0).normal(size=(32, 40, 1)).astype("float32")
    small = tfs.pruning.l1_norm_prune(tfs.zoo.mnist1d_vit(ffn_activation="relu"), flops=0.5)
    result = tfs.export.convert(small, target="tflm", quantize="int8", representative_data=x)
    assert result.report.tflm["arena_bytes"] > 0 and result.report.verification["samples"] == 16
    with pytest.raises(tfs.export.UnsupportedOpError, match="GELU"):
        tfs.export.convert(tfs.zoo.mnist1d_vit(), target="tflm", quantize="int8", representative_data=x)


@pytest.mark.slow
def test_str_on_attention_under_mirrored_strategy_matches_one_device(mirrored_strategy):
    def build():
        keras.utils.set_random_seed(0)
        return compile_sgd(tfs.soft_threshold(attention(), s_init=-3.0, weight_decay=1e-3), lr=0.01)

    x, y = np.concatenate([X] * 4), np.concatenate([Y] * 4)
    single, mirrored = fit_single_and_mirrored(build, mirrored_strategy, x, y, epochs=1, batch_size=32)
    assert_same_state(single, mirrored)
