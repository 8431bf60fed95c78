"""The contracts between the package's modules (a leaf: imports nothing from the package).

`strip`, `summary` and `TargetSparsity` dispatch on these protocols instead of
probing attributes, so a new layer type takes part by implementing one method
and the modules never import each other to find out what a layer can do.
Recurrent layers are looked through generically: a `keras.layers.RNN` whose
`cell` implements a protocol takes part through its cell
(`tf_sparsity.prunable.protocol_owner`).
"""

from typing import Protocol, runtime_checkable

__all__ = ["StrippableLayer", "StrippableCell", "ReportsSummary", "Steerable", "DecaySteerable", "HoldsSteerables"]


@runtime_checkable
class StrippableLayer(Protocol):
    """A layer `tfs.strip` replaces by a plain, built Keras layer with the
    same outputs (wrappers: their effective kernels; low-rank RNN layers:
    their rank-r factors)."""

    def stripped_layer(self):
        ...


@runtime_checkable
class StrippableCell(Protocol):
    """An RNN cell whose stripped form is a plain deployable cell;
    `keras.layers.RNN(cell)` strips to `keras.layers.RNN(cell.stripped_cell())`."""

    def stripped_cell(self, projection="matmul"):
        ...


@runtime_checkable
class ReportsSummary(Protocol):
    """A layer or cell that builds its own `tf_sparsity.report.LayerReport`.

    `timesteps` (per-example MACs of a cell) and `name` are passed when the
    owner is an RNN layer looking through its cell.
    """

    def summary_row(self, timesteps=None, name=None):
        ...


@runtime_checkable
class Steerable(Protocol):
    """A learned threshold `g(threshold_logit + threshold_offset)` that
    `TargetSparsity` may steer by assigning `threshold_offset`.

    `threshold_magnitudes()` returns `(magnitudes, sizes)`: the group
    magnitudes the threshold is compared with and how many entries each
    group zeroes; `steering_name` names the object in collapse reports.
    """

    threshold_logit: object
    threshold_offset: object
    threshold_fn: object
    steering_name: str

    def threshold_magnitudes(self):
        ...


@runtime_checkable
class DecaySteerable(Steerable, Protocol):
    """A `Steerable` whose `s` also carries its own coupled decay, which
    `TargetSparsity(steer="decay")` steers through `threshold_decay_scale`
    instead of the common offset (`SoftThreshold`)."""

    learn_threshold: bool
    s_decay: float
    threshold_lr_scale: float
    threshold_decay_scale: object


@runtime_checkable
class HoldsSteerables(Protocol):
    """A layer or cell made of several `Steerable` objects (low-rank cells:
    one per matrix)."""

    def thresholded_matrices(self):
        ...
