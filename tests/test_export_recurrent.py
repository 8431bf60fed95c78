"""Recurrent export forms (issue 14): step / loop / fused / unroll on the real runtimes."""

import doctest
import os
import pathlib
import subprocess

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
import tf_sparsity.export  # noqa: F401
from tf_sparsity.export import recurrent
from tf_sparsity.export.recurrent import step_export
from tf_sparsity.layers import low_rank as lr

STEPS, FEATURES = 12, 2


def seqs(n=40, steps=STEPS, features=FEATURES, seed=0):
    return np.random.default_rng(seed).normal(size=(n, steps, features)).astype("float32")


def chain(*layers, steps=STEPS, features=FEATURES):
    return keras.Sequential([keras.Input((steps, features)), *layers])


CELLS = {
    "gru": lambda: keras.layers.GRU(8),
    "lstm": lambda: keras.layers.LSTM(8),
    "simple_rnn": lambda: keras.layers.SimpleRNN(8),
    "lowrank_gru": lambda: lr.LowRankGRU(8, max_rank=(None, 2)),
    "fastgrnn": lambda: lr.FastGRNN(8, max_rank=(None, 2)),
    "factorized_lstm": lambda: keras.layers.RNN(lr.FactorizedLSTMCell(8, recurrent_rank=2)),
}


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_float_step_model_on_litert_equals_keras(kind):
    model = chain(CELLS[kind](), keras.layers.Dense(3))
    x = seqs()
    result = tfs.export.convert(model, target="litert", recurrent="step", representative_data=x)
    assert result.report.recurrent["form"] == "step"
    assert "WHILE" not in result.report.ops
    np.testing.assert_allclose(result.run_sequence(x[:5]), model(x[:5]), atol=1e-4)
    assert result.report.verification["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("kind", [pytest.param("gru", marks=pytest.mark.slow), "lstm",
                                  pytest.param("lowrank_gru", marks=pytest.mark.slow),
                                  pytest.param("fastgrnn", marks=pytest.mark.slow)])
def test_int8_step_model_runs_on_tflm_with_identical_state_quantization(kind, tmp_path):
    model = chain(CELLS[kind](), keras.layers.Dense(3))
    x = seqs()
    path = tmp_path / "rnn.tflite"
    result = tfs.export.convert(model, target="tflm", representative_data=x, path=path, step_head="separate")
    rec = result.report.recurrent
    # The head (Dense) is its own model, run once per sequence on the final state h.
    assert result.head is not None and rec["head"] == {"state": 0, "model": True, "bytes": len(result.head)}
    assert rec["file_bytes"] == len(result.tflite) + len(result.head)
    assert result.report.tflm["arena_bytes"] == (result.report.tflm["step_arena_bytes"]
                                                 + result.report.tflm["head_arena_bytes"])
    info, head = tfs.export.inspect(result.tflite), tfs.export.inspect(result.head)
    assert info.recurrent["form"] == "step" and "recurrent form: step" in str(info)
    assert head.recurrent["form"] == "head" and head.op_counts == {"FULLY_CONNECTED": 1}
    n_states = 2 if kind == "lstm" else 1
    assert len(info.inputs) == 1 + n_states and len(info.outputs) == n_states
    for k in range(n_states):  # carrying a state is a memcpy, and so is handing h to the head
        assert info.inputs[1 + k].quantization == info.outputs[k].quantization
        # int8, or int16 where the exporter measured int8 states losing predictions
        assert info.inputs[1 + k].dtype == rec["state_dtype"] == rec["state_dtype_choice"]["chosen"]
        assert info.inputs[1 + k].dtype in ("int8", "int16")
    assert head.inputs[0].quantization == info.outputs[0].quantization
    # Every op reading a state rescales from its input's parameters: no requantizing op per step.
    # (A factorized cell's joint product concatenates x_t with h·U: at most one QUANTIZE brings x_t to that scale.)
    assert info.op_counts.get("QUANTIZE", 0) <= info.op_counts.get("CONCATENATION", 0)
    assert all(s["retargeted"] or not s["requantized"] for s in rec["states"])
    # The result runs whole sequences on tflite-micro; int8 stays close to Keras.
    got = result.run_sequence(x[:8])
    want = np.asarray(model(x[:8]))
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < 0.1 * max(1.0, np.max(np.abs(want)))
    assert result.report.tflm["arena_bytes"] < 16 * 1024
    assert rec["state_quantization"]["dtype"] == rec["state_dtype"]
    assert rec["per_sequence_agreement"]["tflm_vs_litert_reference_max_steps"] <= 4
    # C files: model array + the documented C++ loop over time steps.
    cc, h, loop, head_cc, head_h = (pathlib.Path(p) for p in result.c_files)
    text = loop.read_text()
    assert loop.name == "rnn_sequence.h" and "Invoke()" in text and "memmove" in text
    assert f"#define G_RNN_STEPS {STEPS}" in text and f"G_RNN_NUM_STATES {n_states}" in text
    assert "head.Invoke()" in text and "g_rnn_head_model_data" in head_cc.read_text()
    assert "G_RNN_HEAD_MODEL_DATA_ARENA_BYTES" in head_h.read_text()
    assert (tmp_path / "rnn_head.tflite").read_bytes() == result.head
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.slow
def test_int16_states_are_chosen_when_int8_loses_predictions(monkeypatch):
    score = step_export._score

    def int8_loses(tflite, meta, check, want, head=None):  # pretend int8 states lose half the predictions
        result = score(tflite, meta, check, want, head)
        if meta["input"]["dtype"] == "int8":
            result.update(ok=False, score=0.5)
        return result

    monkeypatch.setattr(step_export, "_score", int8_loses)
    model = chain(keras.layers.LSTM(8), keras.layers.Dense(3))
    x = seqs()
    result = tfs.export.convert(model, target="tflm", representative_data=x, step_head="separate")
    choice = result.report.recurrent["state_dtype_choice"]
    assert choice["chosen"] == "int16" and "int16" in choice["measured"]
    assert [t.dtype for t in result.inspect().inputs] == ["int16", "int16", "int16"]
    assert [t.dtype for t in tfs.export.inspect(result.head).inputs] == ["int16"]
    got, want = result.run_sequence(x[:4]), np.asarray(model(x[:4]))
    assert np.max(np.abs(got - want)) < 0.02 * max(1.0, np.max(np.abs(want)))
    edgetpu = tfs.export.convert(model, target="edgetpu", representative_data=x, verify=False)
    assert edgetpu.report.recurrent["state_dtype"] == "int8"  # the EdgeTPU runs int8 only


