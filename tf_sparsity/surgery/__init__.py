"""Model surgery: rebuild graphs (`graph`), remove channels (`channels` for chains,
`groups` + `group_surgery` for channel dependency groups, `coupling` for
channel-STR over those groups, `constant_units` to fold units constant on the
data into a bias), strip (`strip`)."""

from tf_sparsity.layer_copy import clone_layer, fresh_layer
from tf_sparsity.surgery.channels import (
    CHANNEL_PRUNABLE,
    ChannelChain,
    channel_chains,
    channel_contributions,
    prune_channels,
    remove_zero_channels,
)
from tf_sparsity.surgery.graph import (
    as_graph_model,
    check_model,
    map_layers,
    resolve_skip,
    transfer_weights,
    wrap_prunable,
    wrappers,
)
from tf_sparsity.surgery.group_surgery import (
    ALLOCATIONS, check_budget, dead_units, group_macs, keep_for_budget, prune_dead_units, prune_groups, uniform_keep)
from tf_sparsity.surgery.groups import ChannelGroup, ChannelGroups, channel_groups
from tf_sparsity.surgery.constant_units import fold_constant_units
from tf_sparsity.surgery.coupling import ChannelCoupling, ChannelGroupModel, couple_channels
from tf_sparsity.surgery.strip import strip

__all__ = [
    "ALLOCATIONS", "CHANNEL_PRUNABLE", "check_budget", "ChannelChain", "ChannelCoupling", "ChannelGroup", "ChannelGroupModel",
    "ChannelGroups", "channel_chains", "couple_channels", "dead_units", "fold_constant_units", "prune_dead_units",
    "channel_groups", "group_macs", "keep_for_budget", "prune_groups", "uniform_keep", "channel_contributions", "as_graph_model", "check_model",
    "clone_layer", "fresh_layer", "map_layers", "prune_channels", "remove_zero_channels",
    "resolve_skip", "strip", "transfer_weights", "wrap_prunable", "wrappers",
]
