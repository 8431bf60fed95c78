"""The fused form: an LSTM as one UNIDIRECTIONAL_SEQUENCE_LSTM op, built with tf_keras in a child process."""


import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from tf_sparsity.export import runtimes
from tf_sparsity.export.errors import ExportError




from tf_sparsity.export.result import fill_report
from tf_sparsity.export import inputs as input_stage
from tf_sparsity.export import verify as verify_stage
from tf_sparsity.export.outputs import write_outputs
from tf_sparsity.export.recurrent.sequences import RecurrentExportResult, _agreement, _run_fused
from tf_sparsity.export.recurrent.step_model import _add_metadata, metadata


_FUSED_WORKER = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
import tf_keras as keras
spec = json.load(open(sys.argv[1]))
data = np.load(sys.argv[2])
inputs = keras.Input(batch_size=1, shape=tuple(spec["input_shape"]))
x = inputs
for k, layer in enumerate(spec["layers"]):
    kind, cfg = layer["kind"], layer["config"]
    cls = {"LSTM": keras.layers.LSTM, "Dense": keras.layers.Dense, "Dropout": keras.layers.Dropout,
           "Activation": keras.layers.Activation}[kind]
    made = cls(**cfg)
    x = made(x)
    weights = [data[f"w{k}_{i}"] for i in range(layer["weights"])]
    if weights:
        made.set_weights(weights)
