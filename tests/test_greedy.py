"""Greedy forward selection and channel surgery: exactness, budgets, topology, errors."""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
from tf_sparsity import surgery
from support import random_like

L = keras.layers


def chain_cnn():
    inputs = keras.Input((40, 1))
    x = L.Conv1D(12, 5, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.Conv1D(10, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = L.MaxPooling1D(name="pool")(x)
    x = L.Dropout(0.1)(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(24, activation="relu", name="d1")(x)
    model = keras.Model(inputs, L.Dense(10, name="out")(x))
    for w in model.get_layer("bn").weights:  # non-trivial BN statistics
        w.assign(np.random.default_rng(0).random(w.shape).astype("float32") + 0.5)
    return model


def test_keeping_every_channel_is_exact():
    model = chain_cnn()
    x = random_like((8, 40, 1))
    full = surgery.prune_channels(model, {"c1": range(12), "c2": range(10), "d1": range(24)})
    np.testing.assert_array_equal(full(x), model(x))
    same = tfs.greedy_prune(model, x, objective="local", tolerance=0.0, verbose=0)
    assert tfs.summary(same, print_fn=None).params == tfs.summary(model, print_fn=None).params
    np.testing.assert_allclose(same(x), model(x), atol=1e-3)


def test_pruned_model_equals_original_with_channels_masked():
    model = chain_cnn()
    x = random_like((8, 40, 1))
    keep = {"c1": [0, 3, 4, 9], "c2": [1, 2, 8], "d1": [0, 5, 6, 20]}
    small = surgery.prune_channels(model, keep)
    # Reference: zero the next layer's input weights of every removed channel.
    masked = keras.models.clone_model(model)
    masked.set_weights(model.get_weights())
    for name, consumer, flat in (("c1", "c2", False), ("c2", "d1", True), ("d1", "out", False)):
        w = masked.get_layer(consumer).get_weights()
        n = model.get_layer(name).get_weights()[0].shape[-1]
        drop = np.setdiff1d(np.arange(n), keep[name])
        if flat:
            rows = w[0].reshape(-1, n, w[0].shape[-1])
            rows[:, drop, :] = 0
            w[0] = rows.reshape(w[0].shape)
        else:
            w[0][..., drop, :] = 0
        masked.get_layer(consumer).set_weights(w)
    np.testing.assert_allclose(small(x), masked(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["local", "global", "auto"])
def test_greedy_width_budget_shrinks_params_and_flops(objective, mnist1d_data, tmp_path):
    (x, y), _ = mnist1d_data
    model = tfs.zoo.mnist1d_cnn(filters=16, hidden=32)
    small, report = tfs.greedy_prune(model, (x[:256], y[:256]), objective=objective, width=0.5,
                                     candidates=6 if objective != "local" else None, taylor=objective == "auto",
                                     verbose=0, return_report=True)
    before, after = tfs.summary(model, print_fn=None), tfs.summary(small, print_fn=None)
    assert after.params < before.params and after.flops < before.flops
    kept = {l.name: l.get_weights()[0].shape[-1] for l in small.layers if l.name in ("conv1", "conv2", "conv3", "fc1")}
    assert all(kept[n] <= {"fc1": 16}.get(n, 8) for n in kept)
    assert report["logits"]["left_alone"] and "output" in report["logits"]["reason"]
    assert all(report[n]["objective"] in ("local", "global") for n in kept)
    path = tmp_path / "small.keras"
    small.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path).predict(x[:16], verbose=0),
                                  small.predict(x[:16], verbose=0))


@pytest.mark.slow
def test_flops_budget_and_l1_baseline(mnist1d_data):
    (x, _), _ = mnist1d_data
    model = tfs.zoo.mnist1d_cnn(filters=16, hidden=32)
    dense = tfs.summary(model, print_fn=None).flops
    for small in (tfs.greedy_prune(model, x[:256], objective="local", flops=0.4, verbose=0),
                  tfs.pruning.l1_norm_prune(model, flops=0.4)):
        assert tfs.summary(small, print_fn=None).flops <= 0.42 * dense
    l1 = tfs.pruning.l1_norm_prune(model, width=0.5)
    conv1 = model.get_layer("conv1").kernel.numpy()
    norms = np.abs(conv1).reshape(-1, 16).sum(0)
    kept = np.sort(np.argsort(-norms)[:8])
    np.testing.assert_array_equal(l1.get_layer("conv1").kernel.numpy(), conv1[..., kept])


def test_residual_blocks_are_left_alone_not_broken():
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    y = L.Conv2D(12, 3, padding="same", activation="relu", name="inner")(x)
    y = L.Conv2D(8, 3, padding="same", name="back")(y)
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(4, name="head")(x))
    chains, alone = surgery.channel_chains(model)
    assert set(chains) == {"inner"}
    assert "branch" in alone["stem"] and "Add" in alone["back"]
    data = random_like((32, 16, 16, 3))
    small, report = tfs.greedy_prune(model, data, width=0.5, verbose=0, return_report=True)
    assert small.get_layer("inner").filters == 6 and small.get_layer("stem").filters == 8
    assert report["stem"]["left_alone"]
    assert small(data).shape == (32, 4)


@pytest.mark.slow
def test_real_architecture_is_analysed():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
    chains, alone = surgery.channel_chains(model)
    # Expansion convs feed depthwise convs and projections feed Add: MobileNetV2
    # is reported, never broken.
    assert len(chains) + len(alone) == sum(isinstance(l, surgery.CHANNEL_PRUNABLE) for l in model.layers)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"data": None}, ValueError, "`data` is required"),
        ({"data": np.zeros((4, 30, 1), "float32")}, ValueError, r"`data` must have shape \(n, 40, 1\)"),
        ({"width": 1.0}, ValueError, "`width` must be a fraction in"),
        ({"flops": 0}, ValueError, "`flops` must be a fraction in"),
        ({"width": 0.5, "flops": 0.5}, ValueError, "at most one budget"),
        ({"objective": "best"}, ValueError, "`objective` must be one of"),
    ],
)
def test_bad_input(kwargs, error, pattern):
    args = {"data": np.zeros((4, 40, 1), "float32"), **kwargs}
    with pytest.raises(error, match=pattern):
        tfs.greedy_prune(tfs.zoo.mnist1d_cnn(filters=4, hidden=8), verbose=0, **args)


