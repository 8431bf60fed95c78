"""Model-level pruning methods, one file per paper."""

from tf_sparsity.pruning import connectivity, flow_network
from tf_sparsity.pruning.at_init import METHODS, critical_compression, prune_at_init, scores
from tf_sparsity.pruning.greedy import greedy_groups, greedy_prune, l1_norm_prune, random_prune
from tf_sparsity.pruning.greedy_loss import greedy_loss
from tf_sparsity.pruning.str import soft_threshold

__all__ = [
    "METHODS", "connectivity", "critical_compression", "flow_network", "greedy_groups", "greedy_loss", "greedy_prune",
    "l1_norm_prune", "prune_at_init", "random_prune", "scores",
    "soft_threshold",
]
