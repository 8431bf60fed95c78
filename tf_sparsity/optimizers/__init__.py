"""Optimizers that sparsify while they train.

>>> opt = tfs.optimizers.GlobalSparseMomentum(0.01, momentum=0.99, compression=10)  # doctest: +SKIP
>>> model.compile(opt, loss); model.fit(x, y, callbacks=[tfs.optimizers.GSMMonitor()])  # doctest: +SKIP
>>> tfs.optimizers.final_prune(model)  # doctest: +SKIP
"""

from tf_sparsity.optimizers.gsm import GlobalSparseMomentum, GSMMonitor, final_prune

__all__ = ["GlobalSparseMomentum", "GSMMonitor", "final_prune"]
