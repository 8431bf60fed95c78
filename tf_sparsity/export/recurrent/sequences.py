"""Running whole sequences on a step (or fused) model, timing them, and the C++ loop header."""


import dataclasses
import re
import time

import numpy as np

from tf_sparsity.export import runtimes
from tf_sparsity.export.errors import VerificationError
from tf_sparsity.export.result import ExportResult

from tf_sparsity.export.recurrent.step_model import metadata


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


def _head_runner(meta, head, runtime, arena_size):
    """`fn(carried states) -> output [1, ...]`: the head model once on the final state (split step models)."""
    split = meta.get("head")
    if not split:
        return None
    k = split["state"]
    if not split["model"]:  # nothing after the recurrent layer: the output is that state
        return lambda carried: carried[k]
    if head is None:
        raise ValueError("this step model runs its head as a separate model once per sequence: pass "
                         "`head=result.head` (the bytes of `<stem>_head.tflite`).")
    set_input, invoke, get_output = _session(head, runtime, arena_size)

    def run(carried):
        set_input(0, carried[k])
        invoke()
        return get_output(0)

    return run


def run_sequence(tflite, x, runtime="tflm", initial_state=None, raw=False, arena_size=None, head=None):
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
        head: the head model (`result.head`) when the step model has its
            head split off: it runs once, on the final state.

    Returns:
        The head's output after the last step, `[n, ...]`; `[n, steps, ...]`
        when the last recurrent layer returns sequences.

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((10, 2)), keras.layers.SimpleRNN(4), keras.layers.Dense(2)])
    >>> x = np.random.default_rng(1).normal(size=(20, 10, 2)).astype("float32")
    >>> r = tfs.export.convert(m, recurrent="step")          # float, LiteRT
    >>> y = run_sequence(r.tflite, x[:3], runtime="litert", head=r.head)  # head: once per sequence
    >>> bool(np.allclose(y, m(x[:3]), atol=1e-4))
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
    run_head = _head_runner(meta, head, runtime, arena_size)
    outputs = [s["output"] for s in states]
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
                    carried = [get_output(j) for j in outputs]
                    if meta["sequence_output"] or t == x.shape[1] - 1:
                        per_step.append(get_output(0) if run_head is None else run_head(carried))
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


