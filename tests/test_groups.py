"""Channel dependency groups (`tfs.surgery.channel_groups`) and group surgery."""

import keras
import numpy as np
import pytest
from support import masked_copy, random_like

import tf_sparsity as tfs
from tf_sparsity import surgery


def _half(groups, seed=0):
    rng = np.random.default_rng(seed)
    return {n: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
            for n, g in groups.prunable().items()}


def _check_equal(model, shape, keep=None, atol=1e-5):
    groups = surgery.channel_groups(model)
    keep = _half(groups) if keep is None else keep
    small = surgery.prune_groups(model, keep, groups)
    x = random_like((4,) + shape)
    want = masked_copy(model, groups, keep)(x, training=False)
    got = small(x, training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=1e-4)
    assert tfs.summary(small, print_fn=None).flops == pytest.approx(surgery.group_macs(groups, keep))
    return groups, small


def _bn(x):
    bn = keras.layers.BatchNormalization()
    out = bn(x)
    bn.set_weights([random_like(w.shape, i) ** 2 + 0.5 for i, w in enumerate(bn.get_weights())])
    return out


def _toy():
    """Residual add, inverted residual (depthwise), squeeze-excite, concat, flatten -> dense."""
    x = keras.Input((8, 8, 3))
    a = keras.layers.ReLU()(_bn(keras.layers.Conv2D(8, 3, padding="same", name="stem")(x)))
    e = keras.layers.ReLU()(_bn(keras.layers.Conv2D(16, 1, name="expand")(a)))
    d = _bn(keras.layers.DepthwiseConv2D(3, padding="same")(e))
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(d)
    s = keras.layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = keras.layers.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    d = keras.layers.Multiply()([d, s])
    p = _bn(keras.layers.Conv2D(8, 1, name="project")(d))
    r = keras.layers.Add()([a, p])
    c = keras.layers.Concatenate()([r, keras.layers.Conv2D(6, 1, name="side")(r)])
    c = keras.layers.MaxPooling2D()(c)
    f = keras.layers.Flatten()(c)
    h = keras.layers.Dense(12, activation="relu", name="fc")(f)
    return keras.Model(x, keras.layers.Dense(5, name="logits")(h))


def test_groups_of_a_toy_network_follow_merges_depthwise_and_squeeze_excite():
    groups = surgery.channel_groups(_toy())
    layers = {n: sorted(l.name for l, _ in g.producers) for n, g in groups.prunable().items()}
    assert layers == {"stem": ["project", "stem"], "expand": ["expand", "se_expand"],
                      "se_reduce": ["se_reduce"], "side": ["side"], "fc": ["fc"]}
    assert groups.groups["logits"].frozen == "model output"


def test_toy_surgery_equals_the_masked_model():
    _, small = _check_equal(_toy(), (8, 8, 3))
    assert {l.name: l.filters for l in small.layers if isinstance(l, keras.layers.Conv2D)}["stem"] == 4
    assert [l.units for l in small.layers if isinstance(l, keras.layers.Dense)] == [6, 5]


def test_nested_models_and_reshape_into_dense():
    inner_in = keras.Input((6, 4))
    inner = keras.Model(inner_in, keras.layers.Conv1D(8, 3, padding="same", name="inner_conv")(inner_in))
    x = keras.Input((6, 4))
    h = inner(keras.layers.Conv1D(4, 1, name="outer_conv")(x))
    h = keras.layers.Reshape((48,))(keras.layers.ReLU()(h))
    model = keras.Model(x, keras.layers.Dense(3)(keras.layers.Dense(10, name="fc")(h)))
    groups, small = _check_equal(model, (6, 4))
    assert set(groups.prunable()) == {"inner_conv", "fc"}
    assert "input of nested model" in groups.groups["outer_conv"].frozen


def test_unknown_grouped_and_transposed_layers_freeze_what_they_touch():
    x = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(8, 1, name="a")(x)
    g = keras.layers.Conv2D(8, 3, groups=2, padding="same", name="grouped")(a)
    t = keras.layers.Conv2DTranspose(4, 3, padding="same", name="transposed")(g)
    n = keras.layers.LayerNormalization(name="ln")(keras.layers.Conv2D(6, 1, name="b")(t))
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(n)))
    groups = surgery.channel_groups(model)
    assert set(groups.frozen) == {"grouped", "transposed", "ln"}
    assert "grouped convolution" in groups.frozen["grouped"]
    assert groups.prunable() == {}
    with pytest.raises(ValueError, match="no channel group that can lose channels"):
        tfs.pruning.l1_norm_prune(model, flops=0.5)


def test_bad_input_is_named():
    model = _toy()
    with pytest.raises(ValueError, match="would empty group 'stem'"):
        surgery.prune_groups(model, {"stem": []})
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        surgery.prune_groups(model, {"nope": [0]})
    with pytest.raises(ValueError, match=r"group 'logits' is frozen \(model output\)"):
        surgery.prune_groups(model, {"logits": [0]})
    with pytest.raises(ValueError, match=r"below the smallest reachable MACs .*frozen"):
        tfs.pruning.l1_norm_prune(model, flops=0.01)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="must be built"):
        surgery.channel_groups(Sub())


