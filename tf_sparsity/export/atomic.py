"""Atomic file writes: an interrupted export never leaves a truncated file."""

import os
import tempfile


def atomic_write(path, data):
    """Write `data` to `path` via a temp file in the same directory + `os.replace`.

    The temp file lives next to the target so the rename never crosses file
    systems (where it would not be atomic); it is fsynced before the rename
    and removed if anything fails.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; exported models should be readable like
        # any other output (or keep the mode of the file being replaced).
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
