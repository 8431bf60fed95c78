"""tf_sparsity.export on the real runtimes: ai_edge_litert, tflite-micro (and edgetpu_compiler if present)."""

import os
import pathlib
import shutil

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
import tf_sparsity.export  # noqa: F401  (tfs.export)
from tf_sparsity.export import flatbuffer

export = tfs.export


# --------------------------------------------------------------------------
# Small real models with block or random sparsity (Keras kernels are [in, out]).

def block_prune(model, sparsity=0.9, block=4, seed=0, skip=("logits",)):
    """Zero 1 x `block` blocks: `block` consecutive input rows of one output column."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense) and layer.name not in skip:
            kernel = layer.kernel.numpy()
            n_in, n_out = kernel.shape
            keep = rng.random((-(-n_in // block), n_out)) >= sparsity
            layer.kernel.assign(kernel * np.repeat(keep, block, axis=0)[:n_in])
    return model


def random_prune(model, sparsity=0.9, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D)):
            layer.kernel.assign(layer.kernel.numpy() * (rng.random(layer.kernel.shape) >= sparsity))
    return model


@pytest.fixture(scope="module")
def x(mnist1d_data):
    (x_train, _), _ = mnist1d_data
    return x_train[:100]


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    return tfs.zoo.mnist1d_cnn(filters=16, hidden=64)


def mlp(seed=0, hidden=(256, 256)):
    keras.utils.set_random_seed(seed)
    return tfs.zoo.mnist1d_mlp(hidden=hidden)


def no_temp_files(directory):
    return [p.name for p in pathlib.Path(directory).iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------
# LiteRT

def test_litert_float_matches_keras(x):
    model = mlp()
    result = export.convert(model, representative_data=x)
    v = result.report.verification
    assert v["max_abs_diff"] < 1e-5 and v["argmax_agreement"] == 1.0
    assert result.report.ops["FULLY_CONNECTED"] == 3
    assert not result.report.warnings


def test_block_sparse_float_fc_is_stored_sparse_and_smaller(x):
    model = block_prune(mlp(), block=4)
    sparse = export.convert(model, representative_data=x)
    dense = export.convert(model, representative_data=x, sparse=False)
    info = export.inspect(sparse.tflite)
    blocked = [t for t in info.sparse_tensors if t.sparsity.block == (1, 4)]
    assert len(blocked) == 2  # fc1, fc2 (logits kept dense by block_prune)
    assert all(t.sparsity.consumer == "FULLY_CONNECTED" and t.sparsity.native for t in blocked)
    assert "DENSIFY" not in info.op_counts
    assert len(sparse.tflite) < 0.3 * len(dense.tflite)
    assert sparse.report.verification["max_abs_diff"] < 1e-5
    # The decoded sparse weight equals the Keras kernel (TFLite stores [out, in]).
    fc2 = next(t for t in blocked if t.shape == (256, 256))
    np.testing.assert_array_equal(info.graphs[0].constant(fc2.index), model.get_layer("fc2").kernel.numpy().T)
    assert sparse.report.sparse_tensors[0]["layout"] == "1x4 blocks"


def test_random_sparse_float_auto_stores_dense_true_keeps_csr(x):
    model = random_prune(mlp())
    auto = export.convert(model, representative_data=x)
    assert not auto.report.sparse_tensors and "DENSIFY" not in auto.report.ops
    assert auto.report.densified and "1x4 blocks" in auto.report.densified[0]["reason"]
    kept = export.convert(model, representative_data=x, sparse=True)
    assert kept.report.ops.get("DENSIFY", 0) >= 2
    assert len(kept.tflite) < 0.5 * len(auto.tflite)
    assert kept.report.verification["max_abs_diff"] < 1e-5


def test_int8_litert_never_has_densify_and_runs(x):
    model = random_prune(mlp())
    result = export.convert(model, quantize="int8", representative_data=x, sparse=True)
    assert "DENSIFY" not in result.report.ops
    assert any("stored dense although sparse=True" in w for w in result.report.warnings)
    assert result.report.verification["argmax_agreement"] >= 0.9
    assert result.report.inputs[0]["dtype"] == "int8" and result.report.outputs[0]["dtype"] == "int8"


def test_int8_block16_is_stored_sparse_and_partial_blocks_stay_correct(x):
    # fc1 has 40 inputs: not a multiple of 16, so the converter's 1x16
    # encoding would lose columns 32-39; the exporter stores it dense.
    model = block_prune(mlp(), block=16)
    result = export.convert(model, quantize="int8", representative_data=x)
    layouts = {s["shape"][1]: s["layout"] for s in result.report.sparse_tensors}
    assert layouts == {256: "1x16 blocks"}
    assert any("multiples of 16" in d["reason"] for d in result.report.densified)
    assert result.report.verification["max_error_steps"] <= 3
    assert result.report.verification["argmax_agreement"] >= 0.9


@pytest.mark.parametrize("quantize", ["dynamic", "float16"])
def test_litert_weight_quantization_runs(x, quantize):
    # Measured: dynamic-range FCs compute garbage from 1x16-sparse int8
    # weights, and float16 sparse weights behind DEQUANTIZE are read as
    # dense; the exporter must store both dense.
    model = block_prune(mlp(hidden=(64, 64)), block=16)
    result = export.convert(model, quantize=quantize, representative_data=x)
    assert "DENSIFY" not in result.report.ops and not result.report.sparse_tensors
    assert result.report.densified
    assert result.report.verification["argmax_agreement"] >= 0.9
    assert not result.report.warnings


def test_representative_data_as_dataset_with_labels(mnist1d_data):
    import tensorflow as tf

    (x_train, y_train), _ = mnist1d_data
    data = tf.data.Dataset.from_tensor_slices((x_train[:64], y_train[:64])).batch(16)
    result = export.convert(mlp(hidden=(32,)), quantize="int8", representative_data=data)
    assert result.report.verification["samples"] == 16
    assert result.report.verification["argmax_agreement"] >= 0.9


@pytest.mark.slow
def test_strips_wrappers_and_unrolls_rnn_for_int8(x):
    wrapped = tfs.soft_threshold(mlp(hidden=(32,)))
    result = export.convert(wrapped, quantize="int8", representative_data=x)
    assert any("stripped" in n for n in result.report.notes)
    inputs = keras.Input((40, 1))
    rnn = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.SimpleRNN(8)(inputs)))
    result = export.convert(rnn, quantize="int8", representative_data=x)
    assert "WHILE" not in result.report.ops and any("unrolled" in n for n in result.report.notes)
    assert result.report.verification["argmax_agreement"] >= 0.8


# --------------------------------------------------------------------------
# TFLM

def test_tflm_runs_matches_reference_and_writes_c_files(cnn, x, tmp_path):
    path = tmp_path / "cnn.tflite"
    result = export.convert(cnn, target="tflm", representative_data=x, path=path)
    tflm = result.report.tflm
    assert tflm["max_diff_vs_reference_steps"] <= 1
    assert 1000 < tflm["arena_bytes"] < 64 * 1024
    assert tflm["argmax_agreement_vs_keras"] >= 0.9
    assert path.read_bytes() == result.tflite and result.path == str(path)
    cc, h = (pathlib.Path(p) for p in result.c_files)
    assert cc.name == "cnn.cc" and h.name == "cnn.h"
    n = len(result.tflite)
    assert f"g_cnn_model_data_len = {n};" in cc.read_text() and "alignas(16)" in cc.read_text()
    assert f"#define G_CNN_MODEL_DATA_LEN {n}" in h.read_text()
    assert cc.read_text().count("0x") == n
    assert no_temp_files(tmp_path)
    assert result.report.inputs[0]["shape"] == [1, 40, 1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_c_files_compile(tmp_path):
    import subprocess

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    result = export.convert(model, path=tmp_path / "tiny.tflite", c_files=True, verify=False)
    cc, _ = result.c_files
    subprocess.run(["g++", "-std=c++11", "-c", cc, "-o", str(tmp_path / "tiny.o")], check=True)


def test_tflm_lut_compression_saves_bytes_and_keeps_outputs(x):
    model = mlp(hidden=(64, 64))
    for layer in model.layers:  # 8 distinct values per layer: 3-bit indices
        if isinstance(layer, keras.layers.Dense):
            k = layer.kernel.numpy()
            centers = np.linspace(k.min(), k.max(), 8)
            layer.kernel.assign(centers[np.abs(k[..., None] - centers).argmin(-1)])
    result = export.convert(model, target="tflm", representative_data=x, compress="lut")
    c = result.report.compression
    assert c["bytes_saved"] > 0 and c["bytes_after"] == len(result.tflite)
    assert c["outputs_identical"] is True
    assert result.report.ops.get("TFLM_DECODE", 0) >= 1


def test_tflm_rejects_an_op_its_kernels_cannot_run(x):
    inputs = keras.Input((40, 1))
    h = keras.layers.Dense(16)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Activation("exponential")(h)))
    with pytest.raises(export.UnsupportedOpError, match=r"target 'tflm' cannot run op EXP") as info:
        export.convert(model, target="tflm", representative_data=x)
    assert info.value.op == "EXP" and info.value.target == "tflm"


# --------------------------------------------------------------------------
# EdgeTPU

def test_edgetpu_preflight_passes_for_the_cnn(cnn, x):
    result = export.convert(cnn, target="edgetpu", representative_data=x)
    verdict = result.report.preflight
    assert verdict.ok and verdict.first_fallback is None
    assert verdict.tpu_ops == sum(result.report.ops.values()) and verdict.cpu_ops == 0
    assert verdict.parameter_bytes < 8 * 1024 * 1024


@pytest.mark.slow
def test_edgetpu_preflight_mobilenet_v2():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
    images = np.random.default_rng(0).random((8, 32, 32, 3)).astype("float32")
    result = export.convert(model, target="edgetpu", representative_data=images, verify=False)
    assert result.report.preflight.ok, str(result.report.preflight)
    assert result.report.ops["DEPTHWISE_CONV_2D"] == 17


def test_edgetpu_preflight_reports_first_cpu_fallback(x):
    inputs = keras.Input((40, 1))
    h = keras.layers.Dense(16)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Activation("exponential")(h)))
    result = export.convert(model, target="edgetpu", representative_data=x)
    verdict = result.report.preflight
    assert not verdict.ok
    assert verdict.first_fallback.op == "EXP"
    assert verdict.cpu_ops == 2  # EXP and the FULLY_CONNECTED after it
    assert any("EXP" in w for w in result.report.warnings)


@pytest.mark.skipif(shutil.which("edgetpu_compiler") is None,
                    reason="edgetpu_compiler (Coral Edge TPU compiler) is not installed on PATH")
def test_edgetpu_compiler_maps_the_cnn(cnn, x, tmp_path):
    result = export.convert(cnn, target="edgetpu", representative_data=x, path=tmp_path / "cnn.tflite")
    assert result.compiled is not None and "Edge TPU" in result.report.compiler_log
    assert (tmp_path / "cnn_edgetpu.tflite").exists()


# --------------------------------------------------------------------------
# inspect

def test_inspect_any_tflite_file_and_verdicts():
    import tflite_micro

    sine = os.path.join(os.path.dirname(tflite_micro.runtime.__file__), "sine_float.tflite")
    info = export.inspect(sine)  # written by TFLM's own tools, not by this package
    assert info.op_counts["FULLY_CONNECTED"] == 3
    assert info.inputs[0].dtype == "float32"
    assert info.verdict("litert").ok and info.verdict("tflm").ok
    assert not info.verdict("edgetpu").ok  # float: the Edge TPU needs int8
    assert "TFLite model" in str(info) and info.to_dict()["op_counts"]["FULLY_CONNECTED"] == 3


@pytest.mark.parametrize("data", [b"", b"definitely not a flatbuffer", bytes(range(256)) * 4,
                                  b"\x10\x00\x00\x00TFL3" + b"\xff" * 200])
def test_inspect_rejects_non_tflite_bytes(data):
    with pytest.raises(ValueError, match="TFLite model"):
        export.inspect(data)


def test_inspect_rejects_truncated_model(tmp_path):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    good = export.convert(model, verify=False).tflite
    path = tmp_path / "cut.tflite"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(export.InvalidModelError, match="truncated or corrupt"):
        export.inspect(path)


# --------------------------------------------------------------------------
# Bad input: one clear error each.

def test_bad_arguments_raise_clear_errors(x, cnn):
    with pytest.raises(ValueError, match=r"`target` must be one of \['edgetpu', 'litert', 'tflm'\]"):
        export.convert(cnn, target="coral")
    with pytest.raises(ValueError, match=r"`quantize` must be one of"):
        export.convert(cnn, quantize="int4")
    with pytest.raises(ValueError, match=r"needs `representative_data`.*\(None, 40, 1\)"):
        export.convert(cnn, quantize="int8")
    with pytest.raises(ValueError, match=r"required by target 'tflm'"):
        export.convert(cnn, target="tflm")
    with pytest.raises(ValueError, match=r"has shape \(10, 39, 1\); the model expects \(n, 40, 1\)"):
        export.convert(cnn, quantize="int8", representative_data=x[:10, :39])
    for target in ("edgetpu", "tflm"):
        with pytest.raises(ValueError, match=rf"sparse=True is not possible for target '{target}'.*sparse='auto' or False"):
            export.convert(cnn, target=target, sparse=True, representative_data=x)
    with pytest.raises(ValueError, match=r"needs full-integer models: quantize='int8'"):
        export.convert(cnn, target="edgetpu", quantize="float16")
    with pytest.raises(ValueError, match=r"target 'tflm' needs a static batch size"):
        export.convert(cnn, target="tflm", batch_size=None, representative_data=x)
    with pytest.raises(ValueError, match=r"compress='lut'.*only for target='tflm'"):
        export.convert(cnn, compress="lut")
    with pytest.raises(TypeError, match="Keras 3"):
        export.convert("model.keras")


def test_op_without_builtin_kernel_is_named():
    inputs = keras.Input((8,))
    out = keras.layers.Lambda(lambda t: keras.ops.erf(t))(keras.layers.Dense(4)(inputs))
    with pytest.raises(export.UnsupportedOpError, match=r"Erf.*builtin"):
        export.convert(keras.Model(inputs, out))


# --------------------------------------------------------------------------
# Atomic writes and the C writer.

def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    path = tmp_path / "m.tflite"
    first = export.convert(model, path=path, verify=False)
    assert path.read_bytes() == first.tflite and no_temp_files(tmp_path)

    def interrupted(src, dst):
        raise KeyboardInterrupt  # the process is stopped between write and rename

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == first.tflite
    assert no_temp_files(tmp_path)


def test_write_c_array_roundtrip(tmp_path):
    data = bytes(range(40))
    cc, h = export.write_c_array(data, tmp_path / "kws-v2.tflite", arena_bytes=1234)
    text = pathlib.Path(cc).read_text()
    values = [int(v, 16) for v in text.split("{", 1)[1].split("}", 1)[0].replace(",", " ").split()]
    assert bytes(values) == data
    header = pathlib.Path(h).read_text()
    assert "g_kws_v2_model_data[]" in header and "#define G_KWS_V2_MODEL_DATA_ARENA_BYTES 1234" in header
    assert '#include "kws-v2.h"' in text


def test_densify_rewrite_keeps_outputs(x):
    # The flatbuffer rewrite (DENSIFY -> dense constant) on its own.
    model = random_prune(mlp(hidden=(64,)))
    kept = export.convert(model, representative_data=x, sparse=True)
    dense_bytes, replaced = flatbuffer.densify(kept.tflite)
    assert len(replaced) == 2 and "DENSIFY" not in export.inspect(dense_bytes).op_counts
    from tf_sparsity.export import runtimes

    samples = [[x[i:i + 1]] for i in range(4)]
    a = runtimes.run_litert(kept.tflite, samples)
    b = runtimes.run_litert(dense_bytes, samples)
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6)


def test_op_agreement_compares_each_op_on_identical_inputs():
    import doctest

    from tf_sparsity.export import runtimes

    m = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(8)])
    x = np.random.default_rng(0).normal(size=(100, 16)).astype("float32")
    blob = export.convert(m, quantize="int8", representative_data=x, verify=False).tflite
    params = runtimes.io_params(runtimes.litert_interpreter(blob).get_input_details()[0])
    samples = [[runtimes.quantize(row[None], params, np.int8)] for row in x[:20]]
    result = runtimes.op_agreement(blob, samples)
    fc = result["by_op"]["FULLY_CONNECTED"]
    assert fc["compared"] >= 20 and fc["elements"] >= 20 * 32  # the first FC always has identical inputs
    assert fc["max_steps"] <= 1  # one op on identical inputs: at most one rounding step
    first = result["first_divergence"]
    assert first is None or (first["op"] == "FULLY_CONNECTED" and 0 <= first["sample"] < 20)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(runtimes.op_agreement, "op_agreement", globs={"op_agreement": runtimes.op_agreement}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def dead_se_model(reduce_units=1):
    """A squeeze-excite block whose reduce units never fire (what channel pruning can leave)."""
    inp = keras.Input((8, 4))
    s = keras.layers.GlobalAveragePooling1D(keepdims=True)(inp)
    s = keras.layers.Conv1D(reduce_units, 1, activation="relu", name="se_reduce",
                            bias_initializer=keras.initializers.Constant(-100.0))(s)
    s = keras.layers.Conv1D(4, 1, activation="sigmoid", name="se_expand")(s)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Multiply()([inp, s])))
    return keras.Model(inp, out), np.random.default_rng(0).normal(size=(64, 8, 4)).astype("float32")


def test_a_collapsed_int8_range_is_named_when_xnnpack_refuses_the_model():
    # Without the fold, the dead unit's consumer gets a ~0 scale and XNNPack will not prepare the model.
    model, x = dead_se_model()
    with pytest.raises(tfs.export.ExportError, match="collapsed int8 range"):
        tfs.export.convert(model, target="tflm", quantize="int8", representative_data=x, fold_constant_units=False)
    with pytest.raises(ValueError, match="fold_constant_units"):
        tfs.export.convert(model, quantize="int8", representative_data=x, fold_constant_units="yes")


@pytest.mark.parametrize("reduce_units", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_units_constant_on_the_calibration_data_are_folded_and_xnnpack_runs_the_model(reduce_units):
    model, x = dead_se_model(reduce_units)
    for target in ("litert", "tflm"):
        r = tfs.export.convert(model, target=target, quantize="int8", representative_data=x)
        assert [f["action"] for f in r.report.folded] == ["kept"] + ["removed"] * (reduce_units - 1)
        assert all(f["group"] == "se_reduce" and f["constant"] == 0.0 and f["varies"] for f in r.report.folded[:1])
        assert any("folded" in n for n in r.report.notes) and "constant unit se_reduce[0]" in str(r.report)
        v = r.report.verification  # LiteRT with XNNPack, vs the original Keras model
        assert "XNNPack" in v["runtime"] and v["argmax_agreement"] == 1.0 and v["max_error_steps"] <= 2
    interpreter = export.runtimes.litert_interpreter(r.tflite)  # and the TFLM file runs on XNNPack too
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    float_result = tfs.export.convert(model, representative_data=x)  # float: nothing folded, nothing asked
    assert float_result.report.folded == []


def test_an_all_zero_weight_is_stored_dense_not_as_an_empty_sparse_tensor():
    # SynFlow empties whole attention projections; a sparse encoding of an all-zero
    # kernel has an empty buffer, which LiteRT read as "Input tensor ... lacks data".
    inputs = keras.Input((32,))
    h = keras.layers.Dense(32, kernel_initializer="zeros", bias_initializer="ones", name="zero")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, name="out")(keras.layers.Concatenate()([h, inputs])))
    result = export.convert(model, target="litert", representative_data=np.ones((4, 32), "float32"))
    assert result.report.verification["max_abs_diff"] <= 1e-5
    assert any("every entry is zero" in d["reason"] for d in result.report.densified)
