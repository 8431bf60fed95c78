"""Stage 4 of `convert`: run the result on the target's runtime and compare with Keras.

LiteRT first (the float or int8 model against the Keras outputs), then, for
tflm, tflite-micro against LiteRT's reference kernels (arena bytes, steps of
disagreement, optional LUT compression checked on the interpreter).
"""

import re

import numpy as np

from tf_sparsity.export import lut, runtimes
from tf_sparsity.export.errors import UnsupportedOpError, VerificationError

__all__ = ["keras_outputs", "raise_unsupported", "verify_litert", "lut_checked", "tflm_checked", "verify_tflm", "warn_on_mismatch"]


def raise_unsupported(verdict, spec):
    target = spec.name
    problem = next((p for p in verdict.problems if p.op), verdict.problems[0])
    advice = {
        "tflm": "Replace the layer that produces it with ops tflite-micro registers "
                "(tf_sparsity.export.targets.TFLM_BUILTIN_OPS), or export for target='litert'.",
        "litert": "Replace the layer that produces it with builtin ops.",
    }.get(target, "")
    op = f"op {problem.op} (#{problem.op_index})" if problem.op else "the model"
    raise UnsupportedOpError(f"target '{target}' ({spec.runtime}) cannot run {op}: {problem.message}. {advice}".strip(),
                             op=problem.op, target=target)


def keras_outputs(model, samples):
    outs = []
    for sample in samples:
        y = model(sample[0] if len(sample) == 1 else list(sample), training=False)
        ys = y if isinstance(y, (list, tuple)) else list(y.values()) if isinstance(y, dict) else [y]
        outs.append([np.asarray(t) for t in ys])
    return outs


def _order(details, pattern):
    """Keras position of each TFLite input/output, from the names we gave them.

    Inputs are traced as `input_<i>`; outputs come out as `Identity`,
    `Identity_1`, ... in Keras order. Falls back to file order.
    """
    positions = []
    for d in details:
        match = re.search(pattern, d["name"])
        positions.append(int(match.group(1)) if match and match.group(1) else 0)
    return positions if sorted(positions) == list(range(len(details))) else list(range(len(details)))


def _io_samples(interpreter, samples):
    """Quantize float samples for int8 inputs, in the interpreter's input order."""
    details = interpreter.get_input_details()
    order = _order(details, r"input_(\d+)")
    out = []
    for sample in samples:
        row = []
        for d, x in zip(details, [sample[k] for k in order]):
            if np.dtype(d["dtype"]).kind in "iu" and np.asarray(x).dtype.kind == "f":
                row.append(runtimes.quantize(x, runtimes.io_params(d), d["dtype"]))
            else:
                row.append(np.asarray(x, d["dtype"]))
        out.append(row)
    return out


def _compare(outputs, expected, details):
    """Error numbers of runtime outputs vs Keras (float or quantized outputs)."""
    quantized = any(np.dtype(d["dtype"]).kind in "iu" for d in details)
    order = _order(details, r"_(\d+)(?::\d+)?$")
    expected = [[row[k] for k in order] for row in expected]
    diffs, steps, agree, total = [], [], 0, 0
    for got_row, want_row in zip(outputs, expected):
        for d, got, want in zip(details, got_row, want_row):
            want = np.asarray(want, np.float32).reshape(got.shape)
            params = runtimes.io_params(d)
            if np.dtype(d["dtype"]).kind in "iu" and params[0]:
                steps.append(float(np.max(np.abs(got.astype(np.int64) - runtimes.quantize(want, params, np.int64)))))
                value = runtimes.dequantize(got, params)
            else:
                value = got.astype(np.float32)
            diffs.append(float(np.max(np.abs(value - want))) if value.size else 0.0)
            if got.ndim >= 1 and got.shape[-1] > 1:
                agree += int(np.sum(np.argmax(value, -1) == np.argmax(want, -1)))
                total += int(np.prod(got.shape[:-1]))
    result = {"samples": len(outputs), "max_abs_diff": max(diffs) if diffs else 0.0}
    if quantized:
        result["max_error_steps"] = max(steps) if steps else 0.0
    if total:
        result["argmax_agreement"] = agree / total
    return result


def verify_litert(tflite, samples, expected, quantize):
    interpreter = runtimes.litert_interpreter(tflite)
    inputs = _io_samples(interpreter, samples)
    outputs = runtimes.run_litert(tflite, inputs, interpreter=interpreter)
    result = {"runtime": "ai_edge_litert (default XNNPack delegate)"}
    result.update(_compare(outputs, expected, interpreter.get_output_details()))
    scale = max((float(np.max(np.abs(w))) for row in expected for w in row), default=1.0)
    result["output_scale"] = scale
    return result