@pytest.mark.slow
def test_step_file_does_not_grow_with_the_sequence():
    sizes = []
    for steps in (10, 40):
        model = chain(keras.layers.GRU(8), keras.layers.Dense(3), steps=steps)
        keras.utils.set_random_seed(0)
        # target="edgetpu" pins int8 states: the int8/int16 choice must not differ between the lengths.
        result = tfs.export.convert(model, target="edgetpu", representative_data=seqs(steps=steps), verify=False)
        assert result.report.recurrent["form"] == "step"
        sizes.append(len(result.tflite))
    # Only the metadata differs: the recorded length and the scales as JSON text (the joined head's output
    # scale is calibrated on other data); unrolled, 30 more steps would add kilobytes.
    assert abs(sizes[0] - sizes[1]) <= 64


@pytest.mark.slow
def test_head_once_per_sequence_matches_the_head_at_every_step():
    model = chain(keras.layers.GRU(8), keras.layers.Dense(3))
    x = seqs()
    split = tfs.export.convert(model, target="tflm", representative_data=x, step_head="separate")
    joined = tfs.export.convert(model, target="tflm", representative_data=x)  # the default: step_head="joined"
    assert joined.head is None and "head" not in joined.report.recurrent
    assert "step_arena_bytes" not in joined.report.tflm and joined.report.recurrent["file_bytes"] == len(joined.tflite)
    assert len(joined.inspect().outputs) == 2 and joined.inspect().op_counts["FULLY_CONNECTED"] == \
        split.inspect().op_counts["FULLY_CONNECTED"] + 1
    want = np.asarray(model(x[:8]))
    assert np.max(np.abs(joined.run_sequence(x[:8]) - want)) < 0.1 * max(1.0, np.max(np.abs(want)))
    a, b = split.run_sequence(x[:8]), joined.run_sequence(x[:8])
    assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) >= 0.75 and np.max(np.abs(a - b)) < 0.1
    with pytest.raises(ValueError, match="head=result.head"):
        recurrent.run_sequence(split.tflite, x[:2])
    # Nothing after the recurrent layer: no head model either way, the output is the final state.
    only_rnn = chain(keras.layers.GRU(4))
    for step_head in recurrent.STEP_HEADS:
        bare = tfs.export.convert(only_rnn, target="litert", recurrent="step", representative_data=x,
                                  step_head=step_head)
        assert bare.head is None and bare.report.recurrent["head"]["model"] is False
        assert len(bare.inspect().outputs) == 1
        np.testing.assert_allclose(bare.run_sequence(x[:3]), only_rnn(x[:3]), atol=1e-4)


