"""Recurrent models for devices: export the weights once and carry the state.

`convert(model, target, recurrent=...)` picks one of these forms for models
with recurrent layers (Keras `GRU`, `LSTM`, `SimpleRNN`, `RNN(cell)` with
the package's low-rank / FastGRNN / factorized cells):

- **step** (the default for `tflm` and `edgetpu`): the model of *one* time
  step. Inputs `x` `[1, features]` and every state `[1, units]`; outputs the
  head's output, then every new state. Weights are stored once, factorized
  cells keep their factors (U and V, not U·V), file and arena do not grow
  with the sequence. The firmware (or `ExportResult.run_sequence`) loops over
  the time steps and copies each new state back to its input. int8 states
  leave the model with exactly the quantization of the state inputs (a
  requantizing QUANTIZE op is appended where the converter chose other
  parameters), so that copy is a `memcpy`. The C files come with
  `<stem>_sequence.h`, the documented C++ loop.
- **loop**: one `WHILE` graph with shared weights (Keras 3's own conversion);
  float only: full-int8 conversion of the loop crashes the TF 2.21 converter.
- **fused**: an LSTM as one `UNIDIRECTIONAL_SEQUENCE_LSTM` op, rebuilt with
  `tf_keras` in a child process (the `baseline` extra).
- **unroll**: the sequence unrolled into plain ops over a static length
  (grows with the sequence; always available where the ops are).

Everything here reads Keras layers through public attributes (`cell`,
`state_size`, `return_sequences`, ...); the one private API is marked
`# COMPAT:` below.

>>> import keras, numpy as np, tf_sparsity as tfs
>>> m = keras.Sequential([keras.Input((20, 1)), keras.layers.GRU(8), keras.layers.Dense(3)])
>>> x = np.random.default_rng(0).normal(size=(32, 20, 1)).astype("float32")
>>> r = tfs.export.convert(m, target="tflm", representative_data=x)   # recurrent="auto" -> "step"
>>> r.report.recurrent["form"], r.inspect().op_counts.get("WHILE", 0)
('step', 0)
>>> r.run_sequence(x[:4]).shape          # on tflite-micro, state carried between invokes
(4, 3)
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings as _warnings

import numpy as np

from tf_sparsity.export import runtimes
from tf_sparsity.export.errors import ExportError, VerificationError
from tf_sparsity.export.result import ExportResult

FORMS = ("auto", "step", "loop", "fused", "unroll")
METADATA_NAME = "tf_sparsity.recurrent"
# Calibration samples (one time step each) for the int8 step model.
_MAX_CALIBRATION_STEPS = 800
_PER_CHANNEL = True  # int8 FULLY_CONNECTED weights per output channel (the converter's default)


# --------------------------------------------------------------------------
# COMPAT: private Keras / TF APIs used here (keep this list short).

def _functional_class():
    # COMPAT: `keras.src.models.Functional` (no public name in Keras 3.15).
    import keras

    return keras.src.models.Functional


def _per_tensor_dense(converter):
    # COMPAT: a private TFLiteConverter attribute (TF 2.21): per-tensor int8
    # weights for FULLY_CONNECTED (one multiplier per op, not per channel).
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True


# --------------------------------------------------------------------------
# Which layers the step form understands.

class StepFormError(ExportError):
    """The model cannot be exported as a single time step (the message says why and what works)."""


def _per_step_types():
    import keras

    L = keras.layers
    return (L.Dense, L.Activation, L.Dropout, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax, L.LayerNormalization,
            L.BatchNormalization, L.Identity, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
            L.SpatialDropout1D)


def _is_per_step(layer):
    """Whether `layer` treats every time step alone (so it can run on `[1, features]`)."""
    import keras

    if isinstance(layer, keras.layers.TimeDistributed):
        return _is_per_step(layer.layer)
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization)):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return all(a in (-1, 2) for a in axis)
    if isinstance(layer, keras.layers.Softmax):
        return layer.axis in (-1, 2)
    return isinstance(layer, _per_step_types())


def recurrent_layers(model):
    """Every recurrent layer of `model` (RNN subclasses and Bidirectional wrappers), in order."""
    import keras

    from tf_sparsity import prunable

    return [l for l in prunable.iter_layers(model)
            if isinstance(l, (keras.layers.RNN, keras.layers.Bidirectional))]


def _state_sizes(layer):
    """The cell's state sizes as a list of ints, or StepFormError for an unsupported cell."""
    cell = layer.cell
    size = getattr(cell, "state_size", None)
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    flat = []
    for s in sizes:
        if isinstance(s, (list, tuple)) and len(s) == 1:
            s = s[0]
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise StepFormError(
                f"recurrent='step' does not support layer '{layer.name}': its cell "
                f"{type(cell).__name__} has state_size {size!r}; expected an int or a list of ints "
                "(vector states, as GRU/LSTM/SimpleRNN/FastGRNN cells). Use recurrent='unroll'.")
        flat.append(int(s))
    return flat


@dataclasses.dataclass
class StepPlan:
    """How a model becomes one time step: the chain of layers and the states."""

    chain: list
    steps: int | None
    features: int
    states: list              # [{"layer", "index", "size"}]
    sequence_output: bool     # the last RNN returns sequences: one output per step
    input_dtype: str = "float32"


