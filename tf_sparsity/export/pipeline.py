"""`convert`: Keras 3 model -> verified .tflite for LiteRT, the EdgeTPU or TFLM.

`convert` reads as its stages: check the options, `prepare` the model
(strip, unroll), build the `inputs` (signature, samples), run the
`converter` (and settle sparsity), preflight against the target's table,
`verify` on the runtimes, compile for the EdgeTPU, write. Each stage lives in
its own module; the target name is resolved once and the `Target` passed on.
"""

import os

from tf_sparsity.export import lut, runtimes, targets
from tf_sparsity.export import recurrent as recurrent_forms
from tf_sparsity.export.converter import has_sparse_kernels, run_converter, settle_sparsity
from tf_sparsity.export.errors import VerificationError
from tf_sparsity.export.inputs import input_specs, random_samples, samples
from tf_sparsity.export.inspection import inspect
from tf_sparsity.export.outputs import write_outputs
from tf_sparsity.export.prepare import (
    check_model,
    check_quantize,
    check_weight_quantization,
    fold_constant,
    prepare,
)
from tf_sparsity.export.result import ExportReport, ExportResult, fill_report
from tf_sparsity.export.verify import (
    keras_outputs,
    raise_unsupported,
    verify_litert,
    verify_tflm,
    warn_on_mismatch,
)

__all__ = ["convert"]

SPARSE_MODES = ("auto", True, False)
COMPRESS_MODES = (None, "lut")