@pytest.mark.slow
def test_default_step_head_is_joined_and_matches_keras(tmp_path):
    model = chain(keras.layers.LSTM(6), keras.layers.Dense(3))
    x = seqs()
    result = tfs.export.convert(model, target="litert", recurrent="step", representative_data=x,
                                path=tmp_path / "m.tflite")
    assert result.head is None and "head" not in result.report.recurrent
    assert not (tmp_path / "m_head.tflite").exists()
    np.testing.assert_allclose(result.run_sequence(x[:5]), model(x[:5]), atol=1e-4)
    with pytest.raises(ValueError, match="`step_head` must be one of"):
        tfs.export.convert(model, recurrent="step", step_head="split")
    # Other forms ignore it, and say so.
    loop = tfs.export.convert(model, target="litert", step_head="separate")
    assert loop.report.recurrent["form"] == "loop" and any("step_head" in n for n in loop.report.notes)


def test_factorized_cells_keep_their_factors_in_the_step_model():
    layer = lr.LowRankGRU(16, max_rank=(None, 2))
    model = chain(layer, keras.layers.Dense(3))
    result = tfs.export.convert(model, target="tflm", representative_data=seqs(), verify=False)
    shapes = [t.shape for t in result.inspect().tensors if t.constant and t.dtype == "int8"]
    assert any(2 in s and 16 in s and len(s) == 2 for s in shapes)   # U [16, 2] or V [2, 16]
    assert not any(s == (48, 16) or s == (16, 48) for s in shapes)  # never U·V


def test_stacked_and_sequence_output_heads():
    model = chain(keras.layers.GRU(6, return_sequences=True), keras.layers.Dropout(0.1),
                  keras.layers.LSTM(5, return_sequences=True), keras.layers.Dense(3))
    x = seqs()
    result = tfs.export.convert(model, target="litert", recurrent="step", representative_data=x)
    assert len(result.report.recurrent["states"]) == 3
    got = result.run_sequence(x[:3])
    assert got.shape == (3, STEPS, 3)  # documented: one output per step
    np.testing.assert_allclose(got, model(x[:3]), atol=1e-4)


def test_stateful_layer_step_form_carries_state_explicitly():
    inputs = keras.Input((STEPS, FEATURES), batch_size=1)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GRU(4, stateful=True)(inputs)))
    x = seqs(8)
    result = tfs.export.convert(model, target="litert", representative_data=x)  # auto -> step
    assert result.report.recurrent["form"] == "step"
    with pytest.raises(ValueError, match="stateful.*recurrent='step'"):
        tfs.export.convert(model, target="litert", recurrent="unroll", representative_data=x)


def test_edgetpu_preflight_passes_for_the_step_gru():
    model = chain(keras.layers.GRU(8), keras.layers.Dense(3))
    result = tfs.export.convert(model, target="edgetpu", representative_data=seqs(), verify=False)
    assert result.report.recurrent["form"] == "step"
    assert result.report.preflight.first_fallback is None


@pytest.mark.slow
def test_loop_is_float_only_and_auto_keeps_litert_whole_sequence():
    model = chain(keras.layers.GRU(8), keras.layers.Dense(3))
    x = seqs()
    loop = tfs.export.convert(model, target="litert")
    assert loop.report.recurrent["form"] == "loop" and "WHILE" in loop.report.ops
    assert loop.inspect().recurrent["form"] == "loop"
    with pytest.raises(ValueError, match="float only.*'step' or 'unroll'"):
        tfs.export.convert(model, target="tflm", representative_data=x, recurrent="loop")
    with pytest.raises(ValueError, match="`recurrent` must be one of"):
        tfs.export.convert(model, recurrent="scan")


@pytest.mark.parametrize("build, message", [
    (lambda: chain(keras.layers.Bidirectional(keras.layers.GRU(4)), keras.layers.Dense(2)), "Bidirectional"),
    (lambda: chain(keras.layers.GRU(4, return_sequences=True), keras.layers.Flatten(), keras.layers.Dense(2)),
     "return_sequences=True"),
    (lambda: chain(keras.layers.GRU(4, go_backwards=True), keras.layers.Dense(2)), "go_backwards"),
    (lambda: chain(keras.layers.Conv1D(4, 3), keras.layers.GRU(4), keras.layers.Dense(2)), "mixes time steps"),
])
def test_step_form_refuses_with_the_reason(build, message):
    with pytest.raises(ValueError, match=message):
        tfs.export.convert(build(), target="tflm", representative_data=seqs(), recurrent="step")


