"""STR at model level: wrap every prunable layer with `SoftThreshold`."""


from tf_sparsity import surgery
from tf_sparsity.surgery.coupling import model_structure
from tf_sparsity.layers.soft_threshold import SoftThreshold


def soft_threshold(model, s_init=-5.0, weight_decay=0.0, threshold_fn="sigmoid", skip=None,
                   learn_threshold=True, granularity="weight", block_shape=(4, 1), shrink=True,
                   threshold_decay=None, threshold_lr_scale=1.0, channel_groups=True,
                   threshold_gradient="sum", min_channels=1):
    """Wrap every prunable layer of `model` with STR's learned threshold.

    Returns a new model (the input is untouched) whose Dense, EinsumDense,
    Conv*, DepthwiseConv*, SeparableConv* (both kernels), Conv*Transpose and
    Embedding layers are `tfs.layers.SoftThreshold` wrappers sharing the
    original weights' values. Biases and normalization layers are never
    thresholded. Train with `model.fit`; add `tfs.callbacks.TargetSparsity`
    to end at a requested sparsity, and `tfs.strip` to export.

    Args:
        model: a built Sequential or functional Keras model (nested ok).
        s_init: initial threshold logit for every layer.
        weight_decay: coupled L2 on the kernels and thresholds (see
            `SoftThreshold`); the reference uses the network's weight decay.
        threshold_fn: "sigmoid" (paper default), "exponential" or a callable.
        skip: layer names, layer classes, or a predicate `layer -> bool`
            selecting prunable layers to leave dense.
        learn_threshold: train each layer's threshold logit (the paper's
            STR); False keeps it fixed (see `SoftThreshold`).
        granularity: "weight" (the paper), "block" (`block_shape` blocks of
            the kernel's (in, out) axes: (4, 1) = LiteRT's fast 1x4 float FC
            blocks, (16, 1) for int8) or "channel" (whole channels;
            `tfs.strip` then returns a physically smaller model).
        block_shape: see `granularity`.
        shrink: False keeps surviving groups unshrunk (hard mask, for use
            with `learn_threshold=False` and `TargetSparsity`).
        threshold_decay: coupled L2 on each `s` (the reference's
            `--st-decay`); None = `weight_decay`.
        threshold_lr_scale: gradient scale on each `s` (an `s` learning-rate
            scale under SGD; no effect under Adam). See `SoftThreshold`.
        threshold_gradient: "sum" (the paper), "mean" or "sqrt" (the loss
            gradient on each `s` divided by its layer's kernel entry count or
            its square root; our variants). See `SoftThreshold`.
        channel_groups: with `granularity="channel"`, threshold channel
            dependency groups (`tfs.surgery.channel_groups`: channels tied
            by residual adds, depthwise convs, concats, squeeze-excite) as
            one unit each -- their RMS over every kernel slice they touch,
            consumers' input rows included -- and return a
            `tfs.surgery.ChannelGroupModel`; `tfs.strip` removes the dead
            groups exactly. False: each layer's output channels alone (the
            old behaviour; removed only along simple chains).
        min_channels: with channel groups, the channels of each group that
            always survive (its largest by RMS). The default 1 never empties
            a group (on the main path that would cut the network); 0 allows
            it, and the steering callbacks then report the collapse.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2, name="head")])
    >>> sparse = tfs.soft_threshold(model, s_init=-5.0, weight_decay=5e-4, skip=["head"])
    >>> [type(l).__name__ for l in sparse.layers]
    ['SoftThreshold', 'Dense']
    """
    if not isinstance(channel_groups, bool):
        raise TypeError(f"`channel_groups` must be True or False; received {channel_groups!r}.")
    wrapped = surgery.wrap_prunable(
        model,
        lambda layer: SoftThreshold(
            layer, s_init=s_init, weight_decay=weight_decay, threshold_fn=threshold_fn,
            learn_threshold=learn_threshold, granularity=granularity, block_shape=block_shape,
            shrink=shrink, threshold_decay=threshold_decay, threshold_lr_scale=threshold_lr_scale,
            threshold_gradient=threshold_gradient, min_channels=min_channels,
        ),
        skip=skip,
    )
    if granularity != "channel" or not channel_groups:
        return wrapped
    grouped = surgery.ChannelGroupModel(*model_structure(wrapped), name=wrapped.name)
    if not grouped.channel_coupling or not grouped.channel_coupling.num_units:
        groups = grouped.channel_coupling.groups if grouped.channel_coupling else None
        raise ValueError(
            "`granularity='channel'`: no channel group of `model` can be thresholded (every group "
            "is frozen or touches a layer in `skip`); frozen: "
            f"{(groups.frozen or {n: g.frozen for n, g in groups.groups.items()}) if groups else 'all'}. "
            "Use `channel_groups=False` for per-layer channel thresholds.")
    return grouped
