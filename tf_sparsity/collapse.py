"""Layer collapse: one policy vocabulary, one warning, one exception.

Every method that can empty a layer (STR steering, `SparsityMonitor`,
`prune_at_init`) reports collapse through `report_collapse`, with the same
`on_collapse` values: "warn" (default), "raise", "ignore", and, during
training only, "stop" (warn and end `fit`).
"""

import warnings

__all__ = ["EmptiedBranchWarning", "LayerCollapseError", "LayerCollapseWarning", "ON_COLLAPSE", "check_on_collapse", "report_collapse"]

ON_COLLAPSE = ("warn", "raise", "ignore", "stop")


class LayerCollapseError(RuntimeError, ValueError):
    """A layer's prunable kernels became entirely zero and `on_collapse="raise"`.

    Also a `ValueError`: `prune_at_init` raised that before the policy was shared.
    """


class LayerCollapseWarning(RuntimeWarning):
    """A layer's prunable kernels became entirely zero."""


class EmptiedBranchWarning(UserWarning):
    """Pruning emptied a residual branch or gate; the network stays connected
    (`tf_sparsity.pruning.connectivity` tells the two apart)."""


def check_on_collapse(on_collapse, training=True):
    """Validate `on_collapse`; "stop" only makes sense while training."""
    allowed = ON_COLLAPSE if training else ON_COLLAPSE[:3]
    if on_collapse not in allowed:
        raise ValueError(f"`on_collapse` must be one of {list(allowed)}; received {on_collapse!r}.")
    return on_collapse


def report_collapse(message, on_collapse, model=None, stacklevel=3):
    """Act on a collapse `message` according to `on_collapse`.

    "raise" raises `LayerCollapseError`; "warn" and "stop" warn with
    `LayerCollapseWarning` ("stop" also sets `model.stop_training`).
    """
    if on_collapse == "ignore":
        return
    if on_collapse == "raise":
        raise LayerCollapseError(message)
    warnings.warn(message, LayerCollapseWarning, stacklevel=stacklevel)
    if on_collapse == "stop" and model is not None:
        model.stop_training = True
