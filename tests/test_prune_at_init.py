"""Pruning at initialization: exact counts, SynFlow's properties, fixed masks, errors."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def bn_cnn():
    inputs = keras.Input((40, 1))
    x = L.Conv1D(16, 5, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv1D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = L.Flatten()(x)
    x = L.Dense(32, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


@pytest.mark.slow
@pytest.mark.parametrize("method", tfs.pruning.METHODS)
@pytest.mark.parametrize("compression", [10, 100])
def test_exact_remaining_counts(method, compression, mnist1d_data):
    (x, y), _ = mnist1d_data
    model = bn_cnn()
    sparse = tfs.prune_at_init(model, method, compression=compression, iterations=5 if method == "synflow" else None,
                               data=(x[:128], y[:128]), loss=LOSS, verbose=0, on_collapse="ignore")
    report = tfs.summary(sparse, print_fn=None)
    assert report.nonzeros == round(report.prunable / compression)
    assert all(isinstance(w, tfs.layers.Masked) for w in tfs.surgery.wrappers(sparse))


@pytest.mark.slow
def test_sparsity_argument_and_layerwise_scope():
    model = bn_cnn()
    sparse = tfs.prune_at_init(model, "magnitude", sparsity=0.75, scope="layerwise", verbose=0)
    for row in tfs.summary(sparse, print_fn=None).layers:
        if row.prunable:
            assert row.nonzeros == round(0.25 * row.prunable)


def test_synflow_conservation_on_a_linear_relu_chain():
    # Bias-free chain: the SynFlow score summed over each layer equals R (Theorem 1).
    inputs = keras.Input((6,))
    x = L.Dense(8, use_bias=False, activation="relu")(inputs)
    x = L.Dense(7, use_bias=False, activation="relu")(x)
    x = L.Dense(5, use_bias=False)(x)
    model = keras.Model(inputs, x)
    sums = [float(sum(a.sum() for a in s)) for s in tfs.pruning.scores(model, "synflow").values()]
    np.testing.assert_allclose(sums, sums[0], rtol=1e-9)
    # R itself: all-ones input through |W|.
    ws = [np.abs(l.kernel.numpy()).astype("float64") for l in model.layers[1:]]
    r = (np.ones((1, 6)) @ ws[0] @ ws[1] @ ws[2]).sum()
    np.testing.assert_allclose(sums[0], r, rtol=1e-9)


@pytest.mark.slow
def test_synflow_needs_no_data_and_is_deterministic():
    model = bn_cnn()
    a = tfs.prune_at_init(model, "synflow", compression=30, iterations=10, verbose=0)
    b = tfs.prune_at_init(model, "synflow", compression=30, iterations=10, verbose=0)
    for wa, wb in zip(tfs.surgery.wrappers(a), tfs.surgery.wrappers(b)):
        np.testing.assert_array_equal(wa.masks[0].numpy(), wb.masks[0].numpy())


@pytest.mark.slow
def test_synflow_survives_deep_products_in_float64():
    # 30 wide layers of |W|: the path products overflow float32 but not float64.
    inputs = keras.Input((64,))
    x = inputs
    for i in range(30):
        x = L.Dense(64, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0))(x)
    model = keras.Model(inputs, x)
    s = tfs.pruning.scores(model, "synflow")
    values = np.concatenate([a.ravel() for v in s.values() for a in v])
    assert np.isfinite(values).all() and (values > 0).all()


@pytest.mark.slow
def test_synflow_float32_rounds_rescale_scores_by_one_constant():
    from tf_sparsity.pruning.at_init import _Pruner

    keras.utils.set_random_seed(3)
    pruner = _Pruner(tfs.surgery.wrap_prunable(bn_cnn(), tfs.layers.Masked), "synflow", None, None, 0)
    assert pruner.synflow_fast  # zero biases, BN, ReLU: positively homogeneous
    pruner.step(0.3)  # rescaling must also hold on a pruned network
    exact = np.concatenate([np.asarray(a).ravel() for a in pruner.scores(fast=False)])
    fast = np.concatenate([np.asarray(a).ravel() for a in pruner.scores(fast=True)])
    alive = exact > 0
    assert fast.dtype == np.float32 and alive.sum() > 100
    ratio = fast[alive] / exact[alive]
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-4)
    assert not fast[~alive].any()


@pytest.mark.parametrize("change", ["sigmoid", "bias"])
def test_synflow_float32_covers_non_homogeneous_networks(change):
    # Issue 18: sigmoid (linearized) and nonzero biases run in float32 through
    # the flow network's power-of-two rescaling; the scores are float64's
    # times one constant.
    from tf_sparsity.pruning.at_init import _Pruner

    model = bn_cnn()
    if change == "sigmoid":
        inputs = keras.Input((8,))
        model = keras.Model(inputs, L.Dense(4)(L.Dense(8, activation="sigmoid")(inputs)))
    else:
        model.get_layer("fc").bias.assign(np.full(32, 0.1, "float32"))
    pruner = _Pruner(tfs.surgery.wrap_prunable(model, tfs.layers.Masked), "synflow", None, None, 0)
    assert pruner.synflow_fast
    fast = np.concatenate([np.asarray(a).ravel() for a in pruner.scores(fast=True)])
    exact = np.concatenate([np.asarray(a).ravel() for a in pruner.scores(fast=False)])
    assert fast.dtype == np.float32 and exact.dtype == np.float64
    ratio = fast[exact > 0] / exact[exact > 0]
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-5)


def test_synflow_generic_path_for_unsupported_layers():
    # LayerNormalization is outside the flow network: the generic float64 path
    # on a linearized copy.
    from tf_sparsity.pruning.at_init import _Pruner

    inputs = keras.Input((8,))
    x = L.LayerNormalization()(L.Dense(8, activation="sigmoid")(inputs))
    model = keras.Model(inputs, L.Dense(4)(x))
    pruner = _Pruner(tfs.surgery.wrap_prunable(model, tfs.layers.Masked), "synflow", None, None, 0)
    assert pruner._flow is None and not pruner.synflow_fast
    assert pruner.scores(fast=True)[0].dtype == tf.float64
    assert tfs.pruning.flow_network.unsupported_layers(model)[0].endswith("(LayerNormalization)")


@pytest.mark.slow
def test_masks_only_shrink_across_rounds():
    from tf_sparsity.pruning.at_init import _Pruner

    pruner = _Pruner(tfs.surgery.wrap_prunable(bn_cnn(), tfs.layers.Masked), "synflow", None, None, 0)
    before = None
    for k in range(1, 9):
        pruner.step((1 / 50) ** (k / 8))
        after = np.concatenate([m.numpy().ravel() for m in pruner.masks]).astype(bool)
        if before is not None:
            assert not np.any(after & ~before)  # nothing comes back
            assert after.sum() < before.sum()
        before = after
    assert before.sum() == round(before.size / 50)


def test_snip_and_grasp_use_training_mode_and_leave_bn_stats(mnist1d_data):
    (x, y), _ = mnist1d_data
    model = bn_cnn()
    batch = (x[:64], y[:64])
    sparse_before = tfs.surgery.wrap_prunable(model, tfs.layers.Masked)
    bn = sparse_before.get_layer("bn1")
    stats = [v.numpy().copy() for v in bn.non_trainable_variables]
    snip = tfs.pruning.scores(model, "snip", data=batch, loss=LOSS)
    # Reference SNIP computed by hand with BN in training mode.
    with tf.GradientTape() as tape:
        loss = LOSS(batch[1], sparse_before(batch[0], training=True))
    kernels = [w.kernels[0] for w in tfs.surgery.wrappers(sparse_before)]
    grads = tape.gradient(loss, kernels)
    np.testing.assert_allclose(snip["conv1"][0], np.abs(grads[0].numpy() * kernels[0].numpy()), rtol=1e-4, atol=1e-9)
    with tf.GradientTape() as tape:
        loss = LOSS(batch[1], sparse_before(batch[0], training=False))
    eval_grads = tape.gradient(loss, kernels)
    assert not np.allclose(np.abs(eval_grads[0].numpy() * kernels[0].numpy()), snip["conv1"][0])
    # bn_mode="eval" (the SynFlow paper's code) scores with the moving statistics.
    snip_eval = tfs.pruning.scores(model, "snip", data=batch, loss=LOSS, bn_mode="eval")
    fresh = tfs.surgery.wrap_prunable(model, tfs.layers.Masked)  # untouched moving statistics
    fresh_kernels = [w.kernels[0] for w in tfs.surgery.wrappers(fresh)]
    with tf.GradientTape() as tape:
        loss = LOSS(batch[1], fresh(batch[0], training=False))
    reference = np.abs(tape.gradient(loss, fresh_kernels)[0].numpy() * fresh_kernels[0].numpy())
    np.testing.assert_allclose(snip_eval["conv1"][0], reference, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="`bn_mode`"):
        tfs.pruning.scores(model, "snip", data=batch, loss=LOSS, bn_mode="inference")
    # Scoring restores normalization statistics.
    pruned = tfs.prune_at_init(model, "grasp", compression=10, data=batch, loss=LOSS, verbose=0)
    for v, s in zip(pruned.get_layer("bn1").non_trainable_variables, stats):
        np.testing.assert_array_equal(v.numpy(), s)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_zero_through_training(optimizer, mnist1d_data, tmp_path):
    (x, y), (xt, yt) = mnist1d_data
    sparse = tfs.prune_at_init(tfs.zoo.mnist1d_cnn(filters=16, hidden=64), "synflow", compression=10,
                               iterations=10, verbose=0)
    masks = {w.name: [m.numpy() for m in w.masks] for w in tfs.surgery.wrappers(sparse)}
    opt = keras.optimizers.SGD(0.05, momentum=0.9) if optimizer == "sgd" else keras.optimizers.Adam(1e-3)
    sparse.compile(opt, LOSS, metrics=["accuracy"])
    sparse.fit(x, y, epochs=6, batch_size=128, verbose=0)
    for w in tfs.surgery.wrappers(sparse):
        for kernel, mask in zip(w.effective_kernels(), masks[w.name]):
            assert np.all(np.asarray(kernel)[mask == 0] == 0)
        np.testing.assert_array_equal(w.masks[0].numpy(), masks[w.name][0])
    assert tfs.sparsity(sparse) == pytest.approx(0.9, abs=1e-4)
    _, acc = sparse.evaluate(xt, yt, verbose=0)
    assert acc > 0.25  # chance is 0.1; quality is measured in benchmarks/
    path = tmp_path / "masked.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(xt[:32], verbose=0), sparse.predict(xt[:32], verbose=0))
    plain = tfs.strip(loaded)
    np.testing.assert_allclose(plain.predict(xt[:32], verbose=0), sparse.predict(xt[:32], verbose=0), atol=1e-5)
    assert tfs.sparsity(plain) == pytest.approx(0.9, abs=1e-4)


def test_layer_collapse_warns_and_raises():
    model = bn_cnn()
    with pytest.warns(RuntimeWarning, match="Layer collapse: magnitude.*'fc'"):
        tfs.prune_at_init(model, "magnitude", compression=1000, verbose=0)
    with pytest.raises(ValueError, match="Layer collapse"):
        tfs.prune_at_init(model, "magnitude", compression=1000, verbose=0, on_collapse="raise")


@pytest.mark.slow
def test_critical_compression_orders_methods():
    model = bn_cnn()
    mag = tfs.pruning.critical_compression(model, "magnitude", tolerance=0.1)
    syn = tfs.pruning.critical_compression(model, "synflow", tolerance=0.1, iterations=20)
    assert 0 < mag < syn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tfs.prune_at_init(model, "synflow", compression=10 ** (syn - 0.1), iterations=20, verbose=0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"method": "snip", "compression": 10}, "needs a batch of data: pass `data"),
        ({"method": "grasp", "compression": 10, "data": (np.zeros((2, 40, 1)), np.zeros(2))}, "needs a `loss`"),
        ({"method": "synflow", "compression": 1}, "`compression` must be a number > 1"),
        ({"method": "synflow", "sparsity": 1.0}, "`sparsity` must be a number in"),
        ({"method": "synflow"}, "exactly one of `compression`"),
        ({"method": "synflw", "compression": 10}, "`method` must be one of .*synflow"),
        ({"method": "synflow", "compression": 10, "schedule": "cubic"}, "`schedule`"),
    ],
)
def test_bad_input(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        tfs.prune_at_init(bn_cnn(), verbose=0, **kwargs)


def test_nothing_prunable():
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    with pytest.raises(ValueError, match="no prunable layer"):
        tfs.prune_at_init(model, "magnitude", compression=10, verbose=0)


def test_topk_mask_numpy_is_topk_mask():
    # Exactly k kept, ties to the earlier flat index, float64 compared as float64.
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(500), 2).astype("float32")  # many ties
    for k in (0, 1, 7, 250, 499, 500, 600):
        want = tfs.ops.topk_mask(scores, min(k, 500), method="exact").numpy()
        np.testing.assert_array_equal(tfs.ops.topk_mask_numpy(scores, k), want)
    close = np.array([1.0, 1.0 + 1e-12, 1.0], "float64")  # one float32 value, two float64 values
    assert tfs.ops.topk_mask_numpy(close, 1).tolist() == [False, True, False]


def _reference_synflow_masks(model, density, rounds):
    # The rounds written out plainly: full-size scores of the flow network
    # (float32, float64 when `needs_float64`), dead weights below every alive
    # one, a stable sort for the top-k (ties to the earlier flat index).
    from tf_sparsity.pruning import flow_network
    from tf_sparsity.pruning.at_init import _Pruner

    net = _Pruner(tfs.surgery.wrap_prunable(model, tfs.layers.Masked), "synflow", None, None, 0)._flow
    masks = [np.ones(b.shape, "float32") for b in net._bases]
    n = sum(m.size for m in masks)
    for k in range(1, rounds + 1):
        keep = int(round(density ** (k / rounds) * n))
        scores, info = net.scores(masks, "float32", return_info=True)
        if flow_network.needs_float64(info, ("global", [keep])):
            scores = net.scores(masks, "float64")
        flat = np.concatenate([np.where(m > 0, s, -1).ravel() for s, m in zip(scores, masks)])
        order = np.argsort(-flat, kind="stable")[:keep]
        kept = np.zeros(n, "float32")
        kept[order] = 1
        masks = [a.reshape(m.shape) for a, m in zip(np.split(kept, np.cumsum([m.size for m in masks])[:-1]), masks)]
    return masks


@pytest.mark.slow
def test_synflow_rounds_equal_a_plain_reference_loop():
    # Issue 18's speed-up (NumPy state, compacted scores, introselect) keeps
    # the masks of the plain loop, with every threshold method.
    keras.utils.set_random_seed(5)
    model = bn_cnn()
    model.get_layer("fc").bias.assign(np.full(32, 0.05, "float32"))
    want = np.concatenate([m.ravel() for m in _reference_synflow_masks(model, 1 / 200, 12)])
    for method in ("partition", "histogram", "exact"):
        sparse = tfs.prune_at_init(model, "synflow", compression=200, iterations=12, verbose=0,
                                   on_collapse="ignore", threshold_method=method)
        got = np.concatenate([m.numpy().ravel() for w in tfs.surgery.wrappers(sparse) for m in w.masks])
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="threshold_method"):
        tfs.prune_at_init(model, "synflow", compression=10, iterations=2, threshold_method="sort", verbose=0)
