"""Quiet TensorFlow's start-up lines for the `tf-sparsity` command.

TF 2.21 prints its start-up lines (oneDNN, CUDA stub, "All log messages
before absl::InitializeLog()", CPU features) from C++ before absl's logging
is set up, so `TF_CPP_MIN_LOG_LEVEL` alone does not silence them (measured).
The console script imports the package (and TensorFlow) before `cli.main`
runs, so this runs first thing in `tf_sparsity/__init__.py`, and only when
the process is the `tf-sparsity` command without `--verbose`. Library users'
stderr is never touched.
"""

import os
import sys


def launched_as_cli():
    return os.path.basename(sys.argv[0] if sys.argv else "") == "tf-sparsity" and "--verbose" not in sys.argv


def quiet_tensorflow_startup():
    """Import TensorFlow and create its devices with file descriptor 2 closed."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.config.list_logical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