def step_plan(model, steps=None):
    """Check that `model` can run one time step at a time -> `StepPlan`, else StepFormError.

    Supported: one sequence input `[batch, steps, features]`, a chain of
    layers: per-step layers (Dense, Activation, Dropout, normalization over
    features, TimeDistributed of those), recurrent layers (`keras.layers.RNN`
    subclasses whose cell has vector states), then any head after the last
    recurrent layer. A last recurrent layer with `return_sequences=True`
    followed by per-step layers gives one output per step (documented
    behaviour: `run_sequence` returns `[n, steps, ...]`).

    Args:
        model: a built Keras model (already stripped).
        steps: the sequence length to record when the input's is unknown.
    """
    import keras

    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise StepFormError(f"recurrent='step' needs a model with one sequence input; this one has "
                            f"{len(inputs)}. Use recurrent='unroll'.")
    shape = tuple(inputs[0].shape)
    if len(shape) != 3:
        raise StepFormError(f"recurrent='step' needs a sequence input [batch, steps, features]; the model "
                            f"input has shape {shape}. Use recurrent='unroll'.")
    if shape[2] is None:
        raise StepFormError("recurrent='step': the model input's feature dimension is unknown "
                            f"({shape}); build the model with keras.Input((steps, features)).")
    if not isinstance(model, (keras.Sequential, _functional_class())):
        raise StepFormError("recurrent='step' needs a Sequential or functional model (a subclassed model "
                            "hides its layer graph). Use recurrent='unroll'.")
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    previous = inputs[0]
    sequential = isinstance(model, keras.Sequential)  # a chain by construction
    for layer in layers:
        try:
            ok = sequential or layer.input is previous
        except (AttributeError, ValueError):
            ok = False
        if not ok:
            raise StepFormError(f"recurrent='step' needs a chain of layers (each fed by the one before); layer "
                                f"'{layer.name}' is not. Use recurrent='unroll'.")
        previous = layer.output
    rnn_positions = [i for i, l in enumerate(layers) if isinstance(l, (keras.layers.RNN, keras.layers.Bidirectional))]
    if not rnn_positions:
        raise StepFormError("recurrent='step': the model has no recurrent layer.")
    last = rnn_positions[-1]
    states = []
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Bidirectional):
            raise StepFormError(
                f"recurrent='step' cannot export Bidirectional layer '{layer.name}': its backward half needs "
                "the whole sequence before the first output. Use recurrent='unroll' (or 'loop' in float).")
        if isinstance(layer, keras.layers.RNN):
            if layer.go_backwards:
                raise StepFormError(f"recurrent='step' cannot export layer '{layer.name}' with go_backwards=True "
                                    "(it reads the sequence from its end). Use recurrent='unroll'.")
            if layer.return_state:
                raise StepFormError(f"recurrent='step': layer '{layer.name}' has return_state=True; the step "
                                    "model already outputs every state. Build the model without return_state.")
            if i < last and not layer.return_sequences:
                raise StepFormError(f"recurrent='step': layer '{layer.name}' feeds another recurrent layer "
                                    "but has return_sequences=False.")
            if getattr(layer, "supports_masking", False) and getattr(layer.input, "_keras_mask", None) is not None:
                raise StepFormError(f"recurrent='step': layer '{layer.name}' receives a mask; masked "
                                    "sequences are not supported. Use recurrent='unroll'.")
            for k, size in enumerate(_state_sizes(layer)):
                states.append({"layer": layer.name, "index": k, "size": size})
            continue
        if i < last and not _is_per_step(layer):
            raise StepFormError(
                f"recurrent='step': layer '{layer.name}' ({type(layer).__name__}) before the recurrent layer "
                "mixes time steps; the step form needs per-step layers there (Dense, Activation, Dropout, "
                "normalization over features). Use recurrent='unroll'.")
        if i > last and layers[last].return_sequences and not _is_per_step(layer):
            raise StepFormError(
                f"recurrent='step': layer '{layer.name}' ({type(layer).__name__}) reads the whole output "
                f"sequence of '{layers[last].name}' (return_sequences=True); the step form gives one output per "
                "step and needs per-step layers after it. Use recurrent='unroll', or return_sequences=False.")
    return StepPlan(chain=layers, steps=shape[1] if shape[1] is not None else steps, features=int(shape[2]),
                    states=states, sequence_output=bool(layers[last].return_sequences),
                    input_dtype=str(inputs[0].dtype))


def step_function(plan):
    """`fn(x_t, *states) -> [output, *new_states]`: the plan's chain for one time step."""
    import keras

    def step(x, *states):
        k = 0
        new_states = []
        for layer in plan.chain:
            if isinstance(layer, keras.layers.RNN):
                n = len(_state_sizes(layer))
                x, state = layer.cell(x, list(states[k:k + n]), training=False)
                new_states += keras.tree.flatten(state)
                k += n
            elif isinstance(layer, keras.layers.TimeDistributed):
                x = layer.layer(x, training=False)
            else:
                x = layer(x, training=False)
        return [x] + new_states

    return step


# --------------------------------------------------------------------------
# Choosing the form.

def resolve(model, target, quantize, recurrent):
    """The form `convert` uses: None (no recurrent layer) or one of FORMS[1:], plus why.

    Returns `(form, reason)`. Raises ValueError for a form the target or the
    precision cannot take, naming the forms that work.
    """
    if recurrent not in FORMS:
        raise ValueError(f"`recurrent` must be one of {FORMS}; received {recurrent!r}.")
    rnns = recurrent_layers(model)
    if not rnns:
        return None, None
    stateful = [l.name for l in rnns if getattr(l, "stateful", False)
                or getattr(getattr(l, "forward_layer", None), "stateful", False)]
    if recurrent == "auto":
        if target in ("tflm", "edgetpu"):
            try:
                step_plan(_strip_for_plan(model))
            except StepFormError as error:
                return "unroll", f"auto: step form not possible ({error}); unrolled"
            return "step", (f"auto: {target} runs int8 only and a microcontroller/TPU model should not grow with "
                            "the sequence: one time step, state carried by the caller")
        if stateful:
            return "step", "auto: stateful layer(s) " + ", ".join(stateful) + " carry state across calls"
        if quantize == "int8":
            return "unroll", ("auto: LiteRT int8 takes the whole sequence unrolled (int8 conversion of the WHILE "
                              "loop crashes the converter; pass recurrent='step' for the per-step model)")
        return "loop", "auto: LiteRT float runs Keras 3's WHILE loop (weights stored once)"
    if recurrent in ("loop", "unroll", "fused") and stateful:
        raise ValueError(
            f"recurrent={recurrent!r}: layer(s) {', '.join(stateful)} are stateful (they carry state across "
            "calls), which a whole-sequence model cannot do. Use recurrent='step': the state is an input and an "
            "output of the step model.")
    if recurrent == "loop" and quantize != "float32" and quantize is not None:
        working = "'step' or 'unroll'" + (" or 'fused' (LSTM)" if _all_lstm(rnns) else "")
        raise ValueError(
            f"recurrent='loop' is float only: full-{quantize} conversion of the WHILE loop crashes the TF 2.21 "
            f"converter (segfault){', and target ' + repr(target) + ' needs int8' if target != 'litert' else ''}. "
            f"Use recurrent={working} for {quantize}, or quantize=None on target 'litert' for the loop.")
    if recurrent == "fused" and not _all_lstm(rnns):
        names = [l.name for l in rnns if not _is_plain_lstm(l)]
        raise ValueError(f"recurrent='fused' exists for LSTM layers only (UNIDIRECTIONAL_SEQUENCE_LSTM); "
                         f"layer(s) {', '.join(names)} are not keras.layers.LSTM. Use 'step' or 'unroll'.")
    if recurrent == "step":
        step_plan(_strip_for_plan(model))  # raises with the reason
    return recurrent, f"recurrent={recurrent!r} requested"


