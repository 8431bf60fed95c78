"""One budget, one spelling: `compression=` (keep 1/C) or `sparsity=` (fraction zero).

GSM, `final_prune`, `prune_at_init`, `TargetSparsity` and the CLI all take a
budget through `resolve_budget`, so the names, the checks and the error
messages are the same everywhere. Old spellings (`target_sparsity=`,
`target=`) still work with a `DeprecationWarning`.
"""

import dataclasses
import math
import warnings

__all__ = ["Budget", "resolve_budget"]


def _is_number(x):
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many weights to keep: exactly one of `compression` or `sparsity` is set.

    >>> Budget(compression=10).keep(1000), Budget(sparsity=0.9).keep(1000)
    (100, 100)
    """

    compression: float | None = None
    sparsity: float | None = None

    @property
    def density(self):
        """Fraction of weights kept."""
        return 1.0 / self.compression if self.compression is not None else 1.0 - self.sparsity

    @property
    def target_sparsity(self):
        """Fraction of weights zeroed."""
        return 1.0 - self.density

    def keep(self, n):
        """Number of weights to keep out of `n`: round(n / compression) or round(n * (1 - sparsity))."""
        if self.compression is not None:
            return int(round(n / self.compression))
        return int(round(n * (1.0 - self.sparsity)))

    def __str__(self):
        return f"compression={self.compression:g}" if self.compression is not None else f"sparsity={self.sparsity:g}"


def resolve_budget(compression=None, sparsity=None, *, required=True, **deprecated):
    """Check a budget and return a `Budget` (or None when not `required` and none is given).

    `deprecated` maps an old argument name to its value (e.g.
    `target_sparsity=0.9`); a value there counts as `sparsity=` and warns.

    >>> resolve_budget(sparsity=0.75).density
    0.25
    >>> resolve_budget(compression=1)
    Traceback (most recent call last):
    ...
    ValueError: `compression` must be a number > 1 (10 keeps 1/10 of the weights); received 1.
    """
    for name, value in deprecated.items():
        if value is None:
            continue
        warnings.warn(f"`{name}` is deprecated; pass `sparsity={value!r}` instead.", DeprecationWarning,
                      stacklevel=3)
        if sparsity is not None:
            raise ValueError(f"Pass `sparsity` or its deprecated spelling `{name}`, not both.")
        sparsity = value
    if compression is None and sparsity is None:
        if not required:
            return None
        raise ValueError("Pass exactly one of `compression` (> 1, keep N / compression weights) or "
                         "`sparsity` (in (0, 1), the fraction of weights zeroed).")
    if compression is not None and sparsity is not None:
        raise ValueError("Pass exactly one of `compression` or `sparsity`; received "
                         f"compression={compression!r}, sparsity={sparsity!r}.")
    if compression is not None:
        if not _is_number(compression) or not compression > 1:
            raise ValueError("`compression` must be a number > 1 (10 keeps 1/10 of the weights); "
                             f"received {compression!r}.")
        return Budget(compression=float(compression))
    if not _is_number(sparsity) or not 0 < sparsity < 1:
        raise ValueError(f"`sparsity` must be a number in (0, 1); received {sparsity!r}.")
    return Budget(sparsity=float(sparsity))