model = keras.Model(inputs, x)
converter = tf.lite.TFLiteConverter.from_keras_model(model)
converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
if spec["quantize"] == "int8":
    calibration = data["calibration"]
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter.representative_dataset = lambda: ([c[None].astype("float32")] for c in calibration)
open(sys.argv[3], "wb").write(converter.convert())
"""


def baseline_python():
    """The Python that runs tf_keras for recurrent='fused': $TF_SPARSITY_BASELINE_PYTHON or this one."""
    return os.environ.get("TF_SPARSITY_BASELINE_PYTHON") or sys.executable


def _fused_spec(model, steps):
    """The chain as plain configs for the child (LSTM, Dense, Dropout, Activation only)."""
    import keras

    layers, weights = [], []
    for layer in [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]:
        if isinstance(layer, keras.layers.LSTM):
            c = layer.get_config()
            if c.get("use_bias") is False or c.get("go_backwards") or c.get("stateful") or c.get("return_state"):
                raise ValueError(f"recurrent='fused': LSTM '{layer.name}' uses use_bias=False, go_backwards, "
                                 "stateful or return_state, which the fused export does not rebuild; use 'step'.")
            config = {k: c[k] for k in ("units", "activation", "recurrent_activation", "return_sequences",
                                         "unit_forget_bias")}
            config.update(unroll=False, name=layer.name)
            kind = "LSTM"
        elif isinstance(layer, keras.layers.Dense):
            c = layer.get_config()
            config = {k: c[k] for k in ("units", "activation", "use_bias")}
            config["name"] = layer.name
            kind = "Dense"
        elif isinstance(layer, keras.layers.Dropout):
            config, kind = {"rate": float(layer.rate)}, "Dropout"
        elif isinstance(layer, keras.layers.Activation):
            config, kind = {"activation": keras.activations.serialize(layer.activation)}, "Activation"
        else:
            raise ValueError(f"recurrent='fused' rebuilds LSTM, Dense, Dropout and Activation layers in tf_keras; "
                             f"layer '{layer.name}' is {type(layer).__name__}. Use recurrent='step'.")
        for key, value in list(config.items()):
            if isinstance(value, dict):  # serialized activation objects -> their name
                config[key] = value.get("config", {}).get("name", value.get("class_name"))
        values = [np.asarray(w) for w in layer.get_weights()]
        layers.append({"kind": kind, "config": config, "weights": len(values)})
        weights.append(values)
    shape = list(model.inputs[0].shape[1:])
    shape[0] = shape[0] or steps
    return {"input_shape": shape, "layers": layers}, weights


def convert_fused(model, spec, quantize, representative_data, path, verify, *, input_shape, c_files,
                  calibration_steps, verify_samples, batch_size, compress, report, reason):
    """The fused-LSTM branch of `tfs.export.convert` (arguments as there)."""
    from tf_sparsity.export.inspection import inspect

    target = spec.name
    if batch_size != 1:
        raise ValueError(f"recurrent='fused' exports batch 1; received batch_size={batch_size!r}.")
    input_specs = input_stage.input_specs(model, 1, input_shape, representative_data, spec)
    samples = input_stage.samples(representative_data, input_specs, limit=max(calibration_steps, verify_samples))
    if quantize == "int8" and not samples:
        raise ValueError(f"quantize='int8' needs `representative_data` of shape (n, {input_specs[0]['shape'][1]}, "
                         f"{input_specs[0]['shape'][2]}) (about 100 typical sequences).")
    if input_specs[0]["shape"][1] is None:
        raise ValueError("recurrent='fused' needs a static sequence length: pass input_shape=(steps, features).")
    description, weights = _fused_spec(model, input_specs[0]["shape"][1])
    description["quantize"] = quantize
    python = baseline_python()
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {f"w{k}_{i}": w for k, ws in enumerate(weights) for i, w in enumerate(ws)}
        if samples:
            arrays["calibration"] = np.concatenate([s[0] for s in samples[:calibration_steps]])
        np.savez(os.path.join(tmp, "data.npz"), **arrays)
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(description, f)
        out = os.path.join(tmp, "model.tflite")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([python, "-c", _FUSED_WORKER, os.path.join(tmp, "spec.json"),
                               os.path.join(tmp, "data.npz"), out], capture_output=True, text=True, env=env,
                              timeout=900)
        if proc.returncode != 0 or not os.path.exists(out):
            if "No module named 'tf_keras'" in proc.stderr:
                raise ExportError(
                    f"recurrent='fused' rebuilds the LSTM with tf_keras in a child process, and {python} has no "
                    "tf_keras. Install the baseline extra into another environment (pip install "
                    "'tf_sparsity[baseline]') and point TF_SPARSITY_BASELINE_PYTHON to its python; or use "
                    "recurrent='step' (no extra needed).")
            raise ExportError(f"recurrent='fused': the tf_keras conversion failed:\n{proc.stderr.strip()[-2000:]}")
        with open(out, "rb") as f:
            tflite = f.read()
    info = inspect(tflite)
    tflite = _with_fused_metadata(tflite, info, input_specs[0]["shape"])
    info = inspect(tflite)
    if not info.op_counts.get("UNIDIRECTIONAL_SEQUENCE_LSTM"):
        raise ExportError(f"recurrent='fused': the converter did not fuse the LSTM (ops: {dict(info.op_counts)}).")
    verdict = info.verdict(target)
    if target == "edgetpu":
        report.preflight = verdict
    elif not verdict.ok:
        verify_stage.raise_unsupported(verdict, spec)
    report.recurrent = {"form": "fused", "reason": reason, "baseline_python": python}
    report.notes.append("LSTM rebuilt with tf_keras in a child process and converted to the fused "
                        "UNIDIRECTIONAL_SEQUENCE_LSTM op (weights stored once). Its state lives in variable "
                        "tensors that persist across invokes: reset the interpreter before each independent "
                        "sequence (result.run_sequence does)")
    if verify:
        meta = metadata(tflite)
        checks = (np.concatenate([s[0] for s in samples[:verify_samples]]) if samples else
                  np.random.default_rng(0).normal(size=(verify_samples, *input_specs[0]["shape"][1:])).astype("float32"))
        expected = np.asarray(model(checks, training=False))
        report.verification = {"runtime": "ai_edge_litert (default XNNPack delegate), state reset per sequence",
                               **_agreement(_run_fused(tflite, checks, "litert", meta, True, None), expected, meta)}
        verify_stage.warn_on_mismatch(report)
        if target == "tflm":
            micro = _run_fused(tflite, checks, "tflm", meta, True, None)
            ref = _run_fused(tflite, checks, "reference", meta, True, None)
            vs_keras = _agreement(micro, expected, meta)
            arena = verify_stage.tflm_checked(runtimes.tflm_arena_bytes, tflite, [
                runtimes.quantize(checks[:1], (meta["input"]["scale"], meta["input"]["zero_point"]), np.int8)
                if meta["input"].get("scale") else checks[:1]])
            report.tflm = {"runtime": "tflite-micro Python interpreter, reset per sequence", "arena_bytes": arena,
                           "max_diff_vs_reference_steps": float(np.max(np.abs(micro.astype(np.int64)
                                                                               - ref.astype(np.int64)))),
                           "samples": len(checks),
                           "max_error_vs_keras_steps": vs_keras.get("max_error_steps", vs_keras["max_abs_diff"])}
            if "argmax_agreement" in vs_keras:
                report.tflm["argmax_agreement_vs_keras"] = vs_keras["argmax_agreement"]
    fill_report(report, info)
    report.recurrent.update(file_bytes=len(tflite), arena_bytes=report.tflm.get("arena_bytes"))
    written, c_paths = write_outputs(tflite, path, c_files, spec, report)
    return RecurrentExportResult(tflite=tflite, path=written, target=target, quantize=quantize, report=report,
                                 c_files=tuple(c_paths))


def _with_fused_metadata(tflite, info, shape):
    from tensorflow.lite.python import schema_py_generated as schema

    from tf_sparsity.export import flatbuffer

    model = flatbuffer.read(tflite)
    x, y = info.inputs[0], info.outputs[0]
    io = lambda t: {"dtype": t.dtype, **({"scale": t.quantization["scale"], "zero_point": t.quantization["zero_point"]}  # noqa: E731
                                         if t.quantization and t.quantization.get("scale") else {})}
    meta = {"form": "fused", "steps": shape[1], "features": shape[2], "state_in_variable_tensors": True,
            "input": io(x), "output": io(y)}
    _add_metadata(model, schema, meta)
    return flatbuffer.write(model)
