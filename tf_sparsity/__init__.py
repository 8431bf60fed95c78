"""tf_sparsity: sparse training for Keras 3, deployed to LiteRT, EdgeTPU and TFLM.

>>> import tf_sparsity as tfs
>>> sparse = tfs.soft_threshold(model)                        # doctest: +SKIP
>>> sparse.fit(x, y, callbacks=[tfs.callbacks.TargetSparsity(0.9)])  # doctest: +SKIP
>>> tfs.summary(sparse); plain = tfs.strip(sparse)             # doctest: +SKIP
"""

from tf_sparsity import callbacks, datasets, distribute, export, layers, ops, optimizers, prunable, pruning, zoo
from tf_sparsity.pruning.at_init import prune_at_init
from tf_sparsity.pruning.greedy import greedy_prune
from tf_sparsity.pruning.str import soft_threshold
from tf_sparsity.summary import sparsity, summary
from tf_sparsity.surgery import strip

__version__ = "0.1.0"

__all__ = [
    "callbacks", "datasets", "distribute", "export", "layers", "ops", "optimizers", "prunable", "pruning", "zoo",
    "greedy_prune", "prune_at_init", "soft_threshold", "sparsity", "summary", "strip",
]
