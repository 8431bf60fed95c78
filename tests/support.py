"""Helpers shared by the tests (import them: `from support import compile_sgd`)."""

import keras
import numpy as np


def compile_sgd(model, lr=0.05):
    """Compile for sparse-label classification with SGD-Nesterov and logits."""
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def random_like(shape, seed=0):
    """Standard-normal float32 data of `shape`, reproducible by `seed`."""
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def masked_copy(model, groups, keep):
    """A same-size copy of `model` whose consumers ignore the units `keep` drops.

    Every Dense/Conv input row fed by a removed unit of `groups`
    (`tfs.surgery.channel_groups(model)`) is zeroed: the masked model the
    physically smaller one must equal.
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    masks = groups.keep_masks(keep)
    by_name = {l.name: l for l in copy.layers}
    for key, (layer, kind, _, _) in groups.layers.items():
        inp = masks[key][0]
        if kind == "producer" and not inp.all():
            target = by_name[layer.name]
            weights = target.get_weights()
            weights[0][..., ~inp, :] = 0
            target.set_weights(weights)
    return copy


def small_sparse_model(kind="str", seed=3):
    """A small MNIST-1D CNN, compiled: STR-wrapped with SGD (`kind="str"`) or
    with GSM at compression 10 (`kind="gsm"`). Used by the distributed tests and
    their worker processes, which must build the same model."""
    import tf_sparsity as tfs

    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    base = tfs.zoo.mnist1d_cnn(filters=8, hidden=32)
    if kind == "str":
        model = tfs.soft_threshold(base, s_init=-4.0, weight_decay=1e-3)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), loss, metrics=["accuracy"])
    else:
        model = base
        model.compile(tfs.optimizers.GlobalSparseMomentum(0.02, momentum=0.9, nesterov=True, compression=10),
                      loss, metrics=["accuracy"])
    return model


def assert_same_state(a, b, rtol=1e-5, atol=1e-6, optimizer=False):
    """Assert two models hold the same weights (and optimizer variables if asked)."""
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=rtol, atol=atol, err_msg=x.path)
    if optimizer:
        for x, y in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=rtol, atol=atol, err_msg=x.path)


def fit_single_and_mirrored(build, strategy, x, y, epochs=2, batch_size=64, **fit_kwargs):
    """Train `build()` once on one device and once under a 2-replica `strategy`.

    Both runs see the same batches in the same order (no shuffling); `fit_kwargs`
    (callbacks, say) go to the mirrored run only. Returns (single, mirrored).
    """
    import tensorflow as tf

    assert len(tf.config.list_logical_devices("CPU")) >= 2
    assert strategy.num_replicas_in_sync == 2
    single = build()
    single.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0)
    with strategy.scope():
        mirrored = build()
    mirrored.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0, **fit_kwargs)
    return single, mirrored
