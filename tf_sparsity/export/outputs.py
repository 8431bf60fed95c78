"""The last stage of every export: write the files, atomically."""

import os

from tf_sparsity.export.atomic import atomic_write
from tf_sparsity.export.c_array import write_c_array

__all__ = ["write_outputs"]


def write_outputs(tflite, path, c_files, spec, report, compiled=None, extra=None, arena_bytes=None):
    """Write the .tflite at `path` (parent folders created) and what goes with it.

    Also the EdgeTPU compiler's `<stem>_edgetpu.tflite` (`compiled`), the C
    array pair (`c_files`; default: for tflm) and `extra` files, a dict of
    `{suffix: bytes}` written as `<stem><suffix>` (the step form's
    `_sequence.h`). `arena_bytes` (default: the report's) goes into the C
    header. Returns `(path written or None, tuple of other paths)`.
    """
    if path is None:
        return None, ()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = atomic_write(path, tflite)
    root, ext = os.path.splitext(os.fspath(path))
    others = []
    if compiled is not None:
        atomic_write(root + "_edgetpu" + (ext or ".tflite"), compiled)
    if c_files if c_files is not None else spec.name == "tflm":
        others += list(write_c_array(tflite, path, arena_bytes=arena_bytes or report.tflm.get("arena_bytes")))
        for suffix, data in (extra or {}).items():
            others.append(atomic_write(root + suffix, data))
    return written, tuple(others)