def test_unsupported_topology():
    inputs = keras.Input((8,))
    a = L.Dense(4, name="a")(inputs)
    b = L.Dense(4, name="b")(inputs)
    model = keras.Model(inputs, L.Add()([a, b]))
    with pytest.raises(ValueError, match="no layer whose channels can be removed"):
        tfs.greedy_prune(model, np.zeros((4, 8), "float32"), verbose=0)


def _loss_masked(model, report):
    """`model` with each group's consumers seeing only its selected units, times N / n (no fine-tune)."""
    from tf_sparsity.pruning.greedy_loss import _GroupMask

    copy = surgery.prune_groups(model, {})
    for name, r in report.items():
        groups = surgery.channel_groups(copy)
        multipliers = np.zeros(r["total"])
        multipliers[r["units"]] = r["total"] / r["kept"]
        _GroupMask(groups, groups.groups[name]).set(multipliers)
    return copy


def _trained_resnet(mnist1d_data):
    (x, y), _ = mnist1d_data
    keras.utils.set_random_seed(0)
    model = tfs.zoo.mnist1d_resnet(filters=(8, 16), blocks=1)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:2000], y[:2000], epochs=2, batch_size=64, verbose=0)
    return model, x[:2000], y[:2000]


@pytest.mark.slow
def test_greedy_loss_stops_at_the_accuracy_and_equals_the_masked_model(mnist1d_data):
    model, x, y = _trained_resnet(mnist1d_data)
    small, report = tfs.greedy_prune(model, (x, y), objective="loss", candidates=6, batch_size=64,
                                     verbose=0, return_report=True)
    assert set(report) == set(surgery.channel_groups(model).prunable())
    for r in report.values():  # every group stops at 98% of the accuracy before it (or keeps all)
        assert r["stopped"] in ("accuracy", "all units")
        if r["stopped"] == "accuracy":
            assert r["accuracy"] >= 0.98 * r["reference"]
    assert any(r["kept"] < r["total"] for r in report.values())
    masked = _loss_masked(model, report)
    np.testing.assert_allclose(np.asarray(small(x[:64], training=False)),
                               np.asarray(masked(x[:64], training=False)), atol=1e-4, rtol=1e-4)
    assert tfs.summary(small, print_fn=None).flops < tfs.summary(model, print_fn=None).flops
    # The global variant (no labels: the original model's output) with a MACs cap and fine-tuning.
    capped, report = tfs.greedy_prune(model, x, objective="loss", flops=0.5, accuracy_fraction=None,
                                      candidates=4, batch_size=64, finetune_steps=5, verbose=0,
                                      return_report=True)
    ratio = tfs.summary(capped, print_fn=None).flops / tfs.summary(model, print_fn=None).flops
    assert 0.45 <= ratio <= 0.5 and all(r["stopped"] == "budget" for r in report.values())


