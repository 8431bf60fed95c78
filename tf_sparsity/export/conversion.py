"""`convert`: Keras 3 model -> verified .tflite for LiteRT, the EdgeTPU or TFLM.

Conversion path (measured on TF 2.21 / Keras 3): the model is tracked by a
`keras.export.ExportArchive` and its inference call traced as a
`tf.function` with a static input signature; `TFLiteConverter.
from_concrete_functions([fn], archive)` then freezes the variables. Passing
the Keras model itself as the trackable object does *not* work in TF 2.21:
the variables stay resource variables (VAR_HANDLE / READ_VARIABLE) and the
model outputs NaN.
"""

import functools
import math
import os
import re
import warnings as _warnings

import numpy as np

from tf_sparsity.export import flatbuffer, runtimes, targets
from tf_sparsity.export.atomic import atomic_write
from tf_sparsity.export.c_array import write_c_array
from tf_sparsity.export.errors import ExportError, UnsupportedOpError, VerificationError
from tf_sparsity.export.inspection import inspect
from tf_sparsity.export.result import ExportReport, ExportResult

SPARSE_MODES = ("auto", True, False)
COMPRESS_MODES = (None, "lut")

# A kernel this sparse is worth offering to the converter's sparsity pass
# (it encodes nothing below ~30% zeros anyway).
_MIN_SPARSITY_TO_TRY = 0.3


def convert(model, target="litert", quantize=None, representative_data=None, sparse="auto", path=None,
            verify=True, *, batch_size=1, input_shape=None, compress=None, c_files=None,
            calibration_steps=100, verify_samples=16, recurrent="auto"):
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
    spec = targets.get_target(target)
    quantize = _check_quantize(quantize, spec)
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
    _check_model(model)

    import keras  # noqa: F401  (after argument checks: fast failures stay fast)

    report = ExportReport(target=target, quantize=quantize, sparse=sparse)
    from tf_sparsity.export import recurrent as _recurrent

    form, reason = _recurrent.resolve(model, target, quantize, recurrent)
    if form in ("step", "fused"):
        return _recurrent.convert_form(form, model, spec, quantize, representative_data, path, verify, reason=reason,
                                       report=report, input_shape=input_shape, c_files=c_files, compress=compress,
                                       calibration_steps=calibration_steps, verify_samples=verify_samples,
                                       batch_size=batch_size)
    if form is not None:
        report.recurrent = {"form": form, "reason": reason}
    prepared = _prepare(model, unroll=(form == "unroll"), notes=report.notes)
    input_specs = _input_specs(prepared, batch_size, input_shape, representative_data, spec)
    calibration = _samples(representative_data, input_specs, limit=max(calibration_steps, verify_samples))
    if quantize == "int8" and not calibration:
        shapes = ", ".join(str((None,) + tuple(s["shape"][1:])) for s in input_specs)
        raise ValueError(
            f"quantize='int8'{'' if target == 'litert' else f' (required by target {target!r})'} needs "
            f"`representative_data`: about 100 typical inputs, an array of shape {shapes} such as "
            "x_train[:100]. The converter runs them through the model to choose int8 ranges for "
            "the activations.")

    try_sparse = spec.sparse and sparse is not False and (sparse is True or _has_sparse_kernels(prepared))
    tflite = _convert(prepared, input_specs, quantize, calibration[:calibration_steps], sparse=try_sparse)
    if try_sparse:
        tflite = _settle_sparsity(tflite, sparse, quantize, report, dense=lambda: _convert(
            prepared, input_specs, quantize, calibration[:calibration_steps], sparse=False))

    info = inspect(tflite)
    verdict = info.verdict(target)
    if target == "edgetpu":
        report.preflight = verdict
        if verdict.first_fallback is not None:
            report.warnings.append(f"EdgeTPU: {verdict.first_fallback} — this op and everything after it "
                                   "run on the CPU")
    elif not verdict.ok:
        _raise_unsupported(verdict, target)
    report.warnings += [w for w in verdict.warnings if target != "edgetpu" or "maps ops only" not in w]

    compiled = None
    if verify:
        samples = calibration[:verify_samples] or _random_samples(input_specs, verify_samples)
        if not calibration:
            report.notes.append(f"verified on {len(samples)} random normal inputs (no representative_data)")
        expected = _keras_outputs(model, samples)
        try:
            report.verification = _verify_litert(tflite, samples, expected, quantize)
        except VerificationError as error:
            if not (target == "litert" and info.sparse_tensors):
                raise
            # Measured: some sparse encodings do not allocate under XNNPack.
            # A dense model always does, so fall back rather than fail.
            report.warnings.append(f"the sparse model did not load in LiteRT ({error}); exported dense instead")
            tflite = _convert(prepared, input_specs, quantize, calibration[:calibration_steps], sparse=False)
            report.densified = []
            info = inspect(tflite)
            report.verification = _verify_litert(tflite, samples, expected, quantize)
        _warn_on_mismatch(report)
        if target == "tflm":
            tflite = _verify_tflm(tflite, samples, expected, compress, report)
            info = inspect(tflite)
    elif compress is not None:
        tflite, _ = _lut_compress(tflite, report)
        info = inspect(tflite)
    if target == "edgetpu" and runtimes.edgetpu_compiler():
        compiled, report.compiler_log = runtimes.edgetpu_compile(tflite)
        if compiled is None:
            report.warnings.append("edgetpu_compiler failed; see compiler_log")
    elif target == "edgetpu":
        report.notes.append("edgetpu_compiler is not on PATH: preflight only (install it from "
                            "https://coral.ai/docs/edgetpu/compiler to compile and get its log)")
    if target == "tflm" and "candidates" not in report.compression:
        report.compression.update(lut_candidates(tflite))

    _fill_report(report, info)
    if form is not None:
        report.recurrent.update(file_bytes=len(tflite), arena_bytes=report.tflm.get("arena_bytes"))
    written, c_paths = None, ()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        written = atomic_write(path, tflite)
        if compiled is not None:
            root, ext = os.path.splitext(os.fspath(path))
            atomic_write(root + "_edgetpu" + (ext or ".tflite"), compiled)
        if c_files if c_files is not None else target == "tflm":
            c_paths = write_c_array(tflite, path, arena_bytes=report.tflm.get("arena_bytes"))
    return ExportResult(tflite=tflite, path=written, target=target, quantize=quantize, report=report,
                        c_files=tuple(c_paths), compiled=compiled)