def convert(model, target="litert", quantize=None, representative_data=None, sparse="auto", path=None,
            verify=True, *, batch_size=1, input_shape=None, compress=None, c_files=None,
            calibration_steps=100, verify_samples=16, recurrent="auto", step_head="joined",
            weight_quantization=None, fold_constant_units=True):
    """Convert a Keras 3 model to a .tflite model for `target`, verified on its runtime.

    Args:
        model: a built Keras 3 model. tf_sparsity wrappers are stripped first
            (`tfs.strip`), so pruned weights are exact zeros.
        target: "litert" (phones, Linux boards; LiteRT with XNNPack),
            "edgetpu" (Coral) or "tflm" (microcontrollers).
        quantize: None (the target's default: float32 for litert, "int8"
            for edgetpu/tflm), "dynamic" (int8 weights, float activations),
            "float16" (float16 weights) or "int8" (full integer, int8 in/out).
        representative_data: typical inputs, needed for "int8": an array
            `(n, *input_shape)` (a tuple `(x, y)` is fine), a list of arrays /
            dict by input name for multi-input models, or a `tf.data.Dataset`.
            Up to `calibration_steps` samples calibrate the activation ranges;
            the first `verify_samples` are also used for verification
            (random normal inputs otherwise).
        sparse: "auto" stores weights sparse only where a runtime kernel reads
            them sparse (LiteRT: float FULLY_CONNECTED in 1x4 blocks, int8 in
            1x16 blocks); True also keeps float weights the converter can only
            encode as CSR + DENSIFY (smaller file, no speed-up); False stores
            everything dense. int8 weights behind DENSIFY are never kept: they
            fail to allocate under LiteRT's default XNNPack delegate. EdgeTPU
            and TFLM read dense weights only.
        path: where to write the .tflite (atomically, parent folders
            created); for tflm also `<stem>.cc` / `<stem>.h` next to it (see
            `c_files`); for edgetpu the compiler's `<stem>_edgetpu.tflite`
            when `edgetpu_compiler` is installed.
        verify: run the result on the target's runtime and compare with Keras.
        batch_size: the static batch dimension (1; None keeps it dynamic,
            litert only).
        input_shape: shape (without batch) to fix unknown dims, e.g. a
            sequence length; a list of shapes for multi-input models.
        compress: "lut" applies tflite-micro's look-up-table compression to
            weights with few distinct values (tflm only; see the report's
            `compression` for candidates and bytes saved).
        c_files: write the C array pair (default: True for tflm when `path`
            is given).
        recurrent: how recurrent layers are exported (docs/export.md,
            `tf_sparsity.export.recurrent`): "step" (one time step, the state
            an input and an output: weights once, size independent of the
            sequence; `result.run_sequence(x)`; for tflm also
            `<stem>_sequence.h`, the C++ loop), "loop" (float WHILE graph),
            "fused" (LSTM as UNIDIRECTIONAL_SEQUENCE_LSTM), "unroll" (plain
            ops over a static length) or "auto": step for tflm/edgetpu (unroll
            where step is impossible), loop for float and unroll for int8 on
            litert.
        step_head: where the step form (`recurrent="step"`, or "auto"
            choosing it) puts the head, the layers after the last recurrent
            layer: "joined" (default) keeps it in the step model, run at
            every step (one interpreter: measured ~1 KB less TFLM arena and
            ~0.9 KB less flash than "separate" for a Dense head, at the same
            speed); "separate" makes it a second model, `result.head`
            (`<stem>_head.tflite`), run once per sequence on the final
            state, worth it when the head costs more than a step. Ignored
            (a report note) by the other forms.
        weight_quantization: int8 FULLY_CONNECTED weights (quantize "int8"
            or "dynamic") with one scale per output channel ("per_channel",
            the converter's default) or one per tensor ("per_tensor": on
            tflite-micro each such op keeps one output multiplier instead of
            8 bytes per output channel, the bulk of a small recurrent step
            model's op data; costs accuracy where channels' ranges differ
            much). None (default): "per_tensor" for the step form on tflm
            (measured within 1 point of float Keras on five MNIST-1D RNNs,
            arena 20-45% smaller), "per_channel" otherwise. CONV_2D weights
            stay per channel. Not applied by the fused LSTM form (a note).
        fold_constant_units: int8 only. True (default): before converting,
            remove the channel-group units whose consumers read a tensor
            that is constant on the calibration samples, their value folded
            into the consumers' bias (`tfs.surgery.fold_constant_units` with
            `whole_tensors=True`; listed in `report.folded`). Such a tensor's
            calibrated range is a point, so the int8 model holds that
            constant whatever the input: folding changes nothing int8
            computes, while the zero scale it would get makes XNNPack refuse
            the model (measured: a pruned MobileNet whose squeeze-excite unit
            never fires). So a user gets the model that runs, not an error.
            False converts the model as it is.

    Returns:
        `ExportResult` with `.tflite`, `.path`, `.report`.

    Raises:
        ValueError: bad arguments (unknown target/quantize, int8 without
            representative data, data of the wrong shape, sparse=True for a
            dense-only target); `UnsupportedOpError` (a ValueError) for an op
            the target cannot run; `VerificationError` when the runtime cannot
            load or run the model.

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> r = tfs.export.convert(m)                      # float, for LiteRT
    >>> r.report.verification["max_abs_diff"] < 1e-5
    True
    >>> x = np.random.rand(100, 8).astype("float32")
    >>> r = tfs.export.convert(m, target="tflm", representative_data=x)
    >>> r.report.tflm["max_diff_vs_reference_steps"] <= 1
    True
    """
    spec = targets.get_target(target)  # names are resolved here, once; inner stages get `spec`
    quantize = _check_options(model, spec, quantize, sparse, compress, batch_size, path)
    recurrent_forms.check_step_head(step_head)
    report = ExportReport(target=spec.name, quantize=quantize, sparse=sparse)
    check_weight_quantization(weight_quantization, quantize, report.notes)
    form, reason = recurrent_forms.resolve(model, spec.name, quantize, recurrent)
    per_channel = weight_quantization == "per_channel" or (
        weight_quantization is None and not (form == "step" and spec.name == "tflm"))
    if form in ("step", "fused"):  # their own stages: one time step, or a tf_keras rebuild
        return recurrent_forms.convert_form(
            form, model, spec, quantize, representative_data, path, verify, step_head=step_head, reason=reason,
            report=report, per_channel=per_channel,
            input_shape=input_shape, c_files=c_files, compress=compress, calibration_steps=calibration_steps,
            verify_samples=verify_samples, batch_size=batch_size)
    if form is not None:
        report.recurrent = {"form": form, "reason": reason}
    if step_head != "joined":
        report.notes.append(f"step_head={step_head!r} ignored: it applies to the step form only "
                            + (f"(form: {form})" if form else "(no recurrent layer)"))
    prepared = prepare(model, unroll=(form == "unroll"), notes=report.notes)
    specs = input_specs(prepared, batch_size, input_shape, representative_data, spec)
    data = samples(representative_data, specs, limit=max(calibration_steps, verify_samples))
    _require_calibration(quantize, data, specs, spec)
    calibration = data[:calibration_steps]
    if fold_constant_units not in (True, False):
        raise ValueError(f"`fold_constant_units` must be True or False; received {fold_constant_units!r}.")
    if quantize == "int8" and fold_constant_units:
        prepared = fold_constant(prepared, calibration, report)

    def dense():
        return run_converter(prepared, specs, quantize, calibration, sparse=False, per_channel=per_channel)

    tflite = _converted(prepared, specs, quantize, calibration, sparse, spec, report, dense, per_channel)
    info = _preflight(tflite, spec, report)
    if verify:
        tflite, info = _verified(model, tflite, info, data, verify_samples, specs, quantize, compress,
                                 spec, report, dense)
    elif compress is not None:
        tflite, _ = lut.lut_compress(tflite, report)
        info = inspect(tflite)
    compiled = _edgetpu_compiled(tflite, spec, report)
    if spec.name == "tflm" and "candidates" not in report.compression:
        report.compression.update(lut.lut_candidates(tflite))
    fill_report(report, info)
    if form is not None:
        report.recurrent.update(file_bytes=len(tflite), arena_bytes=report.tflm.get("arena_bytes"))
    written, c_paths = write_outputs(tflite, path, c_files, spec, report, compiled=compiled)
    return ExportResult(tflite=tflite, path=written, target=spec.name, quantize=quantize, report=report,
                        c_files=tuple(c_paths), compiled=compiled)


