"""Building the one-step model: conversion, state requantization, embedded metadata."""


import json
import re
import warnings as _warnings

import numpy as np

from tf_sparsity.export import runtimes
from tf_sparsity.export.errors import ExportError

from tf_sparsity import _compat
from tf_sparsity.export import converter as converter_stage
from tf_sparsity.export.recurrent.plan import METADATA_NAME, _last_rnn, step_function


# --------------------------------------------------------------------------
# Float rollout of the step function (calibration, state-quantization effect).

def _rollout(step, plan, x, state_params=None, record=False):
    """Run `step` over sequences `x` [n, T, F] in float -> (outputs, calibration inputs).

    `state_params`: per state (scale, zero_point); the state is rounded to
    that int8 grid after every step (the effect of int8 states alone).
    """
    import keras

    n = len(x)
    states = [np.zeros((n, s["size"]), np.float32) for s in plan.states]
    outputs, samples = [], []
    for t in range(x.shape[1]):
        xt = np.asarray(x[:, t, :], np.float32)
        if record:
            samples.append([xt] + [s.copy() for s in states])
        result = step(xt, *states)
        y = keras.ops.convert_to_numpy(result[0])
        states = [keras.ops.convert_to_numpy(s).astype(np.float32) for s in result[1:]]
        if state_params is not None:
            states = [runtimes.dequantize(runtimes.quantize(s, p[:2], np.dtype(p[2]) if len(p) > 2 else np.int8), p[:2])
                      for s, p in zip(states, state_params)]
        outputs.append(y)
    if record:  # the final states as inputs too: the state inputs' range covers every state
        samples.append([np.asarray(x[:, -1, :], np.float32)] + [s.copy() for s in states])
    out = np.stack(outputs, 1) if plan.sequence_output else outputs[-1]
    return out, samples


def _calibration_steps(samples, limit, seed=0):
    """[[x_t, *states] per single time step], at most `limit`, keeping each input's extremes."""
    per_step = []
    for row in samples:  # row: batched arrays for one time step
        for i in range(len(row[0])):
            per_step.append([a[i:i + 1] for a in row])
    if len(per_step) <= limit:
        return per_step
    keep = set()
    for k in range(len(per_step[0])):
        lows = [float(np.min(p[k])) for p in per_step]
        highs = [float(np.max(p[k])) for p in per_step]
        keep.update((int(np.argmin(lows)), int(np.argmax(highs))))
    rng = np.random.default_rng(seed)
    rest = [i for i in rng.permutation(len(per_step)) if i not in keep][:max(0, limit - len(keep))]
    return [per_step[i] for i in sorted(keep | set(int(i) for i in rest))]


# --------------------------------------------------------------------------
# Conversion of the step model.

