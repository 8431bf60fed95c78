"""The exporter's errors: each says what went wrong, on which target, and what to do.

All subclass `ValueError`, so callers (and the CLI) that catch `ValueError`
for bad input keep working.
"""


class ExportError(ValueError):
    """Base class of every error `tfs.export` raises on purpose."""


class InvalidModelError(ExportError):
    """The bytes or file given to `inspect` are not a readable .tflite model."""


class UnsupportedOpError(ExportError):
    """The model uses an operation the target runtime cannot run.

    Attributes: `op` (the TFLite or TensorFlow op name), `target`.
    """

    def __init__(self, message, op=None, target=None):
        super().__init__(message)
        self.op = op
        self.target = target


class VerificationError(ExportError):
    """The exported model did not load or run on the target's runtime."""
