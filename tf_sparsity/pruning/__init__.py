"""Model-level pruning methods, one file per paper."""

from tf_sparsity.pruning.str import soft_threshold

__all__ = ["soft_threshold"]
