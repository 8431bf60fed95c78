"""Issue 18: SynFlow's linearized flow network, connectivity-based collapse, keras.applications."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from tf_sparsity.pruning import connectivity, flow_network
from tf_sparsity.pruning.at_init import _Pruner

L = keras.layers


def flat(scores):
    return np.concatenate([np.asarray(s, np.float64).ravel() for s in scores])


def pruner(model, method="synflow"):
    return _Pruner(tfs.surgery.wrap_prunable(model, tfs.layers.Masked), method, None, None, 0)


def cnn(activation="relu", head=None):
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Activation(activation)(x) if activation != "relu6" else L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same", activation=activation if activation != "relu6" else None, name="dw")(x)
    x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5, activation=head, name="head")(x))


def residual_se(depth=3, width=8):
    """Residual blocks with squeeze-excite gates: the shapes of EfficientNet."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(width, 3, padding="same", activation="swish", name="stem")(inputs)
    for i in range(depth):
        h = L.Conv2D(width, 1, activation="swish", name=f"b{i}_expand")(x)
        h = L.BatchNormalization(name=f"b{i}_bn")(h)
        g = L.GlobalAveragePooling2D(keepdims=True)(h)
        g = L.Conv2D(2, 1, activation="swish", name=f"b{i}_se_reduce")(g)
        g = L.Conv2D(width, 1, activation="sigmoid", name=f"b{i}_se_expand")(g)
        h = L.Multiply()([h, g])
        h = L.Conv2D(width, 1, name=f"b{i}_project")(h)
        x = L.Add()([x, h])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4, activation="softmax", name="head")(x))


def test_flow_network_equals_todays_scores_on_relu_networks():
    # ReLU + BN + max pooling, nonzero biases: the flow network's float64
    # scores are the generic |theta|-clone path's, to rounding.
    keras.utils.set_random_seed(0)
    model = cnn("relu")
    model.get_layer("head").bias.assign(np.full(5, 0.3, "float32"))
    p = pruner(model)
    assert p._flow is not None
    p.step(0.4)
    new = flat(p.scores(fast=False))
    old = flat(p._synflow_fn("float64")([m for m in p.masks])[1])
    np.testing.assert_allclose(new, old, rtol=1e-9, atol=0)


@pytest.mark.parametrize("activation, head", [("relu6", "softmax"), ("swish", "softmax"), ("gelu", "sigmoid"),
                                              ("hard_silu", None)])
def test_every_activation_is_the_identity(activation, head):
    keras.utils.set_random_seed(1)
    model = cnn(activation, head)
    reference = flow_network.linearized(model)
    assert not any(isinstance(l, flow_network.ACTIVATION_LAYERS) for l in reference.layers)
    got = flat([a for v in tfs.pruning.scores(model, "synflow").values() for a in v])
    want = flat([a for v in tfs.pruning.scores(reference, "synflow").values() for a in v])
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # Softmax/sigmoid heads no longer zero the flow: scores are far from noise.
    assert got.min() > 0


def operation_nodes(gate=False):
    """Activations as `keras.ops` calls, operators between tensors (optionally a `*` gate)."""
    inputs = keras.Input((10, 2))
    h = L.Conv1D(6, 3, padding="same", name="c1")(inputs)
    t = keras.ops.tanh(h)
    if gate:
        t = t * keras.ops.sigmoid(L.Dense(6, name="gate")(h))
    h = t + L.Dense(6, name="skip")(keras.activations.gelu(h))
    return keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(h)))