# --------------------------------------------------------------------------
# Argument checks and model preparation.

def _check_quantize(quantize, spec):
    if quantize not in targets.QUANTIZE_MODES:
        raise ValueError(f"`quantize` must be one of None, 'dynamic', 'float16', 'int8'; received {quantize!r}.")
    if quantize is None:
        return spec.quantize[0]
    if quantize not in spec.quantize:
        raise ValueError(
            f"target '{spec.name}' needs full-integer models: quantize='int8' (with "
            f"representative_data), not {quantize!r}. {spec.runtime} runs int8 kernels only"
            + (" on the TPU" if spec.name == "edgetpu" else "") + ".")
    return quantize


def _check_model(model):
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a Keras 3 `keras.Model`; received {type(model).__module__}."
            f"{type(model).__name__}. (Convert a .tflite? Use tfs.export.inspect.)")
    if not model.built:
        raise ValueError("`model` must be built: give it an `Input` or call it once on data.")


def _prepare(model, unroll, notes):
    """Strip tf_sparsity wrappers and low-rank STR cells; unroll RNN layers for integer targets."""
    import keras

    from tf_sparsity import prunable, surgery

    rebuildable = isinstance(model, (keras.Sequential, keras.src.models.Functional))
    wrapped = surgery.wrappers(model)
    # Low-rank STR cells (tf_sparsity.layers.low_rank) strip to rank-r factors.
    low_rank = [l for l in prunable.iter_layers(model) if hasattr(getattr(l, "cell", None), "stripped_cell")]
    if wrapped or low_rank:
        model = surgery.strip(model)
    if wrapped:
        notes.append(f"stripped {len(wrapped)} tf_sparsity wrapper(s): pruned weights are exact zeros")
    if low_rank:
        notes.append(f"stripped {len(low_rank)} low-rank STR recurrent layer(s) to their rank-r factors")
    if unroll and rebuildable:

        rnns = [l for l in prunable.iter_layers(model) if _needs_unroll(l)]
        if rnns:
            def replace(layer):
                if not _needs_unroll(layer):
                    return None
                config = layer.get_config()
                if isinstance(layer, keras.layers.Bidirectional):
                    rnn_configs = [config["layer"]["config"]]
                    if config.get("backward_layer"):
                        rnn_configs.append(config["backward_layer"]["config"])
                else:
                    rnn_configs = [config]
                for rnn_config in rnn_configs:
                    rnn_config["unroll"] = True
                    _conv_projection(rnn_config)
                from keras.src.saving import serialization_lib

                with serialization_lib.SafeModeScope(False):
                    return layer.__class__.from_config(config)

            model = surgery.map_layers(model, replace)
            notes.append("unrolled recurrent layer(s) " + ", ".join(f"'{l.name}'" for l in rnns)
                         + " over the static sequence length: integer kernels have no loop support "
                           "(full-int8 conversion of the WHILE loop fails)")
    return model