def time_sequence(tflite, x, runtime="tflm", repeats=None, head=None):
    """Seconds per sequence on `runtime`: {"invoke": median of the summed invoke() times,
    "loop": median wall time of the whole Python loop (invokes + state copies + I/O)}.

    The firmware's loop does what `invoke` measures plus a few `memcpy`s; the
    Python loop's I/O costs much more than that on a host. A split-off head
    (`head`) is invoked once per sequence and counted in both.
    """
    meta = metadata(tflite)
    if meta.get("form") == "fused":  # one invoke per sequence
        return {"invoke": runtimes.time_tflm(tflite) if runtime == "tflm" else runtimes.time_litert(tflite),
                "loop": None, "sequences": None}
    set_input, invoke, get_output = _session(tflite, runtime)
    run_head = _head_runner(meta, head, runtime, None)
    states = meta["states"]
    outputs = [s["output"] for s in states]
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
            carried = [get_output(j) for j in outputs]
        if run_head is None:
            get_output(0)
        else:
            t0 = time.perf_counter()
            run_head(carried)
            spent += time.perf_counter() - t0
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
    split = meta.get("head") or None
    head_model = bool(split and split["model"])
    int8 = bool(meta["input"].get("scale"))  # quantized (int8, or int16 activations)
    wide = meta["input"].get("dtype") == "int16"
    ctype = ("int16_t" if wide else "int8_t") if int8 else "float"
    out_ctype = {"int8": "int8_t", "int16": "int16_t"}.get(meta["output"].get("dtype"), "float")
    field = ("i16" if wide else "int8") if int8 else "f"
    low, high = (-32768, 32767) if wide else (-128, 127)
    first = 0 if split else 1
    ops = " / Add".join(meta.get("op_names", ["..."]))
    lines = [
        f"// Generated by tf_sparsity.export: run the one-step model g_{ident}_model_data over a",
        "// whole sequence on tflite-micro, carrying the recurrent state between invokes.",
        "//",
        "// The model is ONE time step: input 0 is x_t [1, features]; inputs 1..S are the states;",
        ("// outputs 0..S-1 are the new states" if split else
         "// output 0 is the head's output, outputs 1..S the new states") +
        " (same shapes and, for int8,",
        "// the same quantization as the state inputs, so carrying a state is a memcpy).",
        "// The zero state of an int8 model is its zero point, not 0.",
    ]
    if head_model:
        lines += [
            f"// The head (the layers after the recurrent layer) is a second model, g_{ident}_head_model_data",
            f"// ({stem}_head.h), invoked ONCE per sequence on the final state {split['state']}; its input has",
            "// that state's quantization (a memcpy again). It needs its own interpreter and arena.",
        ]
    elif split:
        lines.append(f"// The output is the final state {split['state']} (no layers after the recurrent layer).")
    lines += [
        "//",
        "// Usage (the op resolver needs the ops listed below):",
        f"//   #include \"{stem}.h\"",
        *([f"//   #include \"{stem}_head.h\""] if head_model else []),
        f"//   #include \"{stem}_sequence.h\"",
        f"//   alignas(16) static uint8_t arena[{macro}_MODEL_DATA_ARENA_BYTES + 1024];",
        f"//   const tflite::Model* model = tflite::GetModel(g_{ident}_model_data);",
        f"//   tflite::MicroMutableOpResolver<{macro}_NUM_OPS> resolver;",
        f"//   {ident}_add_ops(resolver);  // Add{ops}",
        "//   tflite::MicroInterpreter interpreter(model, resolver, arena, sizeof(arena));",
        "//   interpreter.AllocateTensors();",
    ]
    if head_model:
        head_ops = " / Add".join(split.get("op_names", ["..."]))
        lines += [
            f"//   alignas(16) static uint8_t head_arena[{macro}_HEAD_MODEL_DATA_ARENA_BYTES + 512];",
            f"//   tflite::MicroMutableOpResolver<{macro}_HEAD_NUM_OPS> head_resolver;",
            f"//   {ident}_add_head_ops(head_resolver);  // Add{head_ops}",
            f"//   tflite::MicroInterpreter head(tflite::GetModel(g_{ident}_head_model_data), head_resolver,",
            "//                                 head_arena, sizeof(head_arena));",
            "//   head.AllocateTensors();",
            f"//   {fn}(interpreter, head, x, {macro}_STEPS, logits);   // x: float[steps * features]",
        ]
    else:
        lines.append(f"//   {fn}(interpreter, x, {macro}_STEPS, logits);   // x: float[steps * features]")
    lines += [
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
        f"#define {macro}_STATE_OUTPUT_OFFSET {first}  // output index of state 0",
        f"#define {macro}_NUM_OPS {len(meta.get('op_names', [])) or 16}",
    ]
    if head_model:
        lines.append(f"#define {macro}_HEAD_NUM_OPS {len(split.get('op_names', [])) or 8}")
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
    head_arg = "tflite::MicroInterpreter& head, " if head_model else ""
    lines += [
        f"static const int {ident}_state_sizes[{macro}_NUM_STATES] = {{{sizes}}};",
        f"static const int {ident}_state_zero_points[{macro}_NUM_STATES] = {{{zeros}}};",
        "",
        "// Runs `steps` time steps of `x` (float, row-major [steps][features]) from the zero",
        "// state and copies the output after the last step to `output`",
        f"// ({out_ctype}; the size of the output tensor). Returns kTfLiteError if an invoke fails.",
        f"inline TfLiteStatus {fn}(tflite::MicroInterpreter& interpreter, {head_arg}const float* x,",
        f"                              int steps, {out_ctype}* output) {{",
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
        "    // Carry the state: new state (output OFFSET + s) -> state input (input 1 + s). memmove:",
        "    // the memory planner may place an output where an input lived.",
        f"    for (int s = 0; s < {macro}_NUM_STATES; ++s) {{",
        f"      const TfLiteTensor* next = interpreter.output({macro}_STATE_OUTPUT_OFFSET + s);",
        "      memmove(interpreter.input(1 + s)->data.raw, next->data.raw, next->bytes);",
        "    }",
        "  }",
    ]
    if head_model:
        lines += [
            f"  const TfLiteTensor* last = interpreter.output({macro}_STATE_OUTPUT_OFFSET + {split['state']});",
            "  memcpy(head.input(0)->data.raw, last->data.raw, last->bytes);  // same quantization",
            "  if (head.Invoke() != kTfLiteOk) return kTfLiteError;",
            "  TfLiteTensor* out = head.output(0);",
        ]
    elif split:
        lines.append(f"  const TfLiteTensor* out = interpreter.output({macro}_STATE_OUTPUT_OFFSET + {split['state']});")
    else:
        lines.append("  TfLiteTensor* out = interpreter.output(0);")
    lines += [
        "  memcpy(output, out->data.raw, out->bytes);",
        "  return kTfLiteOk;",
        "}",
        "",
        f"#endif  // {macro}_SEQUENCE_H_",
        "",
    ]
    lines[-2:-2] = _add_ops_function(f"{ident}_add_ops", meta.get("op_names"), "step model") + (
        _add_ops_function(f"{ident}_add_head_ops", split.get("op_names"), "head model") if head_model else [])
    if meta.get("sequence_output"):
        lines.insert(8, "// The last recurrent layer returns sequences: output 0 after EVERY invoke is that step's output.")
    return "\n".join(lines)


