"""The recommended hyperparameters of each method, in one place.

The demo, the CLI, the examples and the benchmarks build their models and
optimizers from these, so a recipe change (measured in docs/benchmarks.md)
is made once. Each value says where it was measured.

>>> import tf_sparsity as tfs
>>> sparse = tfs.recipes.str_model(tfs.zoo.mnist1d_cnn())
>>> sorted({type(l).__name__ for l in sparse.layers})
['Flatten', 'InputLayer', 'SoftThreshold']
>>> opt = tfs.recipes.gsm_optimizer(total_steps=100, sparsity=0.9)
>>> round(opt.momentum, 2), opt.l2, opt.sparsity
(0.99, 0.005, 0.9)
"""

import keras

__all__ = [
    "DENSE_WEIGHT_DECAY", "GSM", "LOW_RANK_LEARNING_RATE", "LOW_RANK_RAMP_END", "LOW_RANK_STR", "SGD_LEARNING_RATE",
    "STR", "STR_WARMUP_EPOCHS",
    "gsm_optimizer", "low_rank_optimizer", "str_model",
]

# Dense training: SGD-Nesterov 0.9 with cosine decay from 0.1 (the STR
# reference recipe), L2 5e-4 through the loss (docs/benchmarks.md, dense rows).
SGD_LEARNING_RATE = 0.1
DENSE_WEIGHT_DECAY = 5e-4

# STR with a shared, steered threshold level (`learn_threshold=False`) and
# `TargetSparsity`: the best STR rows on MNIST-1D (docs/str.md).
STR = dict(weight_decay=5e-4, learn_threshold=False)
# One dense warm-up epoch before thresholds are steered: thresholding from step
# 0, during MNIST-1D's initial loss plateau, trapped STR@0.95 at 53% (89% with it).
STR_WARMUP_EPOCHS = 1

# GSM from trained dense weights, as in the official pipeline: momentum 0.99,
# Nesterov, coupled L2 5e-3 drives the unselected weights to ~0, cosine from 0.02.
GSM = dict(learning_rate=0.02, momentum=0.99, nesterov=True, weight_decay=5e-3)

# Low-rank STR cells: relative, exponential threshold steered from far below
# (docs/low_rank.md); Adam 1e-2 with clipnorm 1. The low-rank RNN benchmark
# and `tf-sparsity prune --method lowrank` decay it (cosine) and end the rank
# ramp at half of training (`LOW_RANK_RAMP_END`); the demo keeps 1e-2 constant
# and the default ramp: on its 15-epoch low-rank GRU(32) that measured 85.4 +- 8.6%
# vs 68.4 +- 9.7% with cosine (3 seeds; docs/benchmarks.md, issue 14).
LOW_RANK_STR = dict(threshold_fn="exponential", s_init=-10.0, learn_threshold=False)
LOW_RANK_LEARNING_RATE = 1e-2
LOW_RANK_RAMP_END = 0.5


def str_model(model, **overrides):
    """`tfs.soft_threshold(model)` with the `STR` recipe (`overrides` win)."""
    from tf_sparsity.pruning.str import soft_threshold

    return soft_threshold(model, **{**STR, **overrides})


def gsm_optimizer(total_steps, compression=None, sparsity=None, **overrides):
    """`GlobalSparseMomentum` with the `GSM` recipe and cosine decay over `total_steps`."""
    from tf_sparsity.optimizers import GlobalSparseMomentum

    settings = {**GSM, **overrides}
    schedule = keras.optimizers.schedules.CosineDecay(settings.pop("learning_rate"), max(1, int(total_steps)))
    return GlobalSparseMomentum(schedule, compression=compression, sparsity=sparsity, **settings)


def low_rank_optimizer(total_steps=None, learning_rate=LOW_RANK_LEARNING_RATE):
    """Adam with gradient clipping (and cosine decay over `total_steps`), the low-rank RNN recipe.

    Args:
        total_steps: optimizer steps of the whole training (epochs x steps
            per epoch) for a cosine decay to 0; None keeps `learning_rate`
            constant (the demo's choice).
        learning_rate: the initial learning rate.

    Example:

    >>> import tf_sparsity as tfs
    >>> opt = tfs.recipes.low_rank_optimizer(total_steps=100)
    >>> opt.clipnorm, round(float(opt.learning_rate), 4)
    (1.0, 0.01)
    """
    if total_steps is not None:
        if int(total_steps) < 1:
            raise ValueError(f"`total_steps` must be a positive number of optimizer steps; received {total_steps!r}.")
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, int(total_steps))
    return keras.optimizers.Adam(learning_rate, clipnorm=1.0)