# --------------------------------------------------------------------------
# The stages, in order.

def _check_options(model, spec, quantize, sparse, compress, batch_size, path):
    """Every argument check, before anything heavy runs; returns the resolved `quantize`."""
    target = spec.name
    quantize = check_quantize(quantize, spec)
    if sparse not in SPARSE_MODES:
        raise ValueError(f"`sparse` must be 'auto', True or False; received {sparse!r}.")
    if sparse is True and not spec.sparse:
        raise ValueError(
            f"sparse=True is not possible for target '{target}': {spec.runtime} has no kernel for "
            "sparse tensors (no DENSIFY op; the model would not load). Use sparse='auto' or False "
            "to store the weights dense; to make the model smaller or faster there, prune "
            "structurally (fewer channels/neurons, e.g. tfs.greedy_prune)"
            + (" or use compress='lut'" if target == "tflm" else "") + ".")
    if compress not in COMPRESS_MODES:
        raise ValueError(f"`compress` must be None or 'lut'; received {compress!r}.")
    if compress is not None and target != "tflm":
        raise ValueError(f"compress='lut' is tflite-micro's LUT compression: only for target='tflm', not '{target}'.")
    if batch_size is None and spec.static_shapes:
        raise ValueError(f"target '{target}' needs a static batch size; pass batch_size=1.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer or None; received {batch_size!r}.")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path or None; received {type(path).__name__}.")
    check_model(model)
    return quantize


def _require_calibration(quantize, data, specs, spec):
    if quantize == "int8" and not data:
        shapes = ", ".join(str((None,) + tuple(s["shape"][1:])) for s in specs)
        raise ValueError(
            f"quantize='int8'{'' if spec.name == 'litert' else f' (required by target {spec.name!r})'} "
            f"needs `representative_data`: about 100 typical inputs, an array of shape {shapes} such as "
            "x_train[:100]. The converter runs them through the model to choose int8 ranges for "
            "the activations.")


def _converted(prepared, specs, quantize, calibration, sparse, spec, report, dense, per_channel=True):
    """Convert, offering the sparsity pass where the target reads sparse weights."""
    try_sparse = spec.sparse and sparse is not False and (sparse is True or has_sparse_kernels(prepared))
    tflite = run_converter(prepared, specs, quantize, calibration, sparse=try_sparse, per_channel=per_channel)
    if try_sparse:
        tflite = settle_sparsity(tflite, sparse, quantize, report, dense=dense)
    return tflite


def _preflight(tflite, spec, report):
    """Check every op against the target's table; refuse what it cannot run (EdgeTPU: report)."""
    info = inspect(tflite)
    verdict = info.verdict(spec)
    if spec.name == "edgetpu":
        report.preflight = verdict
        if verdict.first_fallback is not None:
            report.warnings.append(f"EdgeTPU: {verdict.first_fallback} — this op and everything after it "
                                   "run on the CPU")
    elif not verdict.ok:
        raise_unsupported(verdict, spec)
    report.warnings += [w for w in verdict.warnings if spec.name != "edgetpu" or "maps ops only" not in w]
    return info


def _verified(model, tflite, info, data, count, specs, quantize, compress, spec, report, dense):
    """Run on LiteRT (and tflite-micro for tflm) and compare with Keras, on `count` samples."""
    verify_inputs = data[:count] or random_samples(specs, count)
    if not data:
        report.notes.append(f"verified on {len(verify_inputs)} random normal inputs (no representative_data)")
    expected = keras_outputs(model, verify_inputs)
    try:
        report.verification = verify_litert(tflite, verify_inputs, expected, quantize)
    except VerificationError as error:
        if not (spec.name == "litert" and info.sparse_tensors):
            raise
        # Measured: some sparse encodings do not allocate under XNNPack.
        # A dense model always does, so fall back rather than fail.
        report.warnings.append(f"the sparse model did not load in LiteRT ({error}); exported dense instead")
        tflite = dense()
        report.densified = []
        info = inspect(tflite)
        report.verification = verify_litert(tflite, verify_inputs, expected, quantize)
    warn_on_mismatch(report)
    if spec.name == "tflm":
        tflite = verify_tflm(tflite, verify_inputs, expected, compress, report)
        info = inspect(tflite)
    return tflite, info


def _edgetpu_compiled(tflite, spec, report):
    if spec.name != "edgetpu":
        return None
    if not runtimes.edgetpu_compiler():
        report.notes.append("edgetpu_compiler is not on PATH: preflight only (install it from "
                            "https://coral.ai/docs/edgetpu/compiler to compile and get its log)")
        return None
    compiled, report.compiler_log = runtimes.edgetpu_compile(tflite)
    if compiled is None:
        report.warnings.append("edgetpu_compiler failed; see compiler_log")
    return compiled