def test_unsupported_cell_and_unknown_length_are_named():
    class MatrixStateCell(keras.layers.Layer):
        state_size = [(2, 2)]
        output_size = 4

        def call(self, x, states):
            return keras.ops.zeros((keras.ops.shape(x)[0], 4)), states

    model = chain(keras.layers.RNN(MatrixStateCell()), keras.layers.Dense(2))
    with pytest.raises(ValueError, match="state_size.*expected an int"):
        tfs.export.convert(model, target="tflm", representative_data=seqs(), recurrent="step")
    unknown = keras.Sequential([keras.Input((None, FEATURES)), keras.layers.GRU(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="sequence length is unknown.*input_shape"):
        tfs.export.convert(unknown, target="litert", recurrent="step")
    result = tfs.export.convert(unknown, target="litert", recurrent="step", input_shape=(7, FEATURES))
    assert result.report.recurrent["steps"] == 7


def test_auto_unrolls_for_tflm_when_step_is_impossible():
    model = chain(keras.layers.Bidirectional(keras.layers.SimpleRNN(4)), keras.layers.Dense(2), steps=6)
    result = tfs.export.convert(model, target="tflm", representative_data=seqs(steps=6), verify=False)
    assert result.report.recurrent["form"] == "unroll" and "Bidirectional" in result.report.recurrent["reason"]


def test_run_sequence_rejects_non_step_models():
    model = chain(keras.layers.GRU(4), keras.layers.Dense(2))
    loop = tfs.export.convert(model)
    with pytest.raises(ValueError, match="not a step model"):
        recurrent.run_sequence(loop.tflite, seqs(2))


def _baseline_python():
    python = recurrent.baseline_python()
    ok = subprocess.run([python, "-c", "import tf_keras"], capture_output=True).returncode == 0
    return python if ok else None


@pytest.mark.slow
@pytest.mark.skipif(_baseline_python() is None, reason="no tf_keras: set TF_SPARSITY_BASELINE_PYTHON")
def test_fused_lstm_runs_int8_on_tflm():
    model = chain(keras.layers.LSTM(8), keras.layers.Dense(3))
    result = tfs.export.convert(model, target="tflm", representative_data=seqs(), recurrent="fused")
    assert result.report.ops.get("UNIDIRECTIONAL_SEQUENCE_LSTM") == 1
    assert result.inspect().recurrent["form"] == "fused"
    assert result.report.tflm["max_diff_vs_reference_steps"] <= 2
    with pytest.raises(ValueError, match="LSTM layers only"):
        tfs.export.convert(chain(keras.layers.GRU(4)), target="tflm", representative_data=seqs(), recurrent="fused")


def test_docstring_examples():
    failures, _ = doctest.testmod(recurrent, optionflags=doctest.ELLIPSIS)
    assert failures == 0


@pytest.mark.slow
def test_cli_prune_lowrank_makes_a_low_rank_rnn(tmp_path):
    from tf_sparsity import cli

    model = chain(keras.layers.GRU(8), keras.layers.Dense(3))
    model.save(tmp_path / "gru.keras")
    x = seqs(64)
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(64) % 3)
    cli.main(["prune", str(tmp_path / "gru.keras"), "--method", "lowrank", "--data", str(tmp_path / "data.npz"),
              "--output", str(tmp_path / "out.keras"), "--epochs", "2", "--sparsity", "0.5", "--from-logits",
              "--quiet"])
    pruned = keras.saving.load_model(tmp_path / "out.keras")
    cell = pruned.layers[0].cell
    assert type(cell).__name__ == "FactorizedGRUCell" and cell.recurrent_rank is not None and cell.recurrent_rank < 8


def _dense_weight_scales(tflite):
    """Number of scales of every int8 constant 2-D tensor (FULLY_CONNECTED weights) of a model."""
    info = tfs.export.inspect(tflite)
    return [1 if t.quantization["axis"] is None else len(t.quantization["scale"]) for t in info.tensors
            if t.constant and t.dtype == "int8" and len(t.shape) == 2 and t.quantization]


@pytest.mark.slow
def test_weight_quantization_per_tensor_step_model_matches_keras():
    model = chain(lr.LowRankGRU(8, max_rank=(None, 2)), keras.layers.Dense(3))
    x = seqs()
    per_channel = tfs.export.convert(model, target="tflm", representative_data=x, weight_quantization="per_channel")
    per_tensor = tfs.export.convert(model, target="tflm", representative_data=x)  # the tflm step default
    assert per_channel.report.recurrent["weight_quantization"] == "per_channel"
    assert per_tensor.report.recurrent["weight_quantization"] == "per_tensor"
    assert max(_dense_weight_scales(per_channel.tflite)) > 1
    assert set(_dense_weight_scales(per_tensor.tflite)) == {1}
    # One output multiplier per op instead of one per output channel: less op data in the arena.
    assert per_tensor.report.tflm["arena_bytes"] < per_channel.report.tflm["arena_bytes"]
    got, want = per_tensor.run_sequence(x[:8]), np.asarray(model(x[:8]))
    assert np.max(np.abs(got - want)) < 0.1 * max(1.0, np.max(np.abs(want)))


def test_weight_quantization_is_checked_and_applies_to_plain_models():
    model = chain(keras.layers.GRU(4), keras.layers.Dense(3))
    with pytest.raises(ValueError, match="`weight_quantization` must be None or one of"):
        tfs.export.convert(model, recurrent="step", weight_quantization="per_row")
    dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    result = tfs.export.convert(dense, target="litert", quantize="int8", representative_data=x, verify=False,
                                weight_quantization="per_tensor")
    assert set(_dense_weight_scales(result.tflite)) == {1}
    floating = tfs.export.convert(dense, verify=False, weight_quantization="per_tensor")
    assert any("weight_quantization='per_tensor' ignored" in n for n in floating.report.notes)


def test_sequence_header_registers_the_ops():
    meta = {"states": [{"layer": "gru", "index": 0, "size": 4, "zero_point": 0}], "steps": 5, "features": 2,
            "input": {"dtype": "float32"}, "output": {"dtype": "float32"},
            "op_names": ["ADD", "FULLY_CONNECTED", "LOGISTIC"]}
    text = recurrent.sequences.sequence_header(meta, "m")
    assert "inline TfLiteStatus m_add_ops(Resolver& resolver)" in text
    for method in ("AddAdd", "AddFullyConnected", "AddLogistic"):
        assert f"resolver.{method}() != kTfLiteOk" in text
    assert recurrent.sequences.resolver_method("UNIDIRECTIONAL_SEQUENCE_LSTM") == "AddUnidirectionalSequenceLSTM"


@pytest.mark.parametrize("cell", [lambda p: lr.FactorizedGRUCell(6, recurrent_rank=2, projection=p),
                                  lambda p: lr.FactorizedLSTMCell(6, input_rank=1, recurrent_rank=2, projection=p),
                                  lambda p: lr.FactorizedFastGRNNCell(6, recurrent_rank=2, projection=p)],
                         ids=["gru", "lstm", "fastgrnn"])
def test_joint_projection_is_the_same_math_and_round_trips(cell, tmp_path):
    x = seqs(n=4)
    plain, joint = chain(keras.layers.RNN(cell("matmul"))), chain(keras.layers.RNN(cell("joint")))
    joint.set_weights(plain.get_weights())
    np.testing.assert_allclose(joint(x), plain(x), atol=1e-6)
    joint.save(tmp_path / "joint.keras")
    loaded = keras.models.load_model(tmp_path / "joint.keras")
    assert loaded.layers[0].cell.projection == "joint"
    np.testing.assert_allclose(loaded(x), joint(x), atol=1e-6)


def test_step_form_computes_summed_gates_as_one_product(monkeypatch):
    model = chain(lr.LowRankGRU(8, max_rank=(None, 2)), keras.layers.Dense(3))
    x = seqs()
    joint = tfs.export.convert(model, target="litert", recurrent="step", representative_data=x)
    monkeypatch.setattr(step_export, "JOINT_PROJECTION", False)
    separate = tfs.export.convert(model, target="litert", recurrent="step", representative_data=x)
    # update and reset gates: [x, h·U] @ [W_g; V_g] (one CONCATENATION, one product each) instead of two + ADD
    assert joint.report.ops["CONCATENATION"] == 1 and "CONCATENATION" not in separate.report.ops
    assert joint.report.ops["FULLY_CONNECTED"] == separate.report.ops["FULLY_CONNECTED"] - 2
    np.testing.assert_allclose(joint.run_sequence(x[:5]), model(x[:5]), atol=1e-4)