def test_operation_nodes_run_in_the_flow_network_as_in_the_linearized_clone():
    keras.utils.set_random_seed(3)
    model = operation_nodes()
    assert flow_network.unsupported_layers(model) == []
    p = pruner(model)
    assert p._flow is not None
    p.step(0.5)
    new = flat(p.scores(fast=False))
    # The generic path on the linearized clone (operation nodes of one tensor pass it through).
    clone = pruner(flow_network.linearized(model))
    assert not any(tfs._compat.is_activation_operation(n.operation) for n in tfs._compat.graph_nodes(clone._plain)[2])
    old = flat(clone._synflow_fn("float64")([m for m in p.masks])[1])
    np.testing.assert_allclose(new, old, rtol=1e-9, atol=0)
    # A `*` between tensors is a product, as the Multiply layer (geometric mean of the flows).
    gated = pruner(operation_nodes(gate=True))
    assert gated._flow is not None
    scores = flat(gated.scores(fast=False))
    assert np.isfinite(scores).all() and scores.max() > 0


def test_softmax_head_scores_the_logits():
    keras.utils.set_random_seed(2)
    with_softmax = cnn("relu", "softmax")
    logits = flow_network.linearized(with_softmax)
    a, b = tfs.pruning.scores(with_softmax, "synflow"), tfs.pruning.scores(logits, "synflow")
    for name in a:
        np.testing.assert_allclose(a[name][0], b[name][0], rtol=1e-9)


@pytest.mark.slow
def test_float32_rounds_rank_like_float64_on_residual_gated_networks():
    # Add and Multiply mix paths: per-kernel rescaling would change the
    # ranking; power-of-two tensor rescaling keeps one common factor.
    keras.utils.set_random_seed(3)
    p = pruner(residual_se(depth=4))
    for density in (0.8, 0.6):  # iterated, as SynFlow runs (one shot to 0.3 empties the stem)
        p.step(density)
    fast, info = p._flow.scores([m.numpy() for m in p.masks], "float32", return_info=True)
    exact = flat(p._flow.scores([m.numpy() for m in p.masks], "float64"))
    fast = flat(fast)
    alive = exact > 0
    assert alive.sum() > 100
    ratio = fast[alive] / exact[alive]
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-4)
    assert info["nonfinite"] == 0


@pytest.mark.slow
def test_deep_products_overflowing_float64_stay_finite():
    # 60 wide layers of |W| ~ N(0, 1): R ~ 50**60 overflows float32 and
    # float64 would at depth ~180; the scaled float32 scores are finite and
    # conserve R per layer (Theorem 1) up to float32 rounding.
    inputs = keras.Input((64,))
    x = inputs
    for _ in range(60):
        x = L.Dense(64, use_bias=False, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0))(x)
    net = flow_network.SynFlowNetwork(keras.Model(inputs, x))
    scores, info = net.scores([np.ones((64, 64))] * 60, "float32", return_info=True)
    sums = [float(tf.reduce_sum(tf.cast(s, tf.float64))) for s in scores]
    assert info["log2_R"] > 128 and info["nonfinite"] == 0
    np.testing.assert_allclose(sums, sums[0], rtol=1e-3)


def test_gates_keep_conservation():
    # Geometric-mean gates are degree-1: every layer on all paths scores R
    # in total (biases zero, BN at init), the gate's own kernels R / 2.
    keras.utils.set_random_seed(4)
    inputs = keras.Input((4, 4, 3))
    h = L.Conv2D(6, 1, use_bias=False, name="a")(inputs)
    g = L.GlobalAveragePooling2D(keepdims=True)(h)
    g = L.Conv2D(6, 1, use_bias=False, activation="sigmoid", name="gate")(g)
    y = L.Conv2D(3, 1, use_bias=False, name="b")(L.Multiply()([h, g]))
    s = tfs.pruning.scores(keras.Model(inputs, y), "synflow")
    totals = {k: float(v[0].sum()) for k, v in s.items()}
    np.testing.assert_allclose(totals["a"], totals["b"], rtol=1e-9)
    np.testing.assert_allclose(totals["gate"], totals["b"] / 2, rtol=1e-9)