def _convert_step_model(prepared, plan, quantize, calibration, per_channel=True, activations="int8", part="all"):
    """Convert one part of the step (see `step_function`) -> .tflite bytes as the converter wrote them."""
    import keras
    import tensorflow as tf

    step = step_function(plan, part)
    if part == "head":
        signature = [tf.TensorSpec((1, plan.states[plan.head_state]["size"]), tf.float32, name="h")]
    else:
        signature = ([tf.TensorSpec((1, plan.features), tf.as_dtype(plan.input_dtype), name="x")]
                     + [tf.TensorSpec((1, s["size"]), tf.float32, name=f"state_{k}")
                        for k, s in enumerate(plan.states)])
    archive = keras.export.ExportArchive()
    archive.track(prepared)
    fn = archive.add_endpoint("serve", step, signature)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], archive)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize in ("dynamic", "float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if activations == "int16":  # 16x8: int16 activations and states, int8 weights
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.as_dtype(activations)
        converter.representative_dataset = lambda: ([np.asarray(a, np.float32) for a in s] for s in calibration)
        if not per_channel:
            _compat.per_tensor_int8_dense_weights(converter)
    with runtimes.captured_stderr() as log, _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        try:
            return bytes(converter.convert())
        except Exception as error:  # ConverterError and friends
            failure = error
    converter_stage.raise_converter_error(failure, log[0] if log else "")


def build_step(prepared, plan, quantize, calibration, per_channel=True, activations="int8"):
    """The step model and, when `plan.head_state` is set, the head model -> (step, head or None, meta).

    Split (`plan.head_state` not None): the step model maps `[x, *states]`
    to the new states only; the head model (the layers after the last
    recurrent layer) runs once on the final state `plan.head_state`, its
    input quantized exactly as that state (copying it is a `memcpy`). No
    layers after the recurrent one: no head model, the output is that state.
    Not split: one model, `[x, *states] -> [output, *new_states]`.
    """
    split = plan.head_state is not None
    step, meta = _finish_step_model(_convert_step_model(
        prepared, plan, quantize, calibration, per_channel, activations, "step" if split else "all"), plan, quantize)
    head = None
    if split:
        state = meta["states"][plan.head_state]
        if _last_rnn(plan) < len(plan.chain) - 1:
            k = 1 + plan.head_state
            head_calibration = [[s[k]] for s in calibration]
            head = _finish_head_model(_convert_step_model(
                prepared, plan, quantize, head_calibration, per_channel, activations, "head"), state)
            meta["output"] = metadata(head)["output"]
        else:
            meta["output"] = {"index": None, "shape": [1, state["size"]], "dtype": state["dtype"],
                              **{k: state[k] for k in ("scale", "zero_point") if k in state}}
        meta["head"] = {"state": plan.head_state, "model": head is not None,
                        "bytes": len(head) if head is not None else 0}
    from tf_sparsity.export import flatbuffer

    model = flatbuffer.read(step)
    _add_metadata(model, _schema(), meta)
    return flatbuffer.write(model), head, meta


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _finish_head_model(tflite, state):
    """Name the head's I/O (`h`, `output`); its input takes the state's quantization; add metadata."""
    from tf_sparsity.export import flatbuffer

    schema = _schema()
    model = flatbuffer.read(tflite)
    sub = model.subgraphs[0]
    if len(sub.inputs) != 1 or len(sub.outputs) != 1:
        raise ExportError(f"head model has {len(sub.inputs)} inputs and {len(sub.outputs)} outputs; expected 1 and 1")
    t_in = sub.tensors[sub.inputs[0]]
    wanted = (state.get("scale", 0.0), state.get("zero_point", 0))
    if wanted[0] and _params(t_in) != wanted and RETARGET_STATES and _rescaling_consumers(
            model, sub, sub.inputs[0], schema):
        t_in.quantization = _quantized_copy(schema, t_in, wanted, b"").quantization
        t_in.name = b"h"
    elif wanted[0] and _params(t_in) != wanted:  # requantize: state params in, the converter's params inside
        new = _quantized_copy(schema, t_in, wanted, b"h")
        sub.tensors.append(new)
        op = schema.OperatorT()
        op.opcodeIndex = _opcode(model, schema.BuiltinOperator.QUANTIZE, schema)
        op.inputs, op.outputs = [len(sub.tensors) - 1], [int(sub.inputs[0])]
        sub.operators.insert(0, op)
        sub.inputs = [len(sub.tensors) - 1]
    else:
        t_in.name = b"h"
    y = sub.tensors[sub.outputs[0]]
    y.name = b"output"
    _signature_io(model, list(sub.inputs), list(sub.outputs), 0, names=(["h"], ["output"]))
    h = sub.tensors[sub.inputs[0]]
    meta = {"form": "head", "input": {"index": 0, "dtype": flatbuffer.dtype_name(h.type), **_qdict(h)},
            "output": {"index": 0, "shape": [int(d) for d in y.shape], "dtype": flatbuffer.dtype_name(y.type),
                       **_qdict(y)}}
    _add_metadata(model, schema, meta)
    return flatbuffer.write(model)


def _quantized_copy(schema, tensor, params, name):
    new = schema.TensorT()
    new.shape = list(tensor.shape)
    new.shapeSignature = list(tensor.shapeSignature) if tensor.shapeSignature is not None else None
    new.type = tensor.type
    new.buffer = 0
    new.name = name
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [params[0]], [params[1]]
    new.quantization = q
    return new


def _finish_step_model(tflite, plan, quantize):
    """Order and name the I/O, give int8 states identical in/out quantization.

    Inputs become `[x, state_0, ...]`, outputs `[output, state_0, ...]`
    (named `x`, `state_<k>`, `output`, `state_<k>_out`), or only the states
    when the head is a separate model. Returns (bytes, metadata dict); the
    metadata is added by `build_step`.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    from tf_sparsity.export import flatbuffer

    model = flatbuffer.read(tflite)
    sub = model.subgraphs[0]
    names = {int(i): flatbuffer._name(sub.tensors[i]) for i in sub.inputs}
    n_states = len(plan.states)

    def input_index(label):
        for i, name in names.items():
            if re.search(rf"(^|_){label}(:\d+)?$", name):
                return i
        raise ExportError(f"step model: input {label!r} not found among {sorted(names.values())}")

    inputs = [input_index("x")] + [input_index(f"state_{k}") for k in range(n_states)]
    first = 0 if plan.head_state is not None else 1  # index of state 0 among the outputs
    outs = [int(i) for i in sub.outputs]
    positions = []
    for i in outs:
        match = re.search(r"Identity(?:_(\d+))?(:\d+)?$", flatbuffer._name(sub.tensors[i]))
        positions.append(int(match.group(1) or 0) if match else None)
    if None not in positions and sorted(positions) == list(range(len(outs))):
        outs = [outs[positions.index(k)] for k in range(len(outs))]
    if len(outs) != first + n_states:
        raise ExportError(f"step model has {len(outs)} outputs; expected {first} + {n_states} states")
    sub.inputs = inputs
    quantize_code = None
    meta_states = []
    for k, s in enumerate(plan.states):
        t_in, t_out = sub.tensors[inputs[1 + k]], sub.tensors[outs[first + k]]
        p_in, p_out = _params(t_in), _params(t_out)
        shared = outs.count(outs[first + k]) > 1 or outs[first + k] in inputs
        retargeted = False
        if p_in[0] and p_in != p_out and not shared and RETARGET_STATES and _rescaling_consumers(
                model, sub, inputs[1 + k], schema):
            # Every op reading the state input computes its rescaling from the tensor's parameters
            # (at Prepare): give the input the output's parameters, no requantizing op per step.
            t_in.quantization = _quantized_copy(schema, t_out, p_out, b"").quantization
            p_in, retargeted = p_out, True
        if p_in[0] and (p_in != p_out or shared):
            if quantize_code is None:
                quantize_code = _opcode(model, schema.BuiltinOperator.QUANTIZE, schema)
            sub.tensors.append(_quantized_copy(schema, t_out, p_in, f"state_{k}_out".encode()))
            op = schema.OperatorT()
            op.opcodeIndex = quantize_code
            op.inputs, op.outputs = [outs[first + k]], [len(sub.tensors) - 1]
            sub.operators.append(op)
            outs[first + k] = len(sub.tensors) - 1
            requantized = True
        else:
            sub.tensors[outs[first + k]].name = f"state_{k}_out".encode()
            requantized = False
        t_in.name = f"state_{k}".encode()
        entry = {"layer": s["layer"], "index": s["index"], "size": s["size"], "input": 1 + k, "output": first + k,
                 "dtype": flatbuffer.dtype_name(t_in.type), "requantized": requantized, "retargeted": retargeted}
        if p_in[0]:
            entry.update(scale=p_in[0], zero_point=p_in[1])
        meta_states.append(entry)
    sub.tensors[inputs[0]].name = b"x"
    if first:
        sub.tensors[outs[0]].name = b"output"
    sub.outputs = outs
    _signature_io(model, inputs, outs, n_states, with_output=bool(first))
    x_t = sub.tensors[inputs[0]]
    meta = {"form": "step", "steps": plan.steps, "features": plan.features, "states": meta_states,
            "sequence_output": plan.sequence_output,
            "input": {"index": 0, "dtype": flatbuffer.dtype_name(x_t.type), **_qdict(x_t)}}
    if first:
        y_t = sub.tensors[outs[0]]
        meta["output"] = {"index": 0, "shape": [int(d) for d in y_t.shape], "dtype": flatbuffer.dtype_name(y_t.type),
                          **_qdict(y_t)}
    return flatbuffer.write(model), meta


# State inputs read only by these ops take the new state's quantization (no QUANTIZE op per step):
# their kernels derive the rescaling from the input tensor's parameters when they are prepared.
# (Ops such as RESHAPE, STRIDED_SLICE, SPLIT or CONCATENATION pass parameters through unchanged.)
RETARGET_STATES = True
_RESCALING_OPS = ("FULLY_CONNECTED", "ADD", "SUB", "MUL")


def _rescaling_consumers(model, sub, tensor, schema):
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    users = [op for op in sub.operators if tensor in list(op.inputs)]
    kinds = [names.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                           model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)) for op in users]
    return bool(users) and all(k in _RESCALING_OPS for k in kinds)


def _params(tensor):
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return (0.0, 0)
    return (float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None and len(q.zeroPoint) else 0)


def _qdict(tensor):
    scale, zero = _params(tensor)
    return {"scale": scale, "zero_point": zero} if scale else {}


def _opcode(model, builtin, schema):
    for k, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return k
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _signature_io(model, inputs, outs, n_states, with_output=True, names=None):
    """Keep the signature def (LiteRT's named I/O) in line with the new tensors and names."""
    ins, outputs = names or (["x"] + [f"state_{k}" for k in range(n_states)],
                             ["output"] * with_output + [f"state_{k}_out" for k in range(n_states)])
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex not in (0, None):
            continue
        sig.inputs = [_tensor_map(n, i) for n, i in zip(ins, inputs)]
        sig.outputs = [_tensor_map(n, i) for n, i in zip(outputs, outs)]


def _tensor_map(name, index):
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.TensorMapT()
    m.name, m.tensorIndex = name.encode(), int(index)
    return m


def _add_metadata(model, schema, meta):
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [entry]


def metadata(tflite):
    """The recurrent-form metadata this package wrote into a .tflite (dict), or None."""
    from tf_sparsity.export import flatbuffer

    model = tflite if not isinstance(tflite, (bytes, bytearray)) else flatbuffer.read(tflite)
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            data = model.buffers[entry.buffer].data
            return json.loads(bytes(np.asarray(data, np.uint8)).decode()) if data is not None else None
    return None


def describe(info):
    """The recurrent form of an inspected model: dict (form, how it was found) or None.

    Reads the package's metadata when present; otherwise recognizes a WHILE
    loop ('loop') or the fused LSTM op ('fused').
    """
    meta = metadata(info._model)  # noqa: SLF001 (inspection's own parsed model)
    if meta is not None:
        return meta
    counts = info.op_counts
    if counts.get("UNIDIRECTIONAL_SEQUENCE_LSTM") or counts.get("BIDIRECTIONAL_SEQUENCE_LSTM"):
        return {"form": "fused", "ops": counts.get("UNIDIRECTIONAL_SEQUENCE_LSTM", 0)}
    if counts.get("WHILE"):
        return {"form": "loop", "ops": counts["WHILE"]}
    return None