def test_greedy_loss_bad_input_is_named():
    model = tfs.zoo.mnist1d_cnn(filters=4, hidden=8)
    x = random_like((32, 40, 1))
    with pytest.raises(ValueError, match="accuracy_fraction"):
        tfs.greedy_prune(model, x, objective="loss", accuracy_fraction=1.5, verbose=0)
    with pytest.raises(ValueError, match="needs a budget"):
        tfs.greedy_prune(model, x, objective="loss", accuracy_fraction=None, verbose=0)
    with pytest.raises(ValueError, match="integer class ids"):
        tfs.greedy_prune(model, (x, np.zeros(32, "float32")), objective="loss", verbose=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        tfs.greedy_prune(model, (x, np.full(32, 12)), objective="loss", verbose=0)
    with pytest.raises(ValueError, match="objective"):
        tfs.greedy_prune(model, x, objective="paper", verbose=0)


@pytest.mark.slow
def test_greedy_loss_on_keras_applications_mobilenet_v2():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35)
    x = random_like((96, 32, 32, 3))
    small, report = tfs.greedy_prune(model, x, objective="loss", width=0.5, accuracy_fraction=0.9,
                                     candidates=3, batch_size=32, verbose=0, return_report=True)
    assert len(report) == len(surgery.channel_groups(model).prunable())
    for r in report.values():
        assert r["stopped"] in ("accuracy", "budget") and r["kept"] <= max(1, round(0.5 * r["total"]))
        if r["stopped"] == "accuracy":
            assert r["accuracy"] >= 0.9 * r["reference"]
    masked = _loss_masked(model, report)
    np.testing.assert_allclose(np.asarray(small(x[:8], training=False)),
                               np.asarray(masked(x[:8], training=False)), atol=1e-5, rtol=1e-4)


def _sequential_split(model, mask, memory=None):
    """The reference for `greedy_loss._split`: each candidate's multipliers
    assigned to the consumers' kernels, then the whole network (no head, no batching)."""
    from tf_sparsity.pruning.greedy_loss import _forward

    forward = _forward(model)

    def evaluate(below, multipliers, chunk=None):
        outs = []
        try:
            for row in multipliers:
                mask.set(row)
                outs.append(forward(below[0]))
        finally:
            mask.set(np.ones(len(mask.group.units)))  # the kernels as they were (times 1.0 exactly)
        return np.stack(outs)

    return (lambda inputs: [inputs]), evaluate


def _small_zoo(net):
    keras.utils.set_random_seed(0)
    return getattr(tfs.zoo, net)(**({"filters": (8, 16), "blocks": 1} if net == "mnist1d_resnet" else
                                     {"widths": (8, 12), "expansion": 2}))


@pytest.mark.parametrize("net", ["mnist1d_resnet", pytest.param("mnist1d_mobilenet", marks=pytest.mark.slow)])
def test_greedy_loss_batched_candidates_equal_kernel_masks(net):
    # Scaling each consumer's input per candidate (many candidates per call, in
    # chunks) gives the outputs of assigning the multipliers to the kernels.
    import importlib

    module = importlib.import_module("tf_sparsity.pruning.greedy_loss")
    model = surgery.prune_groups(_small_zoo(net), {})
    groups = surgery.channel_groups(model)
    masks = {name: module._GroupMask(groups, g) for name, g in groups.prunable().items()}
    stream = max(masks, key=lambda name: len(masks[name].consumers))  # the residual stream
    picked = [stream] + [name for name in masks if "se_reduce" in name][:1]
    assert len(masks[stream].consumers) >= 3 and len(picked) == (2 if net == "mnist1d_mobilenet" else 1)
    x = random_like((16, 40, 1), seed=2)
    rng = np.random.default_rng(0)
    for name in picked:
        n = groups.groups[name].size
        multipliers = rng.uniform(0, 2, size=(5, n)) * (rng.random((5, n)) < 0.6)
        head, evaluate = module._split(model, masks[name])
        below = head(x)
        reference = _sequential_split(model, masks[name])[1]([x], multipliers)
        for chunk in (None, 1, 2):  # one call; one per candidate; 2 + 2 + 1
            np.testing.assert_allclose(evaluate(below, multipliers, chunk=chunk), reference, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(masks[name].consumers[0][0].kernel), masks[name].consumers[0][2])


@pytest.mark.slow
@pytest.mark.parametrize("net,options", [
    ("mnist1d_mobilenet", {"flops": 0.5, "accuracy_fraction": None}),
    ("mnist1d_resnet", {"accuracy_fraction": 0.5, "finetune_steps": 2}),  # surgery + fine-tune per group
])
def test_greedy_loss_batched_selects_the_units_of_the_sequential_reference(net, options, monkeypatch):
    # The layers below the group once per minibatch and the candidates batched
    # must select what one candidate at a time, multipliers on the kernels,
    # whole network, selects.
    import importlib

    module = importlib.import_module("tf_sparsity.pruning.greedy_loss")
    model = _small_zoo(net)
    x, y = random_like((128, 40, 1), seed=4), np.arange(128) % 10
    kwargs = dict(candidates=3, batch_size=32, eval_samples=32, seed=1, **options)
    # Chunking (one candidate per call, 2 + 2 + 1) is checked call by call in
    # test_greedy_loss_batched_candidates_equal_kernel_masks.
    runs = {"fast": module.greedy_loss(model, x, y, **kwargs)[1]}
    monkeypatch.setattr(module, "_split", _sequential_split)
    slow = module.greedy_loss(model, x, y, **kwargs)[1]
    for report in runs.values():
        assert list(report) == list(slow)
        for name in report:
            np.testing.assert_array_equal(report[name]["units"], slow[name]["units"])
            assert report[name]["stopped"] == slow[name]["stopped"]