def _conv_projection(rnn_config):
    """Put a factorized low-rank cell in its int8 export form (`projection="conv"`).

    Its projections become 1x1 CONV_2D ops: tflite-micro's and LiteRT's
    reference int8 kernels agree bit for bit on CONV_2D but round
    FULLY_CONNECTED differently, which an unrolled recurrence compounds
    (see `tf_sparsity.layers.low_rank.FactorizedGRUCell`). Same weights.
    """
    cell = rnn_config.get("cell")
    if isinstance(cell, dict) and "projection" in cell.get("config", {}):
        cell["config"]["projection"] = "conv"


def _needs_unroll(layer):
    import keras

    if isinstance(layer, keras.layers.Bidirectional):
        return not layer.forward_layer.unroll
    return isinstance(layer, keras.layers.RNN) and not layer.unroll


def _input_specs(model, batch_size, input_shape, data, spec):
    """[{name, shape (batch first, static where possible), dtype}] per model input."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError("`model` has no known inputs (a subclassed model?); build it with keras.Input.")
    shapes = _given_shapes(input_shape, len(inputs))
    first = _first_sample(data, [getattr(x, "name", None) or f"input_{i}" for i, x in enumerate(inputs)])
    specs = []
    for i, x in enumerate(inputs):
        shape = list(x.shape)
        name = getattr(x, "name", None) or f"input_{i}"
        if shapes is not None:
            given = list(shapes[i])
            if len(given) != len(shape) - 1 or any(s is not None and g != s for g, s in zip(given, shape[1:])):
                raise ValueError(f"`input_shape` {tuple(given)} does not fit model input '{name}' of shape "
                                 f"{tuple(shape[1:])} (batch dimension excluded).")
            shape[1:] = given
        elif first is not None and i < len(first) and first[i] is not None:
            # Align from the end: the data may or may not carry a batch axis.
            tail = list(first[i].shape[-(len(shape) - 1):]) if len(shape) > 1 else []
            if len(tail) == len(shape) - 1:
                shape[1:] = [s if s is not None else t for s, t in zip(shape[1:], tail)]
        shape[0] = batch_size
        if any(s is None for s in shape[1:]):
            if spec.static_shapes:
                raise ValueError(
                    f"model input '{name}' has unknown dimensions {tuple(x.shape)}; target '{spec.name}' "
                    "needs static shapes: pass input_shape=(...) without the batch dimension, e.g. the "
                    "sequence length.")
        specs.append({"name": name, "shape": shape, "dtype": str(getattr(x, "dtype", "float32"))})
    return specs


def _given_shapes(input_shape, n):
    if input_shape is None:
        return None
    if n == 1 and all(isinstance(d, int) or d is None for d in input_shape):
        return [tuple(input_shape)]
    if len(input_shape) != n:
        raise ValueError(f"`input_shape` must give one shape per model input ({n}); received {input_shape!r}.")
    return [tuple(s) for s in input_shape]


def _by_name(mapping, names):
    """Dict of arrays -> list in model-input order (by name when the keys match)."""
    if set(mapping) >= set(names):
        return [mapping[name] for name in names]
    return list(mapping.values())[:len(names)]


def _x_part(element, n):
    """The model-input part of one dataset element / data tuple: drop labels."""
    if isinstance(element, dict):
        return element
    if isinstance(element, (list, tuple)):
        first = element[0]
        if isinstance(first, (tuple, dict)) or (isinstance(first, list) and first and hasattr(first[0], "shape")):
            # ((x1, x2), y) or ({...}, y)
            return element[0]
        return element[:1] if n == 1 else element[:n]  # (x, y) / (x1, x2)
    return [element]


def _as_arrays(data, names):
    """Representative data (not a Dataset) -> list of arrays (samples first), one per input."""
    n = len(names)
    if isinstance(data, (list, tuple, dict)):
        part = _x_part(data, n)
        return _by_name(part, names) if isinstance(part, dict) else [np.asarray(a) for a in part]
    if isinstance(data, np.ndarray) or hasattr(data, "numpy") or hasattr(data, "__array__"):
        return [np.asarray(data)]
    raise TypeError(f"`representative_data` must be an array, a list/dict of arrays or a tf.data.Dataset; "
                    f"received {type(data).__name__}.")


def _dataset_arrays(data, names, limit, rank=None):
    """Pull up to `limit` samples from a tf.data.Dataset (batched or not), labels dropped.

    `rank` is the first input's rank with the batch axis: elements of that
    rank are batches, lower-rank ones single samples.
    """
    n = len(names)
    collected = [[] for _ in range(n)]
    count = 0
    for element in data:
        part = _x_part(element, n)
        parts = _by_name(part, names) if isinstance(part, dict) else list(part)
        for i, p in enumerate(parts[:n]):
            collected[i].append(np.asarray(p))
        batched = rank is None or np.ndim(parts[0]) >= rank
        count += len(parts[0]) if batched and np.ndim(parts[0]) else 1
        if count >= limit:
            break
    return collected


def _first_sample(data, names):
    """The first array per input (any leading axes), for filling unknown dims."""
    if data is None:
        return None
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        return [a[0] if a else None for a in _dataset_arrays(data.take(1), names, 1)]
    return _as_arrays(data, names)


def _samples(data, specs, limit):
    """Validated samples: list of [array per input] with the static batch shape."""
    if data is None:
        return []
    import tensorflow as tf

    n = len(specs)
    names = [s["name"] for s in specs]
    if isinstance(data, tf.data.Dataset):
        parts = _dataset_arrays(data, names, limit, rank=len(specs[0]["shape"]))
        arrays = []
        for i, chunks in enumerate(parts):
            expected = len(specs[i]["shape"])
            chunks = [c if c.ndim == expected else c[None] for c in chunks]
            arrays.append(np.concatenate(chunks) if chunks else np.zeros((0,)))
    else:
        arrays = _as_arrays(data, names)
    if len(arrays) != n:
        raise ValueError(f"`representative_data` must hold {n} arrays, one per model input "
                         f"({', '.join(s['name'] for s in specs)}); received {len(arrays)}.")
    count = None
    for array, s in zip(arrays, specs):
        want = tuple(s["shape"][1:])
        got = tuple(array.shape[1:])
        if array.ndim != len(s["shape"]) or any(w is not None and w != g for w, g in zip(want, got)):
            expected = "(n, " + ", ".join(str(w) for w in want) + ")"
            raise ValueError(
                f"`representative_data` for input '{s['name']}' has shape {tuple(array.shape)}; the model "
                f"expects {expected} (samples along the first axis).")
        if count is not None and len(array) != count:
            raise ValueError("`representative_data` arrays must hold the same number of samples.")
        count = len(array)
    batch = specs[0]["shape"][0] or 1
    samples = []
    for k in range(0, min(count, limit * batch) - batch + 1, batch):
        samples.append([np.asarray(a[k:k + batch], _np_dtype(s["dtype"])) for a, s in zip(arrays, specs)])
    if count and not samples:
        raise ValueError(f"`representative_data` has {count} samples; need at least batch_size={batch}.")
    return samples


def _np_dtype(dtype):
    return np.dtype(dtype) if dtype not in ("float16", "bfloat16") else np.float32


def _random_samples(specs, n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        sample = []
        for s in specs:
            shape = [d if d is not None else 1 for d in s["shape"]]
            dtype = _np_dtype(s["dtype"])
            sample.append(rng.normal(size=shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype))
        out.append(sample)
    return out


def _has_sparse_kernels(model):
    from tf_sparsity import prunable

    for layer in prunable.iter_layers(model):
        if prunable.is_prunable(layer) and layer.built:
            for kernel in prunable.prunable_kernels(layer):
                value = np.asarray(kernel.numpy() if hasattr(kernel, "numpy") else kernel)
                if value.size >= 64 and np.mean(value == 0) >= _MIN_SPARSITY_TO_TRY:
                    return True
    return False


# --------------------------------------------------------------------------
# The converter.

def _convert(model, specs, quantize, calibration, sparse):
    import keras
    import tensorflow as tf

    signature = [tf.TensorSpec(s["shape"], tf.as_dtype(s["dtype"]), name=f"input_{i}") for i, s in enumerate(specs)]
    if len(signature) > 1:
        signature = [signature]
    archive = keras.export.ExportArchive()
    archive.track(model)
    fn = archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], archive)
    # Builtin ops only: the device runtimes (and ai-edge-litert's default
    # build) have no Flex delegate for Select TF ops.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    optimizations = []
    if quantize in ("dynamic", "float16", "int8"):
        optimizations.append(tf.lite.Optimize.DEFAULT)
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        converter.representative_dataset = lambda: (
            [np.asarray(x, np.float32) if np.asarray(x).dtype.kind == "f" else x for x in sample]
            for sample in calibration)
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    with runtimes.captured_stderr() as log, _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        try:
            return bytes(converter.convert())
        except Exception as error:  # ConverterError and friends: translate below
            failure = error
    _raise_converter_error(failure, (log[0] if log else ""))


_FLEX = re.compile(r"TF Select ops: ([^\n]+)")
_NOT_BUILTIN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _raise_converter_error(error, log):
    text = f"{error}\n{log}"
    ops = []
    match = _FLEX.search(text)
    if match:
        ops = [o.strip() for o in match.group(1).split(",") if o.strip()]
    ops += [o for o in _NOT_BUILTIN.findall(text) if o not in ops]
    if ops:
        raise UnsupportedOpError(
            f"the model uses TensorFlow op(s) {', '.join(ops)} with no TFLite builtin kernel; every target "
            "here runs builtin ops only (no Select TF / Flex delegate). Replace the layer or function "
            f"that produces {ops[0]} with builtin-supported ops (see "
            "https://ai.google.dev/edge/litert/models/ops_compatibility).", op=ops[0], target=None) from None
    raise ExportError(f"the TFLite converter failed: {str(error).strip()[:2000]}") from error


def _settle_sparsity(tflite, sparse, quantize, report, dense):
    """Keep only sparse encodings that run (and, for 'auto', that pay).

    `dense()` converts the same model without sparsity; it is called only
    when some weight has to be stored dense.
    """
    def partial(block, shape):
        return any(dim % b for dim, b in zip(shape, block))

    def keep(dtype, block, shape, consumer):
        if partial(block, shape):
            return False
        if consumer in flatbuffer.SPARSE_KERNELS:  # faster (float 1x4) and/or smaller (int8 1x16)
            # Measured: the dynamic-range (float in, int8 weights) FC gives
            # wrong outputs from 1x16-sparse weights; full int8 and float are right.
            return dtype == "float32" or (dtype == "int8" and quantize == "int8")
        # DENSIFY runs for float only; any other consumer (float16 weights go
        # through DEQUANTIZE) would read the packed values as dense.
        return consumer == "DENSIFY" and sparse is True and dtype in ("float32", "float16")

    rewritten, replaced = flatbuffer.densify(tflite, keep=keep)
    if not replaced:
        return tflite
    # Whatever was stored dense needs the dense conversion as a reference:
    # - when a dim is not a multiple of the block size the converter drops
    #   the remainder from the sparse encoding (measured, TF 2.21: an int8
    #   [64, 40] weight in 1x16 blocks lost columns 32-39; outputs were 49
    #   quantization steps off), so those values must come from it;
    # - ops that read sparse weights carry a "sparse" op version that
    #   XNNPack refuses even once the weights are dense.
    dense_bytes = dense()
    lossy = [r[0] for r in replaced if partial(r[2], r[3])]
    if not inspect(rewritten).sparse_tensors:
        tflite = dense_bytes
    else:
        tflite = flatbuffer.align_with_dense(rewritten, dense_bytes, copy=lossy)
        if tflite is None:
            report.warnings.append("could not line up the sparse and dense conversions; exported dense")
            tflite = dense_bytes
    for name, dtype, block, shape, consumer in replaced:
        layout = "CSR (random)" if all(b == 1 for b in block) else "x".join(map(str, block)) + " blocks"
        if partial(block, shape):
            reason = (f"a {list(shape)} weight does not split into whole {layout}; the converter drops the "
                      "partial block's values, so it is stored dense. Use layer input sizes that are "
                      f"multiples of {max(block)} to store it sparse")
        elif consumer in flatbuffer.SPARSE_KERNELS:
            reason = ("the dynamic-range FULLY_CONNECTED (float activations, int8 weights) computes "
                      "wrong outputs from sparse weights (measured); stored dense. Use quantize='int8' "
                      "with 1x16 blocks or float with 1x4 blocks")
        elif consumer not in ("DENSIFY",) + tuple(flatbuffer.SPARSE_KERNELS):
            reason = (f"its consumer {consumer} has no sparse kernel and would read the packed values as "
                      "dense (measured: float16 block-sparse weights behind DEQUANTIZE gave wrong "
                      "outputs); stored dense")
        elif dtype in ("float32", "float16"):
            reason = ("no runtime kernel reads this layout sparse (DENSIFY would expand it at load: "
                      "smaller file, no speed-up). Prune Dense kernels in 1x4 blocks along the input "
                      "axis for XNNPack's sparse kernel, or pass sparse=True to keep the smaller file")
        else:
            reason = (f"{dtype} weights behind DENSIFY fail to allocate under LiteRT's default XNNPack "
                      "delegate; the int8 kernel reads sparse weights only in 1x16 blocks along the "
                      "input axis")
        report.densified.append({"name": name, "dtype": dtype, "layout": layout, "reason": reason})
    if replaced and sparse is True:
        report.warnings.append(f"{len(replaced)} weight(s) stored dense although sparse=True: " +
                               "; ".join(d["reason"].split(";")[0] for d in report.densified[:1]))
    return tflite


def _raise_unsupported(verdict, target):
    spec = targets.get_target(target)
    problem = next((p for p in verdict.problems if p.op), verdict.problems[0])
    advice = {
        "tflm": "Replace the layer that produces it with ops tflite-micro registers "
                "(tf_sparsity.export.targets.TFLM_BUILTIN_OPS), or export for target='litert'.",
        "litert": "Replace the layer that produces it with builtin ops.",
    }.get(target, "")
    op = f"op {problem.op} (#{problem.op_index})" if problem.op else "the model"
    raise UnsupportedOpError(f"target '{target}' ({spec.runtime}) cannot run {op}: {problem.message}. {advice}".strip(),
                             op=problem.op, target=target)


# --------------------------------------------------------------------------
# Verification.

def _keras_outputs(model, samples):
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


def _verify_litert(tflite, samples, expected, quantize):
    interpreter = runtimes.litert_interpreter(tflite)
    inputs = _io_samples(interpreter, samples)
    outputs = runtimes.run_litert(tflite, inputs, interpreter=interpreter)
    result = {"runtime": "ai_edge_litert (default XNNPack delegate)"}
    result.update(_compare(outputs, expected, interpreter.get_output_details()))
    scale = max((float(np.max(np.abs(w))) for row in expected for w in row), default=1.0)
    result["output_scale"] = scale
    return result


def _warn_on_mismatch(report):
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


def _verify_tflm(tflite, samples, expected, compress, report):
    """Run on tflite-micro: arena, agreement with LiteRT reference kernels, LUT compression."""
    ref = runtimes.litert_interpreter(tflite, reference=True)
    inputs = _io_samples(ref, samples)
    reference = runtimes.run_litert(tflite, inputs, interpreter=ref)
    arena = _tflm_checked(runtimes.tflm_arena_bytes, tflite, inputs[0])
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
        compressed, saved = _lut_compress(tflite, report)
        if saved > 0:
            arena_c = _tflm_checked(runtimes.tflm_arena_bytes, compressed, inputs[0])
            micro_c = runtimes.run_tflm(compressed, inputs, runtimes.generous_arena(compressed))
            same = all(np.array_equal(a, b) for ra, rb in zip(micro, micro_c) for a, b in zip(ra, rb))
            report.compression.update({"arena_bytes": arena_c, "outputs_identical": same})
            if arena_c > arena:
                report.notes.append(f"LUT compression saves {saved:,} bytes of flash but TFLM decodes the "
                                    f"weights into the arena: {arena:,} -> {arena_c:,} bytes of RAM")
            if not same:
                report.warnings.append("LUT-compressed model outputs differ from the uncompressed model")
            tflite = compressed
    return tflite


_TFLM_NODE = re.compile(r"Node (\w+) \(number (\d+)\) failed to prepare")
_TFLM_MISSING = re.compile(r"Didn't find op for builtin opcode '(\w+)'")


def _tflm_checked(fn, *args):
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


# --------------------------------------------------------------------------
# tflite-micro LUT compression.

_WEIGHT_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "TRANSPOSE_CONV": 1,
               "BATCH_MATMUL": 1, "SVDF": 1, "EMBEDDING_LOOKUP": 1}


def lut_candidates(tflite, max_bits=4, min_elements=256):
    """Weights worth LUT compression: few distinct values per channel.

    Returns {"candidates": [...], "estimated_bytes_saved": n}. A tensor with
    at most 2**max_bits distinct values per channel (per quantization axis)
    can be stored as `bits`-wide indices plus one value table per channel.
    """
    info = inspect(tflite)
    candidates = []
    for g in info.graphs:
        seen = set()
        for op in g.ops:
            slot = _WEIGHT_OPS.get(op.name)
            if slot is None or len(op.inputs) <= slot or op.inputs[slot] < 0:
                continue
            i = op.inputs[slot]
            t = g.tensors[i]
            if i in seen or not t.constant or t.sparsity is not None or t.dtype != "int8":
                continue
            seen.add(i)
            value = g.constant(i)
            if value is None or value.size < min_elements:
                continue
            axis = t.quantization["axis"] if t.quantization and t.quantization["axis"] is not None else None
            if axis is not None:
                moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
                distinct = max(len(np.unique(row)) for row in moved)
                channels = value.shape[axis]
            else:
                distinct, channels = len(np.unique(value)), 1
            bits = max(1, math.ceil(math.log2(distinct))) if distinct > 1 else 1
            if bits > max_bits:
                continue
            estimated = math.ceil(value.size * bits / 8) + channels * (2 ** bits) + 16
            if estimated >= t.bytes:
                continue
            candidates.append({"subgraph": g.index, "tensor": i, "name": t.name, "distinct_values": distinct,
                               "axis": axis, "bits": bits, "bytes": t.bytes, "estimated_bytes": estimated})
    return {"candidates": candidates,
            "estimated_bytes_saved": sum(c["bytes"] - c["estimated_bytes"] for c in candidates)}


def _lut_compress(tflite, report):
    """Apply LUT compression to the candidates -> (bytes, bytes saved)."""
    found = lut_candidates(tflite)
    report.compression.update(found)
    report.compression["method"] = "lut"
    if not found["candidates"]:
        report.notes.append("compress='lut': no weight has few enough distinct values (<= 16 per channel); "
                            "nothing compressed. Cluster or quantize weights to few values first")
        report.compression["bytes_saved"] = 0
        return tflite, 0
    from tflite_micro import compression
    from tflite_micro.tensorflow.lite.micro.compression import spec as lut_spec

    builder = compression.SpecBuilder()
    for c in found["candidates"]:
        mode = lut_spec.PerChannel(axis=c["axis"]) if c["axis"] is not None else lut_spec.PerTensor()
        builder.add_tensor(subgraph=c["subgraph"], tensor=c["tensor"]).with_lut(c["bits"], mode)
    with runtimes.captured_stderr(), _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        compressed = bytes(compression.compress(tflite, builder.build()))
    saved = len(tflite) - len(compressed)
    report.compression.update({"bytes_before": len(tflite), "bytes_after": len(compressed), "bytes_saved": saved})
    if saved <= 0:
        report.notes.append("compress='lut' did not make the model smaller; kept it uncompressed")
        return tflite, 0
    return compressed, saved


# --------------------------------------------------------------------------

def _fill_report(report, info):
    report.size_bytes = info.size
    report.ops = dict(info.op_counts)
    io = lambda t: {"name": t.name, "shape": list(t.shape_signature), "dtype": t.dtype,  # noqa: E731
                    "quantization": t.quantization}
    report.inputs = [io(t) for t in info.inputs]
    report.outputs = [io(t) for t in info.outputs]
    report.tensors = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.bytes}
                      for t in info.tensors if t.constant]
    report.sparse_tensors = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, **t.sparsity.to_dict()}
        for t in info.sparse_tensors]
