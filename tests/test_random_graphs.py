"""Random Keras functional graphs through the whole chain.

A small grammar (Dense / Conv1D / DepthwiseConv1D / SeparableConv1D /
MultiHeadAttention / TimeDistributed / BatchNormalization /
LayerNormalization blocks, operators and `keras.ops` calls, gates, channel
slices, residual merges, concatenation, a nested functional block) generates models from a seed. Each must go wrap -> one
train step -> strip (outputs equal the wrapped model) -> `.keras` round trip
(identical) -> LiteRT float (<= 1e-5), or be refused with one named error.
"""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs

STEPS, WIDTH = 8, 8


def _block(rng, x):
    choice = rng.integers(12)
    c = x.shape[-1]
    if choice == 0:
        return keras.layers.Dense(int(rng.choice([4, 8, 12])))(x)
    if choice == 1:
        return keras.layers.Conv1D(int(rng.choice([4, 8])), 3, padding="same")(x)
    if choice == 2:
        return keras.layers.DepthwiseConv1D(3, padding="same")(x)
    if choice == 3:
        return keras.layers.SeparableConv1D(8, 3, padding="same")(x)
    if choice == 4:
        return x + keras.layers.MultiHeadAttention(2, 4)(x, x)
    if choice == 5:
        norm = keras.layers.BatchNormalization if rng.integers(2) else keras.layers.LayerNormalization
        return norm()(x)
    if choice == 6:  # operators and keras.ops calls
        op = [keras.ops.tanh, keras.ops.relu, keras.activations.gelu, keras.activations.relu,
              lambda t: t * 0.5 - 0.1][rng.integers(5)]
        return op(x)
    if choice == 7:  # residual
        return x + keras.layers.Dense(c)(keras.ops.relu(x))
    if choice == 8:
        return keras.layers.Concatenate()([x, keras.layers.Dense(4)(x)])
    if choice == 9:  # a gate between tensors
        return x * keras.ops.sigmoid(keras.layers.Dense(c)(x))
    if choice == 10:  # slicing channels
        return x[..., : max(1, c // 2)]
    return keras.layers.TimeDistributed(keras.layers.Dense(8))(x)


def random_model(seed):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((STEPS, 1))
    x = keras.layers.Dense(WIDTH)(inputs)
    for _ in range(int(rng.integers(2, 6))):
        x = _block(rng, x)
    if rng.integers(3) == 0:  # a nested functional block
        inner_in = keras.Input(x.shape[1:])
        inner = keras.Model(inner_in, keras.layers.Dense(WIDTH, activation="relu")(inner_in))
        x = inner(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name=f"random_{seed}")


X = np.random.default_rng(1).normal(size=(32, STEPS, 1)).astype("float32")
Y = np.random.default_rng(2).integers(0, 3, 32)


def check_chain(seed, tmp_path):
    """The chain for one generated model; raises on the first broken link."""
    keras.utils.set_random_seed(seed)
    sparse = tfs.soft_threshold(random_model(seed), s_init=-2.0)
    sparse.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sparse.fit(X, Y, epochs=1, batch_size=32, verbose=0)
    expected = sparse.predict(X, verbose=0)
    plain = tfs.strip(sparse)
    np.testing.assert_allclose(plain.predict(X, verbose=0), expected, atol=1e-5)
    path = tmp_path / f"{seed}.keras"
    plain.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path).predict(X, verbose=0), plain.predict(X, verbose=0))
    result = tfs.export.convert(plain, target="litert", representative_data=X[:8])
    assert result.report.verification["max_abs_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(25))
def test_random_graph_chain(seed, tmp_path):
    check_chain(seed, tmp_path)
