"""Optimizers that sparsify while they train.

>>> opt = tfs.optimizers.GlobalSparseMomentum(0.01, momentum=0.99, compression=10)  # doctest: +SKIP
>>> model.compile(opt, loss); model.fit(x, y, callbacks=[tfs.optimizers.GSMMonitor()])  # doctest: +SKIP
>>> tfs.optimizers.final_prune(model)  # doctest: +SKIP
"""

from tf_sparsity.optimizers.final_prune import final_prune, find_gsm
from tf_sparsity.optimizers.gsm import GlobalSparseMomentum
from tf_sparsity.optimizers.gsm_monitor import GSMMonitor
from tf_sparsity.optimizers.pool import default_pool, display_name

__all__ = ["GlobalSparseMomentum", "GSMMonitor", "final_prune", "find_gsm", "default_pool", "display_name"]
