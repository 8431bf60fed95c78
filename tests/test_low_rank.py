"""Low-rank STR cells: math, learned rank, strip, summary, save/load, steering, export."""


import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from support import compile_sgd, random_like
from tf_sparsity.layers import low_rank as lr
from tf_sparsity.layers.low_rank import factorized

KINDS = {
    "gru": (lr.LowRankGRU, lr.LowRankGRUCell, lr.FactorizedGRUCell),
    "lstm": (lr.LowRankLSTM, lr.LowRankLSTMCell, lr.FactorizedLSTMCell),
    "fastgrnn": (lr.FastGRNN, lr.FastGRNNCell, lr.FactorizedFastGRNNCell),
}
STEPS, FEATURES, UNITS = 12, 3, 8


def sequences(n=4, steps=STEPS, features=FEATURES, seed=0):
    return random_like((n, steps, features), seed=seed)


def model_with(layer, steps=STEPS, features=FEATURES, batch_size=None):
    inputs = keras.Input((steps, features), batch_size=batch_size)
    return keras.Model(inputs, keras.layers.Dense(5)(layer(inputs)))


def spread(layer, ratio=0.6):
    """Give each matrix a decaying spectrum (orthogonal inits are flat: all ties)."""
    for matrix in layer.cell.matrices():
        sigma = matrix.sigma.numpy()
        matrix.sigma.assign(sigma * ratio ** np.arange(len(sigma)))


def prune_some(layer, logit=-0.3):
    """Spread the spectra, then raise the thresholds to g = 0.43 x RMS magnitude."""
    spread(layer)
    for matrix in layer.cell.matrices():
        matrix.threshold_logit.assign(logit)


@pytest.mark.parametrize("cls", [keras.layers.GRU, keras.layers.LSTM])
def test_dense_factorized_cells_are_keras_cells(cls):
    # Ranks None = dense: the deployable cells reproduce Keras' math exactly.
    x = sequences()
    reference = cls(6)
    expected = reference(x)
    cell_cls = lr.FactorizedGRUCell if cls is keras.layers.GRU else lr.FactorizedLSTMCell
    ours = keras.layers.RNN(cell_cls(6))
    ours(x)
    ours.set_weights(reference.get_weights())
    np.testing.assert_allclose(ours(x), expected, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cell_is_its_dense_matrices_and_strip_keeps_outputs(kind):
    layer_cls, cell_cls, factorized_cls = KINDS[kind]
    layer = layer_cls(UNITS, max_rank=(None, 6))
    model = model_with(layer)
    prune_some(layer)
    x = sequences()
    rows = {"gru": 3, "lstm": 4, "fastgrnn": 1}[kind] * UNITS
    assert layer.max_ranks() == (FEATURES, 6)
    input_rank, recurrent_rank = layer.ranks()
    assert 1 <= recurrent_rank < 6  # some components thresholded away, none collapsed
    # The STR cell equals a dense cell holding W = Û diag(S(σ̃)) V̂ᵀ.
    dense = keras.layers.RNN(factorized_cls(UNITS))
    dense(x)
    matrices = [m.dense_matrix() for m in layer.cell.matrices()]
    assert matrices[1].shape == (UNITS, rows)
    assert np.linalg.matrix_rank(matrices[1], tol=1e-5) == recurrent_rank
    dense.set_weights(matrices + [getattr(layer.cell, n).numpy() for n in layer.cell.bias_names])
    np.testing.assert_allclose(dense(x), layer(x), atol=1e-5)
    # strip: plain RNN, rank-r factors (or dense where smaller), same outputs.
    plain = tfs.strip(model)
    rnn = plain.layers[1]
    assert type(rnn) is keras.layers.RNN and isinstance(rnn.cell, factorized_cls)
    assert rnn.cell.recurrent_rank == recurrent_rank
    shapes = [tuple(w.shape) for w in rnn.cell.recurrent_weights]
    assert shapes == [(UNITS, recurrent_rank), (recurrent_rank, rows)]
    assert not any("threshold" in w.name for w in plain.weights)
    np.testing.assert_allclose(plain(x), model(x), atol=1e-5)


def test_pruned_components_get_no_loss_gradient_and_decay_is_coupled():
    layer = lr.LowRankGRU(UNITS, max_rank=(None, 6), weight_decay=1e-2)
    model = model_with(layer)
    prune_some(layer)
    matrix = layer.cell.recurrent_matrix
    pruned = keras.ops.convert_to_numpy(matrix.thresholded_sigma()) == 0
    assert pruned.any() and not pruned.all()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(sequences())))
    grad_sigma, grad_s = tape.gradient(loss, [matrix.sigma, matrix.threshold_logit])
    assert np.all(grad_sigma.numpy()[pruned] == 0) and np.any(grad_sigma.numpy()[~pruned] != 0)
    assert grad_s.numpy() != 0  # the threshold learns from the loss
    # Coupled L2 through the losses: wd/2 (|U|^2 + |σ|^2 + |Vᵀ|^2 + s^2) per matrix,
    # plus the orthogonality penalty on U and Vᵀ.
    expected = 0.0
    for m in layer.cell.matrices():
        expected += 0.5e-2 * sum(float(np.sum(np.square(v.numpy())))
                                 for v in (m.u, m.sigma, m.vt, m.threshold_logit))
    penalty = float(sum(model.losses))
    orth = sum(float(lr.FactorRegularizer(0, m.orthogonality, axis)(v))
               for m in layer.cell.matrices() for axis, v in ((0, m.u), (1, m.vt)))
    np.testing.assert_allclose(penalty, expected + orth, rtol=1e-5)


