"""Stage 3 of `convert`: the TFLite converter, its settings, and settling sparsity.

Conversion path (measured on TF 2.21 / Keras 3): the model is tracked by a
`keras.export.ExportArchive` and its inference call traced as a
`tf.function` with a static input signature; `TFLiteConverter.
from_concrete_functions([fn], archive)` then freezes the variables. Passing
the Keras model itself as the trackable object does *not* work in TF 2.21:
the variables stay resource variables (VAR_HANDLE / READ_VARIABLE) and the
model outputs NaN.
"""

import functools
import re
import warnings as _warnings

import keras
import numpy as np

from tf_sparsity import _compat, prunable
from tf_sparsity.export import flatbuffer, runtimes
from tf_sparsity.export.inspection import inspect
from tf_sparsity.export.errors import ExportError, UnsupportedOpError

__all__ = ["has_sparse_kernels", "raise_converter_error", "run_converter", "settle_sparsity"]

# A kernel this sparse is worth offering to the converter's sparsity pass
# (it encodes nothing below ~30% zeros anyway).
_MIN_SPARSITY_TO_TRY = 0.3


def has_sparse_kernels(model):
    for layer in prunable.iter_layers(model):
        if prunable.is_prunable(layer) and layer.built:
            for kernel in prunable.prunable_kernels(layer):
                value = np.asarray(kernel.numpy() if hasattr(kernel, "numpy") else kernel)
                if value.size >= 64 and np.mean(value == 0) >= _MIN_SPARSITY_TO_TRY:
                    return True
    return False


def run_converter(model, specs, quantize, calibration, sparse, per_channel=True):
    """TFLite converter on `model` (Keras) -> .tflite bytes; `per_channel=False`: per-tensor int8 dense weights.

    TF 2.21's converter fails on some graphs only when the batch size is
    static (measured: Dense on rank-3 inputs before a constant multiply, as
    in attention and transformer FFNs -- "'tfl.mul' op result type ... not
    broadcast compatible"; slicing channels of a Conv1D output -- "'tf.Transpose'
    op x should be of the same rank"). Such a failure is retried once with an
    unknown batch dimension: the file then holds batch 1 with a -1 shape
    signature, which every runtime here runs. If that fails too, the first
    error is raised.
    """
    try:
        return _run_converter(model, specs, quantize, calibration, sparse, per_channel)
    except UnsupportedOpError:
        raise
    except ExportError as error:
        if all(list(s["shape"])[:1] == [None] for s in specs):
            raise
        first = error
    try:
        specs = [{**s, "shape": [None, *list(s["shape"])[1:]]} for s in specs]
        return _run_converter(model, specs, quantize, calibration, sparse, per_channel)
    except ExportError:
        raise first from None


def _run_converter(model, specs, quantize, calibration, sparse, per_channel):
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
    if not per_channel and quantize in ("int8", "dynamic"):
        _compat.per_tensor_int8_dense_weights(converter)
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    with runtimes.captured_stderr() as log, _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        try:
            return bytes(converter.convert())
        except Exception as error:  # ConverterError and friends: translate below
            failure = error
    raise_converter_error(failure, (log[0] if log else ""))


_FLEX = re.compile(r"TF Select ops: ([^\n]+)")
_NOT_BUILTIN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def raise_converter_error(error, log):
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


def settle_sparsity(tflite, sparse, quantize, report, dense):
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
    for name, dtype, block, shape, consumer, stored in replaced:
        layout = "CSR (random)" if all(b == 1 for b in block) else "x".join(map(str, block)) + " blocks"
        if not stored:
            reason = ("every entry is zero: a sparse encoding would store no value, and the runtimes read "
                      "its empty buffer as a missing input; stored dense (the converter folds it)")
        elif partial(block, shape):
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