# tflite-micro's MicroMutableOpResolver method per builtin op, where it is not the CamelCase of the name.
_RESOLVER_METHODS = {"BATCH_MATMUL": "BatchMatMul", "UNIDIRECTIONAL_SEQUENCE_LSTM": "UnidirectionalSequenceLSTM",
                     "PADV2": "PadV2"}


def resolver_method(op_name):
    """`MicroMutableOpResolver` method that registers a builtin op ('FULLY_CONNECTED' -> 'AddFullyConnected').

    >>> resolver_method("FULLY_CONNECTED"), resolver_method("CONV_2D")
    ('AddFullyConnected', 'AddConv2D')
    """
    name = _RESOLVER_METHODS.get(op_name) or re.sub(r"2d$", "2D", "".join(
        part.capitalize() for part in op_name.split("_")))
    return "Add" + name


def _add_ops_function(fn, op_names, what):
    """C++ lines of `template <typename R> TfLiteStatus fn(R& resolver)` registering `op_names`."""
    if not op_names:
        return []
    return ["", f"// Registers the {what}'s ops with `resolver` (e.g. a tflite::MicroMutableOpResolver<N>).",
            "template <typename Resolver>", f"inline TfLiteStatus {fn}(Resolver& resolver) {{",
            *[f"  if (resolver.{resolver_method(op)}() != kTfLiteOk) return kTfLiteError;" for op in op_names],
            "  return kTfLiteOk;", "}"]


# --------------------------------------------------------------------------
# The result object.

@dataclasses.dataclass(repr=False)
class RecurrentExportResult(ExportResult):
    """`ExportResult` of a step model: also runs whole sequences on the runtime.

    `run_sequence(x)` runs float sequences `[n, steps, features]` on the
    target's runtime (tflite-micro for `tflm`, LiteRT otherwise), carrying
    the state between invokes as the firmware does; `time_sequence(x)` times
    it. `head` holds the head model (the layers after the last recurrent
    layer, run once per sequence on the final state) when it is split off
    the step model, else None.
    """

    def _runtime(self, runtime):
        return runtime or ("tflm" if self.target == "tflm" else "litert")

    head: bytes | None = None

    def run_sequence(self, x, runtime=None, initial_state=None, raw=False):
        """Outputs of whole sequences (see `tf_sparsity.export.recurrent.run_sequence`)."""
        return run_sequence(self.tflite, x, runtime=self._runtime(runtime), initial_state=initial_state, raw=raw,
                            head=self.head)

    def time_sequence(self, x, runtime=None):
        """Median seconds per sequence (see `tf_sparsity.export.recurrent.time_sequence`)."""
        return time_sequence(self.tflite, x, runtime=self._runtime(runtime), head=self.head)

    def __repr__(self):
        head = f" + head {len(self.head):,} bytes" if self.head is not None else ""
        return (f"<RecurrentExportResult target={self.target!r} quantize={self.quantize!r} "
                f"form={(self.report.recurrent or {}).get('form', 'step')!r} {len(self.tflite):,} bytes{head} "
                f"path={self.path!r}>")


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