def _strip_for_plan(model):
    """Checks read the original model: stripping keeps the chain and flags."""
    return model


def _is_plain_lstm(layer):
    import keras

    return isinstance(layer, keras.layers.LSTM)


def _all_lstm(rnns):
    import keras

    inner = [l.forward_layer if isinstance(l, keras.layers.Bidirectional) else l for l in rnns]
    return all(_is_plain_lstm(l) for l in inner)


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

def _convert_step_model(prepared, plan, quantize, calibration, per_channel=True, activations="int8"):
    import keras
    import tensorflow as tf

    from tf_sparsity.export import conversion

    step = step_function(plan)
    signature = ([tf.TensorSpec((1, plan.features), tf.as_dtype(plan.input_dtype), name="x")]
                 + [tf.TensorSpec((1, s["size"]), tf.float32, name=f"state_{k}") for k, s in enumerate(plan.states)])
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
            _per_tensor_dense(converter)
    with runtimes.captured_stderr() as log, _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        try:
            return bytes(converter.convert())
        except Exception as error:  # ConverterError and friends
            failure = error
    conversion._raise_converter_error(failure, log[0] if log else "")


def _finish_step_model(tflite, plan, quantize):
    """Order and name the I/O, give int8 states identical in/out quantization, add metadata.

    Inputs become `[x, state_0, ...]`, outputs `[output, state_0, ...]`
    (named `x`, `state_<k>`, `output`, `state_<k>_out`). Returns
    (bytes, metadata dict).
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
    outs = [int(i) for i in sub.outputs]
    positions = []
    for i in outs:
        match = re.search(r"Identity(?:_(\d+))?(:\d+)?$", flatbuffer._name(sub.tensors[i]))
        positions.append(int(match.group(1) or 0) if match else None)
    if None not in positions and sorted(positions) == list(range(len(outs))):
        outs = [outs[positions.index(k)] for k in range(len(outs))]
    if len(outs) != 1 + n_states:
        raise ExportError(f"step model has {len(outs)} outputs; expected 1 + {n_states} states")
    sub.inputs = inputs
    quantize_code = None
    meta_states = []
    for k, s in enumerate(plan.states):
        t_in, t_out = sub.tensors[inputs[1 + k]], sub.tensors[outs[1 + k]]
        p_in, p_out = _params(t_in), _params(t_out)
        shared = outs.count(outs[1 + k]) > 1 or outs[1 + k] in inputs
        if p_in[0] and (p_in != p_out or shared):
            if quantize_code is None:
                quantize_code = _opcode(model, schema.BuiltinOperator.QUANTIZE, schema)
            new = schema.TensorT()
            new.shape = list(t_out.shape)
            new.shapeSignature = list(t_out.shapeSignature) if t_out.shapeSignature is not None else None
            new.type = t_out.type
            new.buffer = 0
            new.name = f"state_{k}_out".encode()
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint = [p_in[0]], [p_in[1]]
            new.quantization = q
            sub.tensors.append(new)
            op = schema.OperatorT()
            op.opcodeIndex = quantize_code
            op.inputs, op.outputs = [outs[1 + k]], [len(sub.tensors) - 1]
            sub.operators.append(op)
            outs[1 + k] = len(sub.tensors) - 1
            requantized = True
        else:
            sub.tensors[outs[1 + k]].name = f"state_{k}_out".encode()
            requantized = False
        t_in.name = f"state_{k}".encode()
        entry = {"layer": s["layer"], "index": s["index"], "size": s["size"], "input": 1 + k, "output": 1 + k,
                 "dtype": flatbuffer.dtype_name(t_in.type), "requantized": requantized}
        if p_in[0]:
            entry.update(scale=p_in[0], zero_point=p_in[1])
        meta_states.append(entry)
    sub.tensors[inputs[0]].name = b"x"
    sub.tensors[outs[0]].name = b"output"
    sub.outputs = outs
    _signature_io(model, inputs, outs, n_states)
    x_t, y_t = sub.tensors[inputs[0]], sub.tensors[outs[0]]
    meta = {"form": "step", "steps": plan.steps, "features": plan.features, "states": meta_states,
            "sequence_output": plan.sequence_output,
            "input": {"index": 0, "dtype": flatbuffer.dtype_name(x_t.type), **_qdict(x_t)},
            "output": {"index": 0, "shape": [int(d) for d in y_t.shape], "dtype": flatbuffer.dtype_name(y_t.type),
                       **_qdict(y_t)}}
    _add_metadata(model, schema, meta)
    return flatbuffer.write(model), meta


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


def _signature_io(model, inputs, outs, n_states):
    """Keep the signature def (LiteRT's named I/O) in line with the new tensors and names."""
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex not in (0, None):
            continue
        names = ["x"] + [f"state_{k}" for k in range(n_states)]
        sig.inputs = [_tensor_map(n, i) for n, i in zip(names, inputs)]
        sig.outputs = [_tensor_map(n, i) for n, i in zip(["output"] + [f"state_{k}_out" for k in range(n_states)], outs)]


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


# --------------------------------------------------------------------------
# Running a step model over whole sequences.

def _session(tflite, runtime, arena_size=None):
    """(set_input(i, array), invoke(), get_output(j)) closures for one interpreter."""
    if runtime == "tflm":
        with runtimes.captured_stderr():
            interpreter = runtimes.tflm_interpreter(tflite, arena_size or runtimes.generous_arena(tflite))
        ins = [interpreter.get_input_details(i) for i in range(runtimes._io_counts(tflite)[0])]
        return (lambda i, a: interpreter.set_input(a.reshape(ins[i]["shape"]), i), interpreter.invoke,
                lambda j: np.array(interpreter.get_output(j)))
    if runtime not in ("litert", "reference"):
        raise ValueError(f"`runtime` must be 'tflm', 'litert' or 'reference'; received {runtime!r}.")
    interpreter = runtimes.litert_interpreter(tflite, reference=runtime == "reference")
    ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    return (lambda i, a: interpreter.set_tensor(ins[i]["index"], a.reshape(ins[i]["shape"])), interpreter.invoke,
            lambda j: interpreter.get_tensor(outs[j]["index"]).copy())


def run_sequence(tflite, x, runtime="tflm", initial_state=None, raw=False, arena_size=None):
    """Run a step model over whole sequences, carrying the state between invokes.

    Args:
        tflite: a step model written by `convert(..., recurrent="step")`.
        x: float sequences `[n, steps, features]` (or one `[steps, features]`).
        runtime: "tflm" (tflite-micro), "litert" (default XNNPack delegate)
            or "reference" (LiteRT's reference kernels).
        initial_state: None (zeros) or a list of float arrays `[n, size]`,
            one per state, e.g. to continue a stream.
        raw: return the int8 outputs of an int8 model instead of floats.
        arena_size: tflite-micro arena bytes (default: a generous size).

    Returns:
        The head's output after the last step, `[n, ...]`; `[n, steps, ...]`
        when the last recurrent layer returns sequences.

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((10, 2)), keras.layers.SimpleRNN(4), keras.layers.Dense(2)])
    >>> x = np.random.default_rng(1).normal(size=(20, 10, 2)).astype("float32")
    >>> r = tfs.export.convert(m, recurrent="step")          # float, LiteRT
    >>> bool(np.allclose(run_sequence(r.tflite, x[:3], runtime="litert"), m(x[:3]), atol=1e-4))
    True
    """
    meta = metadata(tflite)
    if meta is not None and meta.get("form") == "fused":
        return _run_fused(tflite, x, runtime, meta, raw, arena_size)
    if meta is None or meta.get("form") != "step":
        raise ValueError("`tflite` is not a step model written by tf_sparsity (no recurrent metadata); export "
                         "it with tfs.export.convert(..., recurrent='step').")
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[2] != meta["features"]:
        raise ValueError(f"`x` must hold sequences of shape (n, steps, {meta['features']}); received "
                         f"{tuple(x.shape)}.")
    states = meta["states"]
    if initial_state is not None and len(initial_state) != len(states):
        raise ValueError(f"`initial_state` must hold {len(states)} arrays (one per state); received "
                         f"{len(initial_state)}.")
    set_input, invoke, get_output = _session(tflite, runtime, arena_size)
    in_q, out_q = meta["input"], meta["output"]
    quant = lambda v, q: (runtimes.quantize(v, (q["scale"], q["zero_point"]), np.dtype(q["dtype"]))  # noqa: E731
                          if q.get("scale") else np.asarray(v, np.float32))
    results = []
    with runtimes.captured_stderr() as log:
        try:
            for n in range(len(x)):
                carried = [quant(np.zeros((1, s["size"]), np.float32) if initial_state is None
                                 else np.asarray(initial_state[k][n:n + 1], np.float32), s)
                           for k, s in enumerate(states)]
                per_step = []
                for t in range(x.shape[1]):
                    for k, value in enumerate(carried):
                        set_input(1 + k, value)
                    set_input(0, quant(x[n, t:t + 1], in_q))
                    invoke()
                    carried = [get_output(1 + k) for k in range(len(states))]
                    if meta["sequence_output"] or t == x.shape[1] - 1:
                        per_step.append(get_output(0))
                y = np.stack(per_step, 1) if meta["sequence_output"] else per_step[-1]
                results.append(y[0])
            failure = None
        except RuntimeError as error:
            failure = error
    if failure is not None:
        raise VerificationError(f"{runtime} could not run the step model: {failure}\n{(log[0] if log else '').strip()}")
    out = np.stack(results)
    if raw or not out_q.get("scale"):
        return out
    return runtimes.dequantize(out, (out_q["scale"], out_q["zero_point"]))


def _run_fused(tflite, x, runtime, meta, raw, arena_size):
    """Whole sequences through a fused-LSTM model, its variable state tensors reset before each one.

    UNIDIRECTIONAL_SEQUENCE_LSTM keeps its state in *variable* tensors that
    persist across invokes (measured: without a reset the second sequence
    continues from the first one's state). Firmware: `interpreter.Reset()`
    before each independent sequence (or not, to stream).
    """
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None]
    with runtimes.captured_stderr():
        if runtime == "tflm":
            interpreter = runtimes.tflm_interpreter(tflite, arena_size or runtimes.generous_arena(tflite))
            reset, put = interpreter.reset, lambda a: interpreter.set_input(a, 0)
            invoke, get = interpreter.invoke, lambda: np.array(interpreter.get_output(0))
        else:
            interpreter = runtimes.litert_interpreter(tflite, reference=runtime == "reference")
            i, o = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            reset, put = interpreter.reset_all_variables, lambda a: interpreter.set_tensor(i["index"], a)
            invoke, get = interpreter.invoke, lambda: interpreter.get_tensor(o["index"]).copy()
        q_in, q_out = meta["input"], meta["output"]
        outs = []
        for seq in x:
            reset()
            put(runtimes.quantize(seq[None], (q_in["scale"], q_in["zero_point"]), np.dtype(q_in["dtype"]))
                if q_in.get("scale") else seq[None])
            invoke()
            outs.append(get()[0])
    out = np.stack(outs)
    if raw or not q_out.get("scale"):
        return out
    return runtimes.dequantize(out, (q_out["scale"], q_out["zero_point"]))


