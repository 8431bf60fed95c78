"""tflite-micro's look-up-table compression: which weights qualify, and applying it."""

import math
import warnings as _warnings

import numpy as np

from tf_sparsity.export import runtimes
from tf_sparsity.export.inspection import inspect

__all__ = ["lut_candidates", "lut_compress"]


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


def lut_compress(tflite, report):
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