def warn_on_mismatch(report):
    v = report.verification
    if report.quantize in (None, "float16", "dynamic"):
        # float16 and dynamic-range weights are lossy by design: looser bound.
        tolerance = (1e-4 if report.quantize is None else 5e-2) * max(1.0, v.get("output_scale", 1.0))
        if v.get("max_abs_diff", 0.0) > tolerance:
            report.warnings.append(f"LiteRT output differs from Keras by {v['max_abs_diff']:.3g} "
                                   f"(tolerance {tolerance:.3g})")
    elif v.get("argmax_agreement", 1.0) < 0.9:
        report.warnings.append(f"int8 predictions agree with Keras on only {v['argmax_agreement']:.0%} of the "
                               "verification samples; check the representative data")


def verify_tflm(tflite, samples, expected, compress, report):
    """Run on tflite-micro: arena, agreement with LiteRT reference kernels, LUT compression."""
    ref = runtimes.litert_interpreter(tflite, reference=True)
    inputs = _io_samples(ref, samples)
    reference = runtimes.run_litert(tflite, inputs, interpreter=ref)
    arena = tflm_checked(runtimes.tflm_arena_bytes, tflite, inputs[0])
    # Outputs do not depend on the arena size; a generous one keeps a
    # mis-measured arena from crashing this process (see runtimes).
    micro = runtimes.run_tflm(tflite, inputs, runtimes.generous_arena(tflite))
    steps = max((float(np.max(np.abs(m.astype(np.int64) - r.astype(np.int64))))
                 for mrow, rrow in zip(micro, reference) for m, r in zip(mrow, rrow)), default=0.0)
    vs_keras = _compare(micro, expected, ref.get_output_details())
    report.tflm = {
        "runtime": "tflite-micro Python interpreter",
        "arena_bytes": arena,
        "max_diff_vs_reference_steps": steps,
        "samples": len(inputs),
        "max_error_vs_keras_steps": vs_keras.get("max_error_steps", vs_keras["max_abs_diff"]),
    }
    if "argmax_agreement" in vs_keras:
        report.tflm["argmax_agreement_vs_keras"] = vs_keras["argmax_agreement"]
    if steps > 1:
        # Measured (one op, identical inputs): TFLM's int8 FULLY_CONNECTED
        # rounds the requantization differently from LiteRT's reference kernel
        # (one step in ~0.1-0.2% of outputs), MUL and LOGISTIC differ at rare
        # near-ties; CONV_2D, ADD, TANH agree. Feed-forward nets stay <= 1,
        # unrolled recurrent chains compound it.
        report.warnings.append(f"tflite-micro differs from LiteRT's reference kernels by {steps:g} "
                               "quantization steps (<= 1 is typical; long recurrent chains compound "
                               "rounding differences of single ops)")
    if compress == "lut":
        tflite = lut_checked(
            tflite, report, arena, arena_of=lambda m: tflm_checked(runtimes.tflm_arena_bytes, m, inputs[0]),
            same_outputs=lambda m: all(np.array_equal(a, b) for ra, rb in zip(
                micro, runtimes.run_tflm(m, inputs, runtimes.generous_arena(m))) for a, b in zip(ra, rb)))
    return tflite


_TFLM_NODE = re.compile(r"Node (\w+) \(number (\d+)\) failed to prepare")
_TFLM_MISSING = re.compile(r"Didn't find op for builtin opcode '(\w+)'")


def tflm_checked(fn, *args):
    """Call a TFLM runner; an op that fails to prepare becomes UnsupportedOpError."""
    try:
        return fn(*args)
    except VerificationError as error:
        text = str(error)
        node, missing = _TFLM_NODE.search(text), _TFLM_MISSING.search(text)
        if not (node or missing):
            raise
        op = node.group(1) if node else missing.group(1)
        where = f" (#{node.group(2)})" if node else ""
        detail = [line for line in text.splitlines()[1:] if line.strip()][:2]
        raise UnsupportedOpError(
            f"target 'tflm' cannot run op {op}{where}: tflite-micro's kernel rejected it ("
            + "; ".join(detail) + "). Replace the layer that produces it with ops TFLM has int8 "
            "kernels for (e.g. ReLU instead of exp/gelu), or export for target='litert'.",
            op=op, target="tflm") from None


def lut_checked(tflite, report, arena, arena_of, same_outputs):
    """LUT-compress `tflite` and check the result on tflite-micro.

    `arena_of(model)` measures a model's arena, `same_outputs(model)` says
    whether it computes what the uncompressed model did. The arena and the
    verdict go into `report.compression`; returns the compressed model (or
    `tflite` when compression saved nothing).
    """
    compressed, saved = lut.lut_compress(tflite, report)
    if saved <= 0:
        return tflite
    arena_c, same = arena_of(compressed), bool(same_outputs(compressed))
    report.compression.update({"arena_bytes": arena_c, "outputs_identical": same})
    if arena is not None and arena_c > arena:
        report.notes.append(f"LUT compression saves {saved:,} bytes of flash but TFLM decodes the "
                            f"weights into the arena: {arena:,} -> {arena_c:,} bytes of RAM")
    if not same:
        report.warnings.append("LUT-compressed model outputs differ from the uncompressed model")
    return compressed
