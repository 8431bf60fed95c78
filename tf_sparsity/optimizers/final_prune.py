"""`final_prune`: keep exactly the global top-Q weights by |w|, as GSM ends."""

import numpy as np
from keras import ops

from tf_sparsity.budget import resolve_budget
from tf_sparsity.optimizers import gsm_kernels
from tf_sparsity.optimizers.gsm import GlobalSparseMomentum, check_keep, variables_of
from tf_sparsity.optimizers.pool import pool_predicate

__all__ = ["final_prune", "find_gsm"]


def find_gsm(optimizer):
    """The `GlobalSparseMomentum` inside `optimizer` (unwrapping loss scaling), or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GlobalSparseMomentum):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


def final_prune(model_or_vars, compression=None, sparsity=None, pool=None,
                threshold_method="histogram", *, target_sparsity=None):
    """Keep exactly the global top-Q weights by |w| over the GSM pool; zero the rest.

    With a model compiled with `GlobalSparseMomentum` and no budget
    arguments, the optimizer's Q and pool are used (and its momentum for
    the zeroed entries is cleared). Otherwise pass `compression` or
    `sparsity` (and optionally `pool`, as in the optimizer). The
    result is plain zeros in the kernels: `tfs.summary(model)` shows it.
    Returns `model_or_vars`.

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(10)])
    >>> _ = final_prune(m, compression=4)
    >>> tfs.summary(m, print_fn=None).nonzeros
    25
    """
    variables = variables_of(model_or_vars)
    if compression is None and sparsity is None and target_sparsity is None and pool is None:
        gsm = find_gsm(getattr(model_or_vars, "optimizer", None))
        if gsm is not None and gsm.built:
            return gsm.final_prune(model_or_vars)
    budget = resolve_budget(compression, sparsity, target_sparsity=target_sparsity)
    predicate = pool_predicate(pool)
    pool_vars = [v for v in variables if predicate(v)]
    n = sum(int(np.prod(v.shape)) for v in pool_vars)
    if n == 0:
        raise ValueError("`pool`: no variable of `model_or_vars` is in the pool (rank >= 2 by default).")
    q = budget.keep(n)
    check_keep(q, n, budget)
    for v, m in zip(pool_vars, gsm_kernels.magnitude_masks(pool_vars, q, threshold_method)):
        v.assign(ops.where(m, v, ops.zeros_like(v)))
    return model_or_vars
