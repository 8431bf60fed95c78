"""`GSMMonitor`: GSM's per-layer share of selected weights (the paper's layer sensitivity)."""

import warnings

import keras
import tensorflow as tf  # TensorBoard writer
from keras import ops

from tf_sparsity import prunable
from tf_sparsity.logs import publish
from tf_sparsity.optimizers.final_prune import find_gsm

__all__ = ["GSMMonitor"]


@keras.saving.register_keras_serializable(package="tf_sparsity")
class GSMMonitor(keras.callbacks.Callback):
    """Logs GSM's per-layer share of active (selected) weights.

    At each epoch end it adds `gsm_active/<layer>` (the fraction of that
    kernel's entries in the last top-Q mask) to the Keras logs, so `History`
    keeps the layer-sensitivity curves; with `log_dir` it also writes them
    to TensorBoard. With `every_n_steps` it records a finer trace in
    `self.trace` (a list of `(step, {layer: fraction})`). The optimizer
    refreshes the counters every `count_every` steps (default 10), so finer
    tracing needs a smaller `count_every`. Reading them syncs with the
    device, so the default reads once per epoch.

    On train begin it warns if a pool layer also has a `kernel_regularizer`
    (the optimizer already applies the L2; see `GlobalSparseMomentum`).

    >>> model.fit(x, y, callbacks=[tfs.optimizers.GSMMonitor()])  # doctest: +SKIP
    >>> history.history["gsm_active/conv1"]                      # doctest: +SKIP
    """

    def __init__(self, every_n_steps=None, log_dir=None):
        super().__init__()
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"`every_n_steps` must be None or an integer >= 1; received {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.log_dir = log_dir
        self.trace = []
        self._writer = None

    def _gsm(self):
        gsm = find_gsm(getattr(self.model, "optimizer", None))
        if gsm is None:
            raise ValueError("GSMMonitor needs a model compiled with tfs.optimizers.GlobalSparseMomentum.")
        return gsm

    def on_train_begin(self, logs=None):
        gsm = self._gsm()
        doubled = []
        for layer in prunable.iter_layers(self.model):
            if getattr(layer, "kernel_regularizer", None) is not None and any(
                gsm._pool_fn(v) for v in layer.trainable_variables
            ):
                doubled.append(layer.name)
        if doubled:
            warnings.warn(
                f"Layers {doubled} have a kernel_regularizer while GlobalSparseMomentum applies "
                "its own coupled L2 (`weight_decay`): the decay is counted twice and the "
                "regularizer's gradient enters the |w*g| score. Remove the regularizers.",
                RuntimeWarning, stacklevel=2,
            )
        self._step = 0
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every_n_steps and self._step % self.every_n_steps == 0:
            self.trace.append((int(ops.convert_to_numpy(self._gsm().iterations)), self._gsm().active_fractions()))

    def on_epoch_end(self, epoch, logs=None):
        gsm = self._gsm()
        if not gsm.built:
            return
        publish({f"gsm_active/{k}": v for k, v in gsm.active_fractions().items()}, logs, self._writer, epoch)

    def get_config(self):
        return {"every_n_steps": self.every_n_steps, "log_dir": self.log_dir}

    @classmethod
    def from_config(cls, config):
        # keras.callbacks.Callback has no from_config; deserialization needs one.
        return cls(**config)
