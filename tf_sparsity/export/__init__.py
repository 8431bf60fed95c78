"""Export to .tflite for LiteRT, the Coral EdgeTPU and TFLite Micro, verified on the runtimes.

>>> import tf_sparsity as tfs
>>> result = tfs.export.convert(model, target="tflm", representative_data=x[:100],
...                             path="out/model.tflite")            # doctest: +SKIP
>>> print(result.report)                                            # doctest: +SKIP
>>> print(tfs.export.inspect("out/model.tflite"))                   # doctest: +SKIP

- `convert(model, target, quantize, representative_data, sparse, path, verify)`
  -> `ExportResult` (`.tflite`, `.path`, `.report`).
- `inspect(path_or_bytes)` -> `ModelInfo`: ops, tensors, sparse tensors,
  quantization and a `Verdict` per target, for any .tflite file.
- Stages of `convert`, one module each: `prepare`, `inputs`, `converter`,
  `verify`, `lut`.
- `TARGETS`: the capability table (`targets.py`), `write_c_array`: the C
  source/header writer.

See docs/export.md for what sparsity buys on each target.
"""

from tf_sparsity.export.c_array import write_c_array
from tf_sparsity.export.pipeline import convert
from tf_sparsity.export.errors import (
    ExportError,
    InvalidModelError,
    UnsupportedOpError,
    VerificationError,
)
from tf_sparsity.export.inspection import ModelInfo, Verdict, inspect
from tf_sparsity.export.lut import lut_candidates
from tf_sparsity.export.result import ExportReport, ExportResult
from tf_sparsity.export.targets import TARGETS, Target

__all__ = [
    "convert", "inspect", "ExportResult", "ExportReport", "ModelInfo", "Verdict", "TARGETS", "Target",
    "write_c_array", "lut_candidates",
    "ExportError", "InvalidModelError", "UnsupportedOpError", "VerificationError",
]