def test_l1_and_random_hit_the_flops_budget_on_the_toy():
    model = _toy()
    dense = tfs.summary(model, print_fn=None).flops
    for prune in (tfs.pruning.l1_norm_prune, tfs.pruning.random_prune):
        small = prune(model, flops=0.5)
        assert 0.45 <= tfs.summary(small, print_fn=None).flops / dense <= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50", "EfficientNetB0"])
def test_keras_applications_surgery_equals_masked_and_meets_the_budget(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    # Non-trivial BatchNormalization statistics, so removed channels are not all alike.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([random_like(w.shape, 1) ** 2 * 0.5 + 0.5 for w in layer.get_weights()])
    groups, _ = _check_equal(model, (32, 32, 3))
    dense = tfs.summary(model, print_fn=None).flops
    ratio = tfs.summary(tfs.pruning.l1_norm_prune(model, flops=0.5), print_fn=None).flops / dense
    assert 0.49 <= ratio <= 0.5


@pytest.mark.parametrize("build", [tfs.zoo.mnist1d_resnet, pytest.param(tfs.zoo.mnist1d_mobilenet, marks=pytest.mark.slow)])
def test_zoo_residual_and_inverted_residual_nets(build):
    model = build()
    groups, _ = _check_equal(model, (40, 1))
    assert all(g.frozen in (None, "model output") for g in groups.groups.values())


def test_greedy_reconstruction_is_exact_when_keeping_all_and_beats_l1():
    model = _toy()
    x = random_like((64, 8, 8, 3))
    same = tfs.greedy_prune(model, x, objective="reconstruction", tolerance=0.0, verbose=0)
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(model(x)), atol=1e-4)
    small, report = tfs.greedy_prune(model, x, objective="reconstruction", flops=0.5, tolerance=0.0,
                                     verbose=0, return_report=True)
    dense = tfs.summary(model, print_fn=None).flops
    assert 0.45 <= tfs.summary(small, print_fn=None).flops / dense <= 0.5
    assert sorted(report["stem"]["consumers"]) == ["expand", "fc", "side"]
    ref = np.asarray(model(x))
    error = lambda m: float(np.mean((np.asarray(m(x)) - ref) ** 2))  # noqa: E731
    assert error(small) < error(tfs.pruning.l1_norm_prune(model, flops=0.5))


@pytest.mark.slow
def test_greedy_reconstruction_global_allocation_stops_every_group_at_one_error_level():
    model = tfs.zoo.mnist1d_mobilenet()
    x = random_like((64, 40, 1))
    dense = tfs.summary(model, print_fn=None).flops
    runs = {allocation: tfs.greedy_prune(model, x, objective="reconstruction", flops=0.5, tolerance=0.0,
                                         allocation=allocation, verbose=0, return_report=True)
            for allocation in ("uniform", "global")}
    for small, _ in runs.values():
        assert 0.45 <= tfs.summary(small, print_fn=None).flops / dense <= 0.5
    small, report = runs["global"]
    assert 0.49 <= tfs.summary(small, print_fn=None).flops / dense
    # Uniform widths leave some groups far worse reconstructed than others; one
    # level cuts the easy groups (here the expansions) harder and evens the errors.
    worst = {a: max(r["error"] for r in rep.values()) for a, (_, rep) in runs.items()}
    assert worst["global"] < 0.5 * worst["uniform"]
    assert report["b4_expand"]["kept"] < runs["uniform"][1]["b4_expand"]["kept"]
    with pytest.raises(ValueError, match="`allocation='global'` needs"):
        tfs.greedy_prune(model, x, objective="loss", flops=0.5, allocation="global", verbose=0)
    with pytest.raises(ValueError, match="`allocation` must be one of"):
        tfs.greedy_prune(model, x, objective="reconstruction", flops=0.5, allocation="layerwise")


@pytest.mark.parametrize("build", [tfs.zoo.mnist1d_cnn, tfs.zoo.mnist1d_resnet,
                                   pytest.param(tfs.zoo.mnist1d_mobilenet, marks=pytest.mark.slow)])
def test_flops_budgets_land_within_two_percent(build):
    model = build()
    dense = tfs.summary(model, print_fn=None).flops
    for allocation in ("uniform", "global"):
        for budget in (0.5, 0.3):
            small = tfs.pruning.l1_norm_prune(model, flops=budget, allocation=allocation)
            assert 0.98 * budget <= tfs.summary(small, print_fn=None).flops / dense <= budget


def test_global_allocation_follows_the_scores():
    model = _toy()
    groups = surgery.channel_groups(model)
    # One group's units all score low: the global threshold takes them first, uniform does not.
    scores = {n: np.full(g.size, 1.0 if n != "expand" else 0.01) + np.linspace(0, 0.001, g.size)
              for n, g in groups.prunable().items()}
    uniform = surgery.keep_for_budget(groups, scores, flops=0.6)
    ranked = surgery.keep_for_budget(groups, scores, flops=0.6, allocation="global")
    assert len(ranked["expand"]) < len(uniform["expand"])
    assert surgery.group_macs(groups, ranked) / surgery.group_macs(groups, {}) <= 0.6
    with pytest.raises(ValueError, match="allocation"):
        surgery.keep_for_budget(groups, scores, flops=0.6, allocation="greedy")
    with pytest.raises(ValueError, match="lacks the prunable groups"):
        surgery.keep_for_budget(groups, {"stem": scores["stem"]}, flops=0.6)
    with pytest.raises(ValueError, match="pass `flops`"):
        tfs.pruning.l1_norm_prune(model, width=0.5, allocation="global")