def time_sequence(tflite, x, runtime="tflm", repeats=None):
    """Seconds per sequence on `runtime`: {"invoke": median of the summed invoke() times,
    "loop": median wall time of the whole Python loop (invokes + state copies + I/O)}.

    The firmware's loop does what `invoke` measures plus a few `memcpy`s; the
    Python loop's I/O costs much more than that on a host.
    """
    meta = metadata(tflite)
    if meta.get("form") == "fused":  # one invoke per sequence
        return {"invoke": runtimes.time_tflm(tflite) if runtime == "tflm" else runtimes.time_litert(tflite),
                "loop": None, "sequences": None}
    set_input, invoke, get_output = _session(tflite, runtime)
    states = meta["states"]
    in_q = meta["input"]
    x = np.asarray(x, np.float32)
    invokes, loops = [], []
    for n in range(len(x) if repeats is None else repeats):
        seq = x[n % len(x)]
        spent = 0.0
        start = time.perf_counter()
        carried = [np.full((1, s["size"]), s.get("zero_point", 0), s["dtype"]) for s in states]
        for t in range(seq.shape[0]):
            for k, value in enumerate(carried):
                set_input(1 + k, value)
            v = seq[t:t + 1]
            set_input(0, runtimes.quantize(v, (in_q["scale"], in_q["zero_point"]), np.dtype(in_q["dtype"]))
                      if in_q.get("scale") else v)
            t0 = time.perf_counter()
            invoke()
            spent += time.perf_counter() - t0
            carried = [get_output(1 + k) for k in range(len(states))]
        get_output(0)
        loops.append(time.perf_counter() - start)
        invokes.append(spent)
    return {"invoke": float(np.median(invokes)), "loop": float(np.median(loops)), "sequences": len(invokes)}


