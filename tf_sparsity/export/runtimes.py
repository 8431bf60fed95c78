"""Run .tflite models on the real runtimes: LiteRT, its reference kernels, and TFLM.

Used by `convert(verify=True)` and by the benchmarks. Everything takes and
returns numpy arrays in the model's own I/O dtypes; `quantize` /
`dequantize` convert float data for int8 models.
"""

import contextlib
import os
import shutil
import statistics
import subprocess
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
        raise VerificationError(f"LiteRT could not load the model with its {kind}: {error}") from None
    return interpreter


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
            n_out = _tflm_output_count(tflite)
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


def _tflm_output_count(tflite):
    from tf_sparsity.export import flatbuffer

    model = flatbuffer.read(tflite)
    return len(model.subgraphs[0].outputs)


def tflm_arena_bytes(tflite, sample, granularity=16, limit=512 * 1024 * 1024):
    """Smallest tensor arena (bytes) in which tflite-micro loads *and* runs the model.

    Found by doubling then bisecting on real interpreter instances (each
    attempt allocates every tensor and runs `sample` once). Measured on this
    64-bit host: 32-bit microcontrollers need slightly less (smaller structs).
    Raises `VerificationError` (with TFLM's log) when no arena up to `limit`
    works, e.g. an op TFLM does not register.
    """
    def works(size):
        try:
            run_tflm(tflite, [sample], size)
            return True
        except VerificationError:
            return False

    low, high = 0, max(4096, len(tflite) // 8)
    while not works(high):
        if high >= limit:
            run_tflm(tflite, [sample], limit)  # raises with TFLM's own message
        low, high = high, min(high * 4, limit)
    while high - low > granularity:
        mid = (low + high) // 2
        if works(mid):
            high = mid
        else:
            low = mid
    return high


def time_tflm(tflite, arena_size, runs=100, warmup=5):
    """Median seconds of one tflite-micro `invoke()` (host build, Python-driven)."""
    with captured_stderr():
        interpreter = tflm_interpreter(tflite, arena_size)
        for i in range(len(flatbuffer_inputs(tflite))):
            d = interpreter.get_input_details(i)
            interpreter.set_input(np.zeros(d["shape"], d["dtype"]), i)
        return _median_time(interpreter.invoke, runs, warmup)


def flatbuffer_inputs(tflite):
    from tf_sparsity.export import flatbuffer

    return flatbuffer.read(tflite).subgraphs[0].inputs


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