def test_orthogonality_penalty():
    reg = lr.FactorRegularizer(orthogonality=1.0, axis=0)
    assert float(reg(np.eye(4, 3, dtype="float32"))) == pytest.approx(0.0, abs=1e-7)
    # Two equal unit columns: off-diagonal entries (1, 1) -> penalty 2.
    assert float(reg(np.ones((3, 2), "float32"))) == pytest.approx(2.0, rel=1e-5)
    rows = lr.FactorRegularizer(orthogonality=1.0, axis=1)
    assert float(rows(np.ones((2, 3), "float32"))) == pytest.approx(2.0, rel=1e-5)


def test_summary_reports_ranks_params_and_macs():
    layer = lr.LowRankGRU(16, max_rank=(None, 8))
    model = model_with(layer, steps=40, features=1)
    prune_some(layer)
    rank = layer.ranks()[1]
    report = tfs.summary(model, print_fn=None)
    row = next(r for r in report.layers if r.name == layer.name)
    assert row.rank == f"1/1, {rank}/8"
    dense_entries = 1 * 48 + 16 * 48
    stored = 48 + rank * (16 + 48)  # the 1x48 input matrix stays dense
    assert (row.prunable, row.nonzeros) == (dense_entries, stored)
    assert (row.flops, row.effective_flops) == (40 * dense_entries, 40 * stored)
    trained = 1 + 1 + 48 + 16 * 8 + 8 + 8 * 48 + 2 * 48  # u, σ, vt of both matrices, biases
    assert row.params == trained
    assert "rank" in str(report)
    # The stripped cell reports the same effective numbers.
    stripped = layer.stripped_layer()
    plain_row = tfs.summarize.layer_report(stripped)  # an RNN reports through its cell
    assert plain_row.rank == f"1/1 dense, {rank}/16"  # its limit is the full rank
    assert plain_row.params == stored + 2 * 48


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_keras_round_trip(kind, tmp_path):
    layer_cls, cell_cls, _ = KINDS[kind]
    inputs = keras.Input((STEPS, FEATURES))
    convenience = layer_cls(UNITS, max_rank=(2, 5), weight_decay=1e-4, threshold_fn="exponential",
                            return_sequences=True, name="lowrank")
    plain_rnn = keras.layers.RNN(cell_cls(UNITS, max_rank=4, learn_threshold=False), name="rnn")
    model = keras.Model(inputs, keras.layers.Dense(3)(plain_rnn(convenience(inputs))))
    prune_some(convenience, logit=-1.0)
    x = sequences()
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    again = loaded.get_layer("lowrank")
    assert type(again) is layer_cls and again.ranks() == convenience.ranks()
    assert again.cell.input_matrix.threshold_fn is tfs.ops.THRESHOLD_FUNCTIONS["exponential"]
    assert not loaded.get_layer("rnn").cell.recurrent_matrix.threshold_logit.trainable
    # A plain RNN(cell) strips through `stripped_rnn`; the stripped model round-trips too.
    stripped = lr.stripped_rnn(loaded.get_layer("rnn"))
    assert isinstance(stripped.cell, KINDS[kind][2])
    plain = tfs.strip(keras.Model(inputs, convenience(inputs)))
    plain.save(tmp_path / "p.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "p.keras")(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("max_rank", [0, -1, 2.5, True, (1, 2, 3), "4"])
def test_bad_max_rank_is_named(max_rank):
    with pytest.raises(ValueError, match="max_rank"):
        lr.LowRankGRUCell(UNITS, max_rank=max_rank)


def test_max_rank_above_matrix_rank_is_named():
    cell = lr.LowRankLSTMCell(UNITS, max_rank=(None, UNITS + 1))
    with pytest.raises(ValueError, match=r"max_rank.*recurrent.*<= min\(8, 32\) = 8"):
        keras.layers.RNN(cell)(sequences())
    # A 1-feature input has rank 1: an int max_rank > 1 must say so.
    with pytest.raises(ValueError, match=r"max_rank.*input matrix \(1x24\)"):
        lr.LowRankGRU(UNITS, max_rank=4)(sequences(features=1))
    with pytest.raises(ValueError, match="units"):
        lr.LowRankGRU(0)
    # Export needs a static sequence length to unroll; tracing says so clearly.
    layer = lr.LowRankGRU(UNITS, max_rank=(None, 4))
    layer(sequences())
    unrolled = layer.stripped_layer(unroll=True)
    with pytest.raises(ValueError, match="Cannot unroll a RNN if the time dimension is undefined"):
        tf.function(unrolled).get_concrete_function(tf.TensorSpec((1, None, FEATURES)))
    with pytest.raises(ValueError, match="recurrent_rank"):
        lr.FactorizedGRUCell(UNITS, recurrent_rank=-1)


@pytest.mark.slow
def test_mixed_float16_trains_with_float32_thresholds():
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = lr.FastGRNN(UNITS, max_rank=(None, 4), weight_decay=1e-4)
    model = model_with(layer)
    x, y = sequences(16), np.arange(16) % 5
    assert model(x).dtype == "float16"
    matrix = layer.cell.recurrent_matrix
    assert matrix.u.dtype == "float32" and matrix.threshold().dtype == "float32"
    compile_sgd(model, lr=0.01).fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(model(x).numpy().astype("float32")).all()
    plain = tfs.strip(model)
    np.testing.assert_allclose(plain(x).numpy().astype("float32"), model(x).numpy().astype("float32"),
                               atol=2e-2)


def test_steering_to_a_rank_with_the_shared_solver():
    layer = lr.LowRankGRU(16, max_rank=(None, 16), threshold_fn="exponential", s_init=-10.0,
                          learn_threshold=False)
    model = model_with(layer, features=1)
    spread(layer, 0.9)
    # The 1x48 input matrix has rank 1: steering leaves it out (it could only collapse).
    matrices = lr.thresholded_matrices(model)
    assert [m.role for m in matrices] == ["recurrent"]
    offset, collapsed = tfs.callbacks.solve_threshold_offset(matrices, 0.75)
    for m in matrices:
        m.threshold_offset.assign(offset)
    # ±1: the solver's offset lands on a magnitude boundary (see docs/low_rank.md).
    assert layer.ranks()[0] == 1 and abs(layer.ranks()[1] - 4) <= 1 and not collapsed


@pytest.mark.slow
def test_target_sparsity_callback_steers_rank_during_fit():
    layer = lr.LowRankGRU(16, max_rank=(None, 16), threshold_fn="exponential", s_init=-10.0,
                          learn_threshold=False)
    model = compile_sgd(model_with(layer, features=1), lr=0.01)
    spread(layer, 0.9)
    x, y = sequences(32, features=1), np.arange(32) % 5
    callback = tfs.callbacks.TargetSparsity(0.5, end_step=4, update_every=1)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    assert layer.ranks()[0] == 1 and abs(layer.ranks()[1] - 8) <= 1


def test_target_sparsity_finds_rnn_matrices_natively():
    model = model_with(lr.LowRankGRU(16, max_rank=(None, 16)), features=1)
    callback = tfs.callbacks.TargetSparsity(0.5)
    callback.set_model(model)
    found = callback._wrappers()
    assert [m.role for m in found] == ["recurrent"]


@pytest.mark.slow
def test_mirrored_strategy_fit(mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        layer = lr.LowRankLSTM(UNITS, max_rank=(None, 4), weight_decay=1e-4)
        model = compile_sgd(model_with(layer), lr=0.01)
    x, y = sequences(16), np.arange(16) % 5
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# -- export: unrolled, full int8, LiteRT reference kernels vs TFLM ----------

def _int8_tflite(model, calibration):
    """Full-int8, builtins-only .tflite of a static-shape Keras model.

    Kept small on purpose: `tfs.export.convert(..., target="tflm")` should
    own this (ExportArchive -> from_concrete_functions -> int8 converter).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec(model.inputs[0].shape, tf.float32)
    fn = archive.add_endpoint("serve", lambda x: model(x, training=False), [spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], archive)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter.representative_dataset = lambda: ([sample[None]] for sample in calibration)
    return converter.convert()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_stripped_unrolled_int8_runs_on_litert_and_tflm(kind):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    layer = KINDS[kind][0](UNITS, max_rank=(None, 4))
    model = model_with(layer, steps=40, features=1)
    prune_some(layer)
    # Static batch 1 and sequence length 40: the unrolled RNN is plain ops.
    inputs = keras.Input((40, 1), batch_size=1)
    deployable = keras.Model(inputs, model.layers[-1](layer.stripped_layer(unroll=True)(inputs)))
    x = sequences(33, steps=40, features=1, seed=3)
    np.testing.assert_allclose(deployable(x[:1]), model(x[:1]), atol=1e-5)
    blob = _int8_tflite(deployable, x[1:])

    reference = Interpreter(model_content=blob, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    reference.allocate_tensors()
    op_list = [op["op_name"] for op in reference._get_ops_details()]
    ops = set(op_list)
    # The cell's projections are 1x1 CONV_2D (the export form); only the Dense head is FULLY_CONNECTED.
    assert "WHILE" not in ops and "CONV_2D" in ops and op_list.count("FULLY_CONNECTED") == 1
    assert not {"DEQUANTIZE", "QUANTIZE"} & ops  # int8 end to end
    inp, out = reference.get_input_details()[0], reference.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    scale, zero = inp["quantization"]
    micro = runtime.Interpreter.from_bytes(blob)
    for sample in x[:3]:
        q = np.clip(np.round(sample[None] / scale + zero), -128, 127).astype(np.int8)
        reference.set_tensor(inp["index"], q)
        reference.invoke()
        expected = reference.get_tensor(out["index"]).astype(int)
        micro.set_input(q, 0)
        micro.invoke()
        got = micro.get_output(0).astype(int)
        assert np.abs(got - expected).max() <= 1  # within one quantization step


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conv_projection_is_the_same_cell(kind, tmp_path):
    # projection="conv" (the int8 export form) changes the ops, not the weights or outputs.
    layer = KINDS[kind][0](UNITS, max_rank=(None, 4))
    model_with(layer)  # builds the layer
    prune_some(layer)
    x = sequences()
    plain = layer.stripped_layer()
    conv = layer.stripped_layer(projection="conv")
    assert (plain.cell.projection, conv.cell.projection) == ("matmul", "conv")
    assert layer.stripped_layer(unroll=True).cell.projection == "conv"  # unrolled = export form
    np.testing.assert_allclose(conv(x), plain(x), atol=1e-5)
    np.testing.assert_allclose(conv(x), layer(x), atol=1e-5)
    again = keras.layers.RNN.from_config(conv.get_config())
    assert again.cell.projection == "conv"
    with pytest.raises(ValueError, match="projection"):
        KINDS[kind][2](UNITS, projection="dense")


def test_conv_projection_is_bit_exact_on_tflm_and_litert_reference():
    # The property the export form relies on: one int8 1x1 CONV_2D computes the
    # same on tflite-micro as on LiteRT's reference kernels (their int8
    # FULLY_CONNECTED kernels round differently: docs/low_rank.md).
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    keras.utils.set_random_seed(0)
    weights = np.random.default_rng(0).normal(size=(32, 96)).astype("float32")
    inputs = keras.Input((32,), batch_size=1)
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: factorized._conv_matmul(t, weights))(inputs))
    x = np.random.default_rng(1).normal(size=(100, 32)).astype("float32")
    np.testing.assert_allclose(model(x[:1]), x[:1] @ weights, rtol=1e-5, atol=1e-4)
    blob = _int8_tflite(model, x)
    reference = Interpreter(model_content=blob, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    reference.allocate_tensors()
    assert "CONV_2D" in {op["op_name"] for op in reference._get_ops_details()}
    inp, out = reference.get_input_details()[0], reference.get_output_details()[0]
    scale, zero = inp["quantization"]
    micro = runtime.Interpreter.from_bytes(blob)
    for sample in x:
        q = np.clip(np.round(sample[None] / scale + zero), -128, 127).astype(np.int8)
        reference.set_tensor(inp["index"], q)
        reference.invoke()
        micro.set_input(q, 0)
        micro.invoke()
        np.testing.assert_array_equal(micro.get_output(0), reference.get_tensor(out["index"]))


@pytest.mark.slow
def test_export_convert_uses_the_conv_form_for_tflm():
    layer = lr.LowRankGRU(UNITS, max_rank=(None, 4))
    model = model_with(layer, steps=16, features=1)
    prune_some(layer)
    x = sequences(40, steps=16, features=1, seed=5)
    result = tfs.export.convert(model, target="tflm", representative_data=x, recurrent="unroll")
    ops = result.report.ops
    assert "WHILE" not in ops and ops.get("CONV_2D", 0) > 0 and ops.get("FULLY_CONNECTED", 0) == 1
    assert result.report.tflm["max_diff_vs_reference_steps"] <= 1