# --------------------------------------------------------------------------
# The C++ loop that goes with the TFLM C files.

def sequence_header(meta, stem, model_symbol=None):
    """Text of `<stem>_sequence.h`: a documented C++ loop over time steps for tflite-micro."""
    from tf_sparsity.export.c_array import c_identifier

    ident = c_identifier(stem)
    macro = f"G_{ident.upper()}"
    fn = f"{ident}_run_sequence"
    states = meta["states"]
    int8 = bool(meta["input"].get("scale"))  # quantized (int8, or int16 activations)
    wide = meta["input"].get("dtype") == "int16"
    ctype = ("int16_t" if wide else "int8_t") if int8 else "float"
    field = ("i16" if wide else "int8") if int8 else "f"
    low, high = (-32768, 32767) if wide else (-128, 127)
    lines = [
        f"// Generated by tf_sparsity.export: run the one-step model g_{ident}_model_data over a",
        "// whole sequence on tflite-micro, carrying the recurrent state between invokes.",
        "//",
        "// The model is ONE time step: input 0 is x_t [1, features]; inputs 1..S are the states;",
        "// output 0 is the head's output, outputs 1..S the new states (same shapes and, for int8,",
        "// the same quantization as the state inputs, so carrying a state is a memcpy).",
        "// The zero state of an int8 model is its zero point, not 0.",
        "//",
        "// Usage (the op resolver needs the ops listed below):",
        f"//   #include \"{stem}.h\"",
        f"//   #include \"{stem}_sequence.h\"",
        f"//   alignas(16) static uint8_t arena[{macro}_MODEL_DATA_ARENA_BYTES + 1024];",
        f"//   const tflite::Model* model = tflite::GetModel(g_{ident}_model_data);",
        f"//   tflite::MicroMutableOpResolver<{macro}_NUM_OPS> resolver;  // Add{' / Add'.join(meta.get('op_names', ['...']))}",
        "//   tflite::MicroInterpreter interpreter(model, resolver, arena, sizeof(arena));",
        "//   interpreter.AllocateTensors();",
        f"//   {fn}(interpreter, x, {macro}_STEPS, logits);   // x: float[steps * features]",
        "",
        f"#ifndef {macro}_SEQUENCE_H_",
        f"#define {macro}_SEQUENCE_H_",
        "",
        "#include <math.h>",
        "#include <stdint.h>",
        "#include <string.h>",
        "",
        "#include \"tensorflow/lite/micro/micro_interpreter.h\"",
        "",
        f"#define {macro}_STEPS {int(meta['steps'] or 0)}  // sequence length seen at export (any length runs)",
        f"#define {macro}_FEATURES {int(meta['features'])}",
        f"#define {macro}_NUM_STATES {len(states)}",
        f"#define {macro}_NUM_OPS {len(meta.get('op_names', [])) or 16}",
    ]
    if int8:
        lines += [f"#define {macro}_INPUT_SCALE {meta['input']['scale']!r}f",
                  f"#define {macro}_INPUT_ZERO_POINT {meta['input']['zero_point']}",
                  f"#define {macro}_OUTPUT_SCALE {meta['output']['scale']!r}f",
                  f"#define {macro}_OUTPUT_ZERO_POINT {meta['output']['zero_point']}"]
    for k, s in enumerate(states):
        lines.append(f"// state {k}: layer '{s['layer']}' state {s['index']}, {s['size']} values"
                     + (f", {s['dtype']} scale {s['scale']!r}, zero point {s['zero_point']}" if int8 else ", float32"))
    sizes = ", ".join(str(s["size"]) for s in states)
    zeros = ", ".join(str(s.get("zero_point", 0)) for s in states)
    lines += [
        f"static const int {ident}_state_sizes[{macro}_NUM_STATES] = {{{sizes}}};",
        f"static const int {ident}_state_zero_points[{macro}_NUM_STATES] = {{{zeros}}};",
        "",
        "// Runs `steps` time steps of `x` (float, row-major [steps][features]) from the zero",
        "// state and copies the head's output after the last step to `output`",
        f"// ({ctype}; size of output tensor 0). Returns kTfLiteError if an invoke fails.",
        f"inline TfLiteStatus {fn}(tflite::MicroInterpreter& interpreter, const float* x, int steps,",
        f"                              {ctype}* output) {{",
        f"  for (int s = 0; s < {macro}_NUM_STATES; ++s) {{",
        "    TfLiteTensor* state = interpreter.input(1 + s);",
        f"    for (int i = 0; i < {ident}_state_sizes[s]; ++i) state->data.{field}[i] = "
        f"{'(' + ctype + ')' + ident + '_state_zero_points[s]' if int8 else '0.0f'};",
        "  }",
        "  for (int t = 0; t < steps; ++t) {",
        "    TfLiteTensor* in = interpreter.input(0);",
        f"    for (int f = 0; f < {macro}_FEATURES; ++f) {{",
        f"      const float v = x[t * {macro}_FEATURES + f];",
    ]
    if int8:
        lines += [
            f"      long q = lroundf(v / {macro}_INPUT_SCALE) + {macro}_INPUT_ZERO_POINT;",
            f"      in->data.{field}[f] = ({ctype})(q < {low} ? {low} : (q > {high} ? {high} : q));",
        ]
    else:
        lines.append("      in->data.f[f] = v;")
    lines += [
        "    }",
        "    if (interpreter.Invoke() != kTfLiteOk) return kTfLiteError;",
        "    // Carry the state: new state (output 1 + s) -> state input (input 1 + s). memmove:",
        "    // the memory planner may place an output where an input lived.",
        f"    for (int s = 0; s < {macro}_NUM_STATES; ++s) {{",
        "      memmove(interpreter.input(1 + s)->data.raw, interpreter.output(1 + s)->data.raw,",
        "              interpreter.output(1 + s)->bytes);",
        "    }",
        "  }",
        "  TfLiteTensor* out = interpreter.output(0);",
        "  memcpy(output, out->data.raw, out->bytes);",
        "  return kTfLiteOk;",
        "}",
        "",
        f"#endif  // {macro}_SEQUENCE_H_",
        "",
    ]
    if meta.get("sequence_output"):
        lines.insert(8, "// The last recurrent layer returns sequences: output 0 after EVERY invoke is that step's output.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The result object.

@dataclasses.dataclass(repr=False)
class RecurrentExportResult(ExportResult):
    """`ExportResult` of a step model: also runs whole sequences on the runtime.

    `run_sequence(x)` runs float sequences `[n, steps, features]` on the
    target's runtime (tflite-micro for `tflm`, LiteRT otherwise), carrying
    the state between invokes as the firmware does; `time_sequence(x)` times
    it.
    """

    def _runtime(self, runtime):
        return runtime or ("tflm" if self.target == "tflm" else "litert")

    def run_sequence(self, x, runtime=None, initial_state=None, raw=False):
        """Outputs of whole sequences (see `tf_sparsity.export.recurrent.run_sequence`)."""
        return run_sequence(self.tflite, x, runtime=self._runtime(runtime), initial_state=initial_state, raw=raw)

    def time_sequence(self, x, runtime=None):
        """Median seconds per sequence (see `tf_sparsity.export.recurrent.time_sequence`)."""
        return time_sequence(self.tflite, x, runtime=self._runtime(runtime))

    def __repr__(self):
        return (f"<RecurrentExportResult target={self.target!r} quantize={self.quantize!r} form='step' "
                f"{len(self.tflite):,} bytes path={self.path!r}>")


# --------------------------------------------------------------------------
# convert(..., recurrent="step")

def convert_step(model, spec, quantize, representative_data, path, verify, *, input_shape, c_files,
                 calibration_steps, verify_samples, batch_size, compress, report, reason):
    """The step-form branch of `tfs.export.convert` (arguments as there)."""
    from tf_sparsity.export import conversion
    from tf_sparsity.export.c_array import write_c_array
    from tf_sparsity.export.inspection import inspect

    target = spec.name
    if batch_size != 1:
        raise ValueError(f"recurrent='step' exports batch 1 (one sequence at a time); received batch_size={batch_size!r}.")
    prepared = conversion._prepare(model, unroll=False, notes=report.notes)
    plan = step_plan(prepared)
    sequences = _sequences(model, plan, input_shape, representative_data, calibration_steps, verify_samples)
    if plan.steps is None:
        plan.steps = sequences.shape[1] if sequences is not None else None
    if plan.steps is None:
        raise ValueError(
            "recurrent='step': the sequence length is unknown (model input (None, None, "
            f"{plan.features})); pass input_shape=(steps, {plan.features}) or representative_data of shape "
            f"(n, steps, {plan.features}). The step model runs any length; the length is needed to verify it "
            "and for the C loop.")
    if quantize == "int8" and sequences is None:
        raise ValueError(
            f"quantize='int8'{'' if target == 'litert' else f' (required by target {target!r})'} needs "
            f"`representative_data`: about 100 typical sequences, an array of shape (n, {plan.steps}, "
            f"{plan.features}) such as x_train[:100]. Every time step of them calibrates the int8 ranges of the "
            "inputs, the states and the activations.")
    step = step_function(plan)
    calibration = []
    if quantize == "int8":
        _, recorded = _rollout(step, plan, sequences[:calibration_steps], record=True)
        calibration = _calibration_steps(recorded, _MAX_CALIBRATION_STEPS)
    tflite, meta = _finish_step_model(
        _convert_step_model(prepared, plan, quantize, calibration, per_channel=_PER_CHANNEL), plan, quantize)
    choice = None
    if quantize == "int8":
        tflite, meta, choice = _choose_state_dtype(prepared, plan, calibration, sequences, tflite, meta, target,
                                                   model)
        if choice["chosen"] == "int16":
            report.notes.append("int16 activations and states (16x8: int8 weights): " + choice["reason"])
    info = inspect(tflite)
    meta["op_names"] = sorted(info.op_counts)
    verdict = info.verdict(target)
    if target == "edgetpu":
        report.preflight = verdict
        if verdict.first_fallback is not None:
            report.warnings.append(f"EdgeTPU: {verdict.first_fallback} — this op and everything after it "
                                   "run on the CPU")
    elif not verdict.ok:
        conversion._raise_unsupported(verdict, target)
    report.warnings += [w for w in verdict.warnings if target != "edgetpu" or "maps ops only" not in w]
    rec = {"form": "step", "reason": reason, "state_dtype": meta["states"][0]["dtype"] if meta["states"] else None,
           "state_dtype_choice": choice, "steps": plan.steps, "features": plan.features,
           "states": meta["states"], "sequence_output": plan.sequence_output,
           "layers": [l.name for l in plan.chain]}
    report.recurrent = rec
    report.notes.append(f"exported one time step (recurrent='step'): {len(plan.states)} state(s) carried by the "
                        "caller; weights stored once; run whole sequences with result.run_sequence(x)")
    if verify:
        samples = sequences[:verify_samples] if sequences is not None else _random_sequences(plan, verify_samples)
        if sequences is None:
            report.notes.append(f"verified on {len(samples)} random normal sequences (no representative_data)")
        expected = _keras_sequences(model, samples)
        litert = run_sequence(tflite, samples, runtime="litert", raw=True)
        report.verification = {"runtime": "ai_edge_litert (default XNNPack delegate), per sequence",
                               **_agreement(litert, expected, meta)}
        conversion._warn_on_mismatch(report)
        if quantize == "int8":
            rec["state_quantization"] = _state_effect(step, plan, samples, meta, expected)
        if target == "tflm":
            tflite = _verify_tflm_step(tflite, samples, expected, meta, compress, report, litert)
            info = inspect(tflite)
    elif compress is not None:
        tflite, _ = conversion._lut_compress(tflite, report)
        info = inspect(tflite)
    if target == "edgetpu":
        report.notes.append("edgetpu_compiler is not on PATH: preflight only" if not runtimes.edgetpu_compiler()
                            else "edgetpu_compiler not run for step models")
    if target == "tflm" and "candidates" not in report.compression:
        report.compression.update(conversion.lut_candidates(tflite))
    conversion._fill_report(report, info)
    rec["file_bytes"] = len(tflite)
    rec["arena_bytes"] = report.tflm.get("arena_bytes")
    written, c_paths = None, ()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        from tf_sparsity.export.atomic import atomic_write

        written = atomic_write(path, tflite)
        if c_files if c_files is not None else target == "tflm":
            c_paths = write_c_array(tflite, path, arena_bytes=report.tflm.get("arena_bytes"))
            root = os.path.splitext(os.fspath(path))[0]
            header = root + "_sequence.h"
            atomic_write(header, sequence_header(meta, os.path.basename(root)).encode())
            c_paths = tuple(c_paths) + (header,)
    return RecurrentExportResult(tflite=tflite, path=written, target=target, quantize=quantize, report=report,
                                 c_files=tuple(c_paths))


# int8 states are kept when the int8 step model agrees with Keras on this share of the
# calibration sequences' predictions (classifiers) or within this fraction of the output
# scale (other heads); otherwise int16 activations and states (16x8) are tried.
_INT8_AGREEMENT, _INT8_RELATIVE_ERROR, _CHOICE_SEQUENCES = 0.98, 0.05, 64


def _score(tflite, meta, check, want):
    got = run_sequence(tflite, check, runtime="reference", raw=True)
    result = _agreement(got, want, meta)
    if "argmax_agreement" in result:
        result["ok"] = result["argmax_agreement"] >= _INT8_AGREEMENT
        result["score"] = result["argmax_agreement"]
    else:
        relative = result["max_abs_diff"] / max(result["output_scale"], 1e-6)
        result["ok"], result["score"] = relative <= _INT8_RELATIVE_ERROR, -relative
    return result


def _choose_state_dtype(prepared, plan, calibration, sequences, tflite, meta, target, model):
    """int8 states, or int16 (16x8) where int8 loses predictions: measured on the calibration sequences.

    Run on LiteRT's reference kernels (the kernels tflite-micro ports). The
    EdgeTPU runs int8 only, so it keeps int8 (with a warning in the report
    when it loses predictions).
    """
    check = sequences[:_CHOICE_SEQUENCES]
    want = _keras_sequences(model, check)
    int8 = _score(tflite, meta, check, want)
    measured = {"int8": {k: v for k, v in int8.items() if k != "ok"}, "sequences": len(check)}
    if int8["ok"]:
        return tflite, meta, {"chosen": "int8", "reason": "int8 keeps the predictions", "measured": measured}
    if target == "edgetpu":
        return tflite, meta, {"chosen": "int8", "measured": measured,
                              "reason": "the EdgeTPU runs int8 only (int8 states lose predictions here)"}
    from tf_sparsity.export.inspection import inspect

    try:
        wide, wide_meta = _finish_step_model(_convert_step_model(
            prepared, plan, "int8", calibration, per_channel=_PER_CHANNEL, activations="int16"), plan, "int8")
        if not inspect(wide).verdict(target).ok:
            raise ExportError("ops without int16 kernels on " + target)
        int16 = _score(wide, wide_meta, check, want)
    except (ExportError, VerificationError) as error:
        measured["int16"] = {"error": str(error)[:300]}
        return tflite, meta, {"chosen": "int8", "measured": measured, "reason": f"int16 not possible: {error}"[:300]}
    measured["int16"] = {k: v for k, v in int16.items() if k != "ok"}
    if int16["score"] > int8["score"]:
        what = (f"int8 states agree with Keras on {int8['score']:.1%} of {len(check)} calibration sequences, "
                f"int16 on {int16['score']:.1%}" if "argmax_agreement" in int8 else
                "int8 states leave a larger output error than int16")
        return wide, wide_meta, {"chosen": "int16", "reason": what, "measured": measured}
    return tflite, meta, {"chosen": "int8", "reason": "int16 was not better", "measured": measured}


def _sequences(model, plan, input_shape, data, calibration_steps, verify_samples):
    """Representative sequences as one float array [n, T, F] (validated), or None."""
    from tf_sparsity.export import conversion

    if data is None:
        if input_shape is not None:
            shape = conversion._given_shapes(input_shape, 1)[0]
            if len(shape) != 2 or shape[1] not in (None, plan.features) or (
                    plan.steps is not None and shape[0] not in (None, plan.steps)):
                raise ValueError(f"`input_shape` {tuple(shape)} does not fit the model's sequence input "
                                 f"({plan.steps}, {plan.features}) (batch dimension excluded).")
            plan.steps = plan.steps or shape[0]
        return None
    spec = {"name": "x", "shape": [1, plan.steps, plan.features], "dtype": "float32"}
    arrays = conversion._samples(data, [spec], limit=max(calibration_steps, verify_samples))
    if not arrays:
        return None
    return np.concatenate([a[0] for a in arrays]).astype(np.float32)


def _keras_sequences(model, samples):
    """Keras outputs of whole sequences from the zero state (stateful layers: one by one, state restored)."""
    stateful = [l for l in recurrent_layers(model) if getattr(l, "stateful", False)]
    if not stateful:
        return np.asarray(model(samples, training=False))
    saved = [[np.asarray(v) for v in (l.states or [])] for l in stateful]
    try:
        outs = []
        for k in range(len(samples)):
            for layer in stateful:
                layer.reset_state()
            outs.append(np.asarray(model(samples[k:k + 1], training=False))[0])
        return np.stack(outs)
    finally:
        for layer, values in zip(stateful, saved):
            for variable, value in zip(layer.states or [], values):
                variable.assign(value)


def _random_sequences(plan, n):
    return np.random.default_rng(0).normal(size=(n, plan.steps, plan.features)).astype(np.float32)


def _agreement(raw, expected, meta):
    """Per-sequence agreement of runtime outputs (raw I/O dtype) with Keras outputs."""
    q = meta["output"]
    expected = np.asarray(expected, np.float32).reshape(raw.shape)
    if q.get("scale"):
        params = (q["scale"], q["zero_point"])
        value = runtimes.dequantize(raw, params)
        steps = np.abs(raw.astype(np.int64) - runtimes.quantize(expected, params, np.int64))
        out = {"max_error_steps": float(steps.max())}
    else:
        value, out = raw.astype(np.float32), {}
    out["samples"] = len(raw)
    out["max_abs_diff"] = float(np.max(np.abs(value - expected))) if value.size else 0.0
    if raw.shape[-1] > 1:
        out["argmax_agreement"] = float(np.mean(np.argmax(value, -1) == np.argmax(expected, -1)))
    out["output_scale"] = float(np.max(np.abs(expected))) if expected.size else 1.0
    return out


def _state_effect(step, plan, samples, meta, expected):
    """What int8 states alone cost: the float step model with its states rounded to the int8 grid."""
    params = [(s["scale"], s["zero_point"], s["dtype"]) for s in meta["states"]]
    rounded, _ = _rollout(step, plan, samples, state_params=params)
    exact, _ = _rollout(step, plan, samples)
    diff = float(np.max(np.abs(rounded - exact)))
    info = lambda s: np.iinfo(np.dtype(s["dtype"]))  # noqa: E731
    entry = {"dtype": meta["states"][0]["dtype"] if meta["states"] else "int8",
             "states": [{"layer": s["layer"], "index": s["index"], "scale": s["scale"],
                         "zero_point": s["zero_point"],
                         "range": [(info(s).min - s["zero_point"]) * s["scale"],
                                   (info(s).max - s["zero_point"]) * s["scale"]]}
                        for s in meta["states"]],
             "float_step_vs_keras_max_abs_diff": float(np.max(np.abs(exact - np.asarray(expected).reshape(exact.shape)))),
             "quantized_states_only_max_abs_diff": diff, "samples": len(samples)}
    if exact.shape[-1] > 1:
        entry["quantized_states_only_argmax_agreement"] = float(np.mean(np.argmax(rounded, -1) == np.argmax(exact, -1)))
    return entry


def _verify_tflm_step(tflite, samples, expected, meta, compress, report, litert):
    from tf_sparsity.export import conversion

    q = meta["input"]
    first = [runtimes.quantize(samples[0, :1], (q["scale"], q["zero_point"]), np.dtype(q["dtype"]))
             if q.get("scale") else samples[0, :1]]
    first += [np.full((1, s["size"]), s.get("zero_point", 0), s["dtype"]) for s in meta["states"]]
    arena = conversion._tflm_checked(runtimes.tflm_arena_bytes, tflite, first)
    micro = run_sequence(tflite, samples, runtime="tflm", raw=True)
    reference = run_sequence(tflite, samples, runtime="reference", raw=True)
    vs_ref = np.abs(micro.astype(np.int64) - reference.astype(np.int64))
    vs_keras = _agreement(micro, expected, meta)
    report.tflm = {"runtime": "tflite-micro Python interpreter, one invoke per time step",
                   "arena_bytes": arena, "max_diff_vs_reference_steps": float(vs_ref.max()),
                   "samples": len(samples),
                   "max_error_vs_keras_steps": vs_keras.get("max_error_steps", vs_keras["max_abs_diff"])}
    if "argmax_agreement" in vs_keras:
        report.tflm["argmax_agreement_vs_keras"] = vs_keras["argmax_agreement"]
    report.recurrent["per_sequence_agreement"] = {"tflm_vs_keras": vs_keras,
                                                  "tflm_vs_litert_reference_max_steps": float(vs_ref.max()),
                                                  "tflm_identical_to_reference": float(np.mean(
                                                      vs_ref.reshape(len(vs_ref), -1).max(1) == 0))}
    one_step = 1 if meta["output"].get("dtype") != "int16" else 256  # int16 steps are 256x finer
    if vs_ref.max() > one_step:
        report.warnings.append(f"tflite-micro differs from LiteRT's reference kernels by {vs_ref.max():g} "
                               "quantization steps after the whole sequence (single-op rounding differences "
                               "compound through the carried state)")
    if compress == "lut":
        compressed, saved = conversion._lut_compress(tflite, report)
        if saved > 0:
            report.compression["arena_bytes"] = conversion._tflm_checked(runtimes.tflm_arena_bytes, compressed, first)
            same = np.array_equal(run_sequence(compressed, samples, runtime="tflm", raw=True), micro)
            report.compression["outputs_identical"] = bool(same)
            tflite = compressed
    return tflite


def convert_form(form, model, spec, quantize, representative_data, path, verify, **kwargs):
    """`convert`'s call-out for the forms this module builds ("step", "fused")."""
    if form == "step":
        return convert_step(model, spec, quantize, representative_data, path, verify, **kwargs)
    return convert_fused(model, spec, quantize, representative_data, path, verify, **kwargs)


# --------------------------------------------------------------------------
# fused: LSTM as UNIDIRECTIONAL_SEQUENCE_LSTM, rebuilt in tf_keras in a child process.

# The child never imports tf_sparsity (Keras 3) and the parent never imports
# tf_keras: the env var that switches tf.keras to Keras 2 is set for the child only.
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
    from tf_sparsity.export import conversion
    from tf_sparsity.export.atomic import atomic_write
    from tf_sparsity.export.c_array import write_c_array
    from tf_sparsity.export.inspection import inspect

    target = spec.name
    if batch_size != 1:
        raise ValueError(f"recurrent='fused' exports batch 1; received batch_size={batch_size!r}.")
    input_specs = conversion._input_specs(model, 1, input_shape, representative_data, spec)
    samples = conversion._samples(representative_data, input_specs, limit=max(calibration_steps, verify_samples))
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
        conversion._raise_unsupported(verdict, target)
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
        conversion._warn_on_mismatch(report)
        if target == "tflm":
            micro = _run_fused(tflite, checks, "tflm", meta, True, None)
            ref = _run_fused(tflite, checks, "reference", meta, True, None)
            vs_keras = _agreement(micro, expected, meta)
            arena = conversion._tflm_checked(runtimes.tflm_arena_bytes, tflite, [
                runtimes.quantize(checks[:1], (meta["input"]["scale"], meta["input"]["zero_point"]), np.int8)
                if meta["input"].get("scale") else checks[:1]])
            report.tflm = {"runtime": "tflite-micro Python interpreter, reset per sequence", "arena_bytes": arena,
                           "max_diff_vs_reference_steps": float(np.max(np.abs(micro.astype(np.int64)
                                                                               - ref.astype(np.int64)))),
                           "samples": len(checks),
                           "max_error_vs_keras_steps": vs_keras.get("max_error_steps", vs_keras["max_abs_diff"])}
            if "argmax_agreement" in vs_keras:
                report.tflm["argmax_agreement_vs_keras"] = vs_keras["argmax_agreement"]
    conversion._fill_report(report, info)
    report.recurrent.update(file_bytes=len(tflite), arena_bytes=report.tflm.get("arena_bytes"))
    written, c_paths = None, ()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        written = atomic_write(path, tflite)
        if c_files if c_files is not None else target == "tflm":
            c_paths = write_c_array(tflite, path, arena_bytes=report.tflm.get("arena_bytes"))
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
