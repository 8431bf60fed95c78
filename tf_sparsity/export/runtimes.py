"""Run .tflite models on the real runtimes: LiteRT, its reference kernels, and TFLM.

Used by `convert(verify=True)` and by the benchmarks. Everything takes and
returns numpy arrays in the model's own I/O dtypes; `quantize` /
`dequantize` convert float data for int8 models.
"""

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from tf_sparsity.export.errors import VerificationError


# --------------------------------------------------------------------------
# Quantization of I/O.

def quantize(x, params, dtype):
    """Float `x` -> integer `dtype` with `params = (scale, zero_point)`."""
    scale, zero = params
    if not scale:
        return np.asarray(x, dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float64) / scale + zero), info.min, info.max).astype(dtype)


def dequantize(q, params):
    scale, zero = params
    if not scale:
        return np.asarray(q, np.float32)
    return ((np.asarray(q, np.float64) - zero) * scale).astype(np.float32)


# --------------------------------------------------------------------------
# LiteRT.

def litert_interpreter(tflite, num_threads=1, reference=False):
    """An allocated `ai_edge_litert` Interpreter.

    `reference=True` uses the builtin *reference* kernels (no XNNPack, no
    optimized kernels): the bit-exact baseline TFLM's kernels are written to
    match. Load or allocation failures raise `VerificationError`.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {"model_content": bytes(tflite), "num_threads": num_threads}
    if reference:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
    try:
        interpreter = Interpreter(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as error:
        kind = "reference kernels" if reference else "default delegate (XNNPack)"
        hint = "" if reference else _collapsed_range_hint(tflite)
        raise VerificationError(f"LiteRT could not load the model with its {kind}: {error}{hint}") from None
    return interpreter


# A quantization scale this small means the tensor's calibrated range is empty.
_COLLAPSED_SCALE = 1e-9


def _collapsed_range_hint(tflite):
    # XNNPack refuses to prepare ops whose tensors have a (near) zero scale; name
    # them, since the delegate's own message does not.
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        details = Interpreter(model_content=bytes(tflite), experimental_op_resolver_type=(
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)).get_tensor_details()
    except (ValueError, RuntimeError):
        return ""
    names = [d["name"].split(";")[0] for d in details
             if len(d["quantization_parameters"]["scales"])
             and float(np.min(d["quantization_parameters"]["scales"])) < _COLLAPSED_SCALE]
    if not names:
        return ""
    return (f" These tensors have a collapsed int8 range (scale < {_COLLAPSED_SCALE:g}), which XNNPack "
            f"refuses: {names[:4]}{' ...' if len(names) > 4 else ''}. A tensor like this comes from an "
            "activation that is constant on `representative_data`, e.g. a ReLU unit that never fires (a "
            "squeeze-excite unit left by channel pruning): remove that unit (it carries no signal) or calibrate "
            "with data that makes it fire.")


def io_params(details):
    q = details.get("quantization", (0.0, 0))
    return float(q[0]), int(q[1])


def run_litert(tflite, samples, reference=False, interpreter=None):
    """Run each sample (a list of input arrays, batch included) -> list of output lists."""
    interpreter = interpreter or litert_interpreter(tflite, reference=reference)
    ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for sample in samples:
        for d, x in zip(ins, sample):
            interpreter.set_tensor(d["index"], np.asarray(x, d["dtype"]).reshape(d["shape"]))
        interpreter.invoke()
        results.append([interpreter.get_tensor(d["index"]).copy() for d in outs])
    return results


def time_litert(tflite, runs=200, warmup=20, num_threads=1):
    """Median seconds of one `invoke()` on LiteRT's default (XNNPack) path."""
    interpreter = litert_interpreter(tflite, num_threads=num_threads)
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    return _median_time(interpreter.invoke, runs, warmup)