def test_connectivity_tells_emptied_branches_from_cuts():
    model = residual_se(depth=2)
    p = pruner(model)
    names = [k[0] for k in p.kernel_keys]
    # Empty one residual branch and one gate: still connected.
    for name, m in zip(names, p.masks):
        if name in ("b0_project", "b1_se_reduce"):
            m.assign(tf.zeros_like(m))
    r = p.connectivity()
    assert r.connected and not r.collapsed and r.cuts == []
    assert sorted(r.emptied_branches) == ["b0_project", "b1_se_reduce"]
    assert p.collapsed() == ["b0_project", "b1_se_reduce"]  # per-layer definition
    # The stem is a cut.
    p.masks[names.index("stem")].assign(tf.zeros_like(p.masks[0]))
    r = p.connectivity()
    assert r.collapsed and r.cuts == ["stem"]
    assert set(connectivity.structural_cuts(model)) == {"stem", "head"}


def test_disconnected_without_any_empty_layer():
    inputs = keras.Input((4,))
    x = L.Dense(3, name="a")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="b")(x))
    checker = connectivity.Checker(model, [("a", 0), ("b", 0)])
    first = np.zeros((4, 3))
    first[:, 0] = 1  # only unit 0 is fed ...
    second = np.zeros((3, 2))
    second[1, :] = 1  # ... only unit 1 is read
    r = checker.check([first, second])
    assert r.empty == [] and r.collapsed
    second[0, 1] = 1
    assert checker.check([first, second]).outputs_connected == [True]


@pytest.mark.slow
def test_prune_at_init_reports_branches_not_collapse():
    keras.utils.set_random_seed(5)
    model = residual_se(depth=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = tfs.prune_at_init(model, "magnitude", compression=30, verbose=0)
    r = connectivity.check(sparse)
    kinds = {type(w.message) for w in caught}
    if r.connected and r.emptied_branches:
        assert connectivity.EmptiedBranchWarning in kinds
        assert tfs.pruning.at_init.LayerCollapseWarning not in kinds
    elif not r.connected:
        assert tfs.pruning.at_init.LayerCollapseWarning in kinds


@pytest.mark.slow
def test_critical_compression_definitions():
    keras.utils.set_random_seed(6)
    model = residual_se(depth=2)
    by_layer = tfs.pruning.critical_compression(model, "random", tolerance=0.2, collapse="layer")
    by_connectivity = tfs.pruning.critical_compression(model, "random", tolerance=0.2)
    assert by_connectivity >= by_layer - 0.2
    with pytest.raises(ValueError, match="`collapse`"):
        tfs.pruning.critical_compression(model, "random", collapse="cut")


def test_grasp_temperature_divides_logits_of_softmax_heads():
    keras.utils.set_random_seed(7)
    model = cnn("relu", "softmax")
    x = np.random.default_rng(0).random((8, 12, 12, 3)).astype("float32")
    y = np.arange(8) % 5
    loss = keras.losses.SparseCategoricalCrossentropy()
    p = _Pruner(tfs.surgery.wrap_prunable(model, tfs.layers.Masked), "grasp", (x, y), loss, 0)
    logits_model = cnn("relu", None)  # the same weights, linear head
    logits_model.set_weights(model.get_weights())
    want = loss(y, tf.nn.softmax(logits_model(x, training=True) / 200.0))
    np.testing.assert_allclose(float(p._loss(x, y, 200.0)), float(want), rtol=1e-5)
    assert flow_network.softmax_heads(p.model)[0].activation.__name__ == "softmax"  # restored


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50", "EfficientNetB0"])
def test_synflow_keeps_keras_applications_connected(name):
    # C = 100 with 20 rounds (not 100, to bound the test: ~1 min each on 2
    # cores); default softmax heads, weights=None, 32x32, 10 classes.
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", connectivity.EmptiedBranchWarning)
        warnings.simplefilter("error", tfs.pruning.at_init.LayerCollapseWarning)
        sparse = tfs.prune_at_init(model, "synflow", compression=100, iterations=20, verbose=0)
    r = connectivity.check(sparse)
    assert r.connected and r.cuts == []
    assert tfs.sparsity(sparse) == pytest.approx(0.99, abs=1e-4)
