"""tf_sparsity: sparse training for Keras 3, deployed to LiteRT, EdgeTPU and TFLM.

>>> import tf_sparsity as tfs
>>> sparse = tfs.soft_threshold(model)                        # doctest: +SKIP
>>> sparse.fit(x, y, callbacks=[tfs.callbacks.TargetSparsity(0.9)])  # doctest: +SKIP
>>> tfs.summary(sparse); plain = tfs.strip(sparse)             # doctest: +SKIP

Public: the functions below and the modules `layers`, `callbacks`,
`optimizers`, `pruning`, `export`, `distribute`, `recipes`, `schedules`, `budget`, `batchnorm`,
`datasets`, `zoo`, `ops`, `summarize` (the `tfs.summary` machinery; its row
types are in `report`), `protocols` (the contracts a new layer implements)
and `collapse`. `surgery.channel_groups` / `surgery.prune_groups` are public too. Everything else (`_compat`, the rest of `surgery`, `prunable`, `steering`,
`layer_copy`, `logs`, `experiments`, `demo`, `cli`, `plots`) is internal and
may change.
"""

from tf_sparsity import _startup

if _startup.launched_as_cli():
    _startup.quiet_tensorflow_startup()

from tf_sparsity import (  # noqa: E402
    batchnorm,
    budget,
    callbacks,
    collapse,
    datasets,
    distribute,
    export,
    layers,
    ops,
    optimizers,
    protocols,
    prunable,
    pruning,
    recipes,
    report,
    schedules,
    summarize,
    zoo,
)
from tf_sparsity.batchnorm import recalibrate_batchnorm  # noqa: E402
from tf_sparsity.pruning.at_init import prune_at_init  # noqa: E402
from tf_sparsity.pruning.greedy import greedy_prune
from tf_sparsity.pruning.str import soft_threshold
from tf_sparsity.summarize import sparsity, summary
from tf_sparsity.surgery import strip

__version__ = "0.1.0"

__all__ = [
    "batchnorm", "budget", "callbacks", "collapse", "datasets", "distribute", "export", "layers", "ops", "optimizers",
    "protocols",
    "prunable", "pruning", "recipes", "report", "schedules", "summarize", "zoo",
    "greedy_prune", "prune_at_init", "recalibrate_batchnorm", "soft_threshold", "sparsity", "summary", "strip",
]