def _median_time(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------
# TFLM.

@contextlib.contextmanager
def captured_stderr():
    """Capture what C++ code writes to file descriptor 2; yields a list that gets the text."""
    box = []
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (some embedded interpreters): nothing to capture
        yield box
        return
    sys.stderr.flush()  # keep Python's own buffered text out of (and in order around) the capture
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            box.append(sink.read().decode(errors="replace"))


def _tflm():
    from tflite_micro.python.tflite_micro import runtime

    return runtime


def tflm_interpreter(tflite, arena_size):
    """A tflite-micro interpreter with an arena of `arena_size` bytes."""
    return _tflm().Interpreter.from_bytes(bytes(tflite), arena_size=int(arena_size))


def run_tflm(tflite, samples, arena_size, interpreter=None):
    """Run each sample on tflite-micro -> list of output lists."""
    with captured_stderr() as log:
        try:
            interpreter = interpreter or tflm_interpreter(tflite, arena_size)
            n_in = len(samples[0]) if samples else 0
            n_out = _io_counts(tflite)[1]
            details = [interpreter.get_input_details(i) for i in range(n_in)]
            results = []
            for sample in samples:
                for i, x in enumerate(sample):
                    interpreter.set_input(np.asarray(x, details[i]["dtype"]).reshape(details[i]["shape"]), i)
                interpreter.invoke()
                results.append([np.array(interpreter.get_output(j)) for j in range(n_out)])
        except RuntimeError as error:
            failure = error
        else:
            failure = None
    if failure is not None:
        raise VerificationError(f"tflite-micro could not run the model: {failure}\n{log[0].strip()}") from None
    return results


def _io_counts(tflite):
    """(number of inputs, number of outputs) of the main subgraph."""
    from tf_sparsity.export import flatbuffer

    main = flatbuffer.read(tflite).subgraphs[0]
    return len(main.inputs), len(main.outputs)


def op_agreement(tflite, samples):
    """Which ops tflite-micro computes differently from LiteRT's reference kernels.

    Runs `samples` (lists of input arrays in the model's dtypes, as
    `run_litert`) on both runtimes with every op output exposed, and compares
    each op only where all its inputs are identical in both, so a difference
    is that op's own (not inherited). Returns a dict: `by_op` maps op names
    to `{"compared", "differing", "elements", "differing_elements",
    "max_steps"}` (ops, then output elements); `first_divergence` is the
    first differing op in execution order, `{"op_index", "op", "sample"}`, or
    None. Measured with it: int8 FULLY_CONNECTED differs (requantization
    rounding), CONV_2D does not (docs/low_rank.md).

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> x = np.random.default_rng(0).normal(size=(50, 8)).astype("float32")
    >>> blob = tfs.export.convert(m, quantize="int8", representative_data=x, verify=False).tflite
    >>> result = op_agreement(blob, [[np.ones((1, 8), "int8")]])
    >>> sorted(result["by_op"]), result["by_op"]["FULLY_CONNECTED"]["compared"]
    (['FULLY_CONNECTED'], 1)
    """
    from tf_sparsity.export import flatbuffer

    exposed, ops = flatbuffer.expose_op_outputs(tflite)
    model = flatbuffer.read(exposed)
    sub = model.subgraphs[0]
    position = {int(t): k for k, t in enumerate(sub.outputs)}
    inputs = [int(i) for i in sub.inputs]
    reference = run_litert(exposed, samples, reference=True)
    micro = run_tflm(exposed, samples, generous_arena(exposed))
    by_op, first = {}, None
    for n, (ref_row, micro_row, sample) in enumerate(zip(reference, micro, samples)):
        values = {t: (np.asarray(ref_row[k]), np.asarray(micro_row[k])) for t, k in position.items()}
        values.update({t: (np.asarray(x), np.asarray(x)) for t, x in zip(inputs, sample)})
        for index, (op, (name, k)) in enumerate(zip(sub.operators, ops)):
            if k is None or any(int(i) in values and not np.array_equal(*values[int(i)])
                                for i in op.inputs if i >= 0):
                continue
            r, m = (a.astype(np.int64) if a.dtype.kind in "iu" else a for a in (ref_row[k], micro_row[k]))
            stats = by_op.setdefault(name, {"compared": 0, "differing": 0, "elements": 0,
                                            "differing_elements": 0, "max_steps": 0})
            differ = r != m
            stats["compared"] += 1
            stats["differing"] += int(differ.any())
            stats["elements"] += int(r.size)
            stats["differing_elements"] += int(differ.sum())
            if differ.any():
                stats["max_steps"] = max(stats["max_steps"], float(np.max(np.abs(r - m))))
                if first is None or (index, n) < (first["op_index"], first["sample"]):
                    first = {"op_index": index, "op": name, "sample": n}
    return {"by_op": by_op, "first_divergence": first}


_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")

# Probes arenas in a child process: a too-small arena can crash tflite-micro
# (segfault) instead of raising, which must not take the caller down. The
# child prints each probe before and after running it, so the parent knows
# which size crashed and can restart the search without it.
_SEARCH = """
import sys, numpy as np
from tflite_micro.python.tflite_micro import runtime
model = open(sys.argv[1], "rb").read()
sample = np.load(sys.argv[2], allow_pickle=False)
names = sorted(sample.files, key=lambda n: int(n[1:]))
low, high, step = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def works(size):
    print("try", size, flush=True)
    try:
        interpreter = runtime.Interpreter.from_bytes(model, arena_size=size)
        for i, name in enumerate(names):
            interpreter.set_input(sample[name], i)
        interpreter.invoke()
    except RuntimeError:
        print("fail", size, flush=True)
        return False
    print("ok", size, flush=True)
    return True

while not works(high):
    low, high = high, high * 2
while high - low > step:
    mid = (low + high) // 2
    if works(mid):
        high = mid
    else:
        low = mid
"""


def generous_arena(tflite):
    """An arena surely large enough: 2x all activations + slack.

    tflite-micro's Python interpreter crashes the process (segfault) on
    some models when the arena is too small instead of raising, so
    in-process runs must never probe small arenas.
    """
    from tf_sparsity.export import flatbuffer

    model = flatbuffer.read(tflite)
    activations = 0
    for sub in model.subgraphs:
        for t in sub.tensors or []:
            if not (t.buffer and flatbuffer.buffer_bytes(model, t.buffer, tflite)):
                dtype = flatbuffer.numpy_dtype(t.type)
                size = int(np.prod(t.shape)) if t.shape is not None and len(t.shape) else 1
                activations += size * (np.dtype(dtype).itemsize if dtype is not None else 8)
    return 2 * activations + len(tflite) // 4 + (1 << 20)


def tflm_arena_bytes(tflite, sample, granularity=1):
    """Smallest tensor arena (bytes) in which tflite-micro loads *and* runs the model.

    Starts from the interpreter's own RecordingMicroAllocator total after one
    inference in a generous arena ("Arena allocation total"; measured here
    to fall short of the real minimum by up to ~10%: temporary allocations
    during Prepare are not in it), then bisects with real interpreter
    instances, each loading every tensor and running `sample`, in a child
    process. Measured on this 64-bit host: 32-bit microcontrollers need
    slightly less (smaller structs). Raises `VerificationError` with TFLM's
    log when the model does not run at all (e.g. an op it cannot prepare).
    """
    size = generous_arena(tflite)
    with captured_stderr() as log:
        try:
            interpreter = tflm_interpreter(tflite, size)
            for i, x in enumerate(sample):
                d = interpreter.get_input_details(i)
                interpreter.set_input(np.asarray(x, d["dtype"]).reshape(d["shape"]), i)
            interpreter.invoke()
            interpreter.print_allocations()
            failure = None
        except RuntimeError as error:
            failure = error
    text = log[0] if log else ""
    if failure is not None:
        raise VerificationError(f"tflite-micro could not run the model: {failure}\n{text.strip()}")
    match = _ARENA_TOTAL.search(text)
    recorded = int(match.group(1)) if match else size // 2
    low, high = recorded // 2, recorded
    with tempfile.TemporaryDirectory() as tmp:
        model_path, sample_path = os.path.join(tmp, "m.tflite"), os.path.join(tmp, "x.npz")
        with open(model_path, "wb") as f:
            f.write(tflite)
        sample_items = {f"x{i}": np.asarray(x, interpreter.get_input_details(i)["dtype"])
                        .reshape(interpreter.get_input_details(i)["shape"]) for i, x in enumerate(sample)}
        np.savez(sample_path, **sample_items)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        for _ in range(20):  # restarts after crashes; each removes one size
            proc = subprocess.run(
                [sys.executable, "-c", _SEARCH, model_path, sample_path, str(low), str(high), str(granularity)],
                capture_output=True, text=True, timeout=600, env=env)
            tried = None
            for line in proc.stdout.split("\n"):
                parts = line.split()
                if len(parts) != 2:
                    continue
                kind, value = parts[0], int(parts[1])
                if kind == "try":
                    tried = value
                elif kind == "ok":
                    high, tried = value, None
                elif kind == "fail":
                    low, tried = value, None
            if proc.returncode == 0:
                return high
            if tried is None:  # failed before probing anything: fall back to a safe value
                break
            if tried >= high:  # crashed while growing: the crashing size is too small
                low, high = tried, tried * 2
            else:
                low = tried
            if high - low <= granularity:
                return high
    return max(high, recorded)


def time_tflm(tflite, runs=100, warmup=5):
    """Median seconds of one tflite-micro `invoke()` (host build, Python-driven)."""
    with captured_stderr():
        interpreter = tflm_interpreter(tflite, generous_arena(tflite))
        for i in range(_io_counts(tflite)[0]):
            d = interpreter.get_input_details(i)
            interpreter.set_input(np.zeros(d["shape"], d["dtype"]), i)
        return _median_time(interpreter.invoke, runs, warmup)


# --------------------------------------------------------------------------
# EdgeTPU compiler (optional binary).

def edgetpu_compiler():
    """Path of `edgetpu_compiler` on PATH, or None."""
    return shutil.which("edgetpu_compiler")


def edgetpu_compile(tflite, timeout=600):
    """Run `edgetpu_compiler` -> (compiled bytes or None, log text)."""
    binary = edgetpu_compiler()
    if binary is None:
        return None, "edgetpu_compiler not found on PATH"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "model.tflite")
        with open(src, "wb") as f:
            f.write(tflite)
        proc = subprocess.run([binary, "-s", "-o", tmp, src], capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
        extra = os.path.join(tmp, "model_edgetpu.log")
        if os.path.exists(extra):
            with open(extra) as f:
                log += "\n" + f.read()
        out = os.path.join(tmp, "model_edgetpu.tflite")
        if proc.returncode != 0 or not os.path.exists(out):
            return None, log
        with open(out, "rb") as f:
            return f.read(), log
