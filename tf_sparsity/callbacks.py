"""Callbacks: per-layer sparsity logging, collapse guard, target-sparsity steering."""

import math
import warnings

import keras
import numpy as np
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity import surgery
from tf_sparsity.layers.low_rank import thresholded_matrices
from tf_sparsity.summary import summary


class LayerCollapseError(RuntimeError):
    """Raised when a layer's prunable kernels become entirely zero."""


def _report_collapse(names, step, on_collapse, model, reported):
    new = [n for n in names if n not in reported]
    if not new:
        return
    reported.update(new)
    message = (
        f"Layer collapse at step {step}: every prunable weight of {new} is zero, "
        "so no signal passes through (accuracy will fall to chance). Lower the "
        "target sparsity / weight decay, or skip these layers."
    )
    if on_collapse == "raise":
        raise LayerCollapseError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    if on_collapse == "stop":
        model.stop_training = True


def publish(values, logs, writer, step):
    """Put scalar `values` into the Keras `logs` (History keeps them) and TensorBoard."""
    if logs is not None:
        logs.update(values)
    if writer is not None:
        import tensorflow as tf  # TensorBoard writing is TensorFlow-specific

        with writer.as_default():
            for key, value in values.items():
                tf.summary.scalar(key, value, step=step)
        writer.flush()


def _check_on_collapse(on_collapse):
    if on_collapse not in ("warn", "stop", "raise"):
        raise ValueError(f"`on_collapse` must be 'warn', 'stop' or 'raise'; received {on_collapse!r}.")


@keras.saving.register_keras_serializable(package="tf_sparsity")
class SparsityMonitor(keras.callbacks.Callback):
    """Logs per-layer sparsity and thresholds; reports layer collapse at once.

    At each epoch end it adds `sparsity`, `sparsity/<layer>` and
    `threshold/<layer>` to the Keras logs (so `History` keeps them) and, with
    `log_dir`, writes them to TensorBoard. Every `check_every` training steps
    it looks for layers whose kernels are entirely zero and warns (or stops
    training, or raises `LayerCollapseError`) naming them.

    Example:

    >>> model.fit(x, y, callbacks=[tfs.callbacks.SparsityMonitor(log_dir="logs")])  # doctest: +SKIP
    """

    def __init__(self, log_dir=None, check_every=20, on_collapse="warn"):
        super().__init__()
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"`check_every` must be an integer >= 1; received {check_every!r}.")
        _check_on_collapse(on_collapse)
        self.log_dir = log_dir
        self.check_every = check_every
        self.on_collapse = on_collapse
        self._writer = None
        self._reported = set()

    def on_train_begin(self, logs=None):
        self._steps = 0
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf  # TensorBoard writing is TensorFlow-specific

            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def _collapsed(self):
        return [w.layer.name for w in surgery.wrappers(self.model) if w.is_collapsed()]

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._steps % self.check_every == 0:
            _report_collapse(self._collapsed(), self._steps, self.on_collapse, self.model, self._reported)

    def on_epoch_end(self, epoch, logs=None):
        report = summary(self.model, print_fn=None)
        values = {"sparsity": report.sparsity}
        for row in report.layers:
            if row.prunable:
                values[f"sparsity/{row.name}"] = row.sparsity
                if row.threshold is not None:
                    values[f"threshold/{row.name}"] = row.threshold
        publish(values, logs, self._writer, epoch)
        _report_collapse(report.collapsed, f"epoch {epoch + 1}", self.on_collapse, self.model, self._reported)

    def get_config(self):
        return {"log_dir": self.log_dir, "check_every": self.check_every, "on_collapse": self.on_collapse}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _name(thresholded):
    """The user-facing name of a wrapper's layer or of a low-rank matrix."""
    return thresholded.layer.name if hasattr(thresholded, "layer") else thresholded.name


def polynomial_ramp(step, begin_step, end_step, power=3):
    """Fraction of the target reached at `step`: 0 at `begin_step`, 1 at `end_step`.

    The cubic default is the gradual-pruning schedule of Zhu & Gupta (2017).
    """
    if end_step <= begin_step:
        return 1.0 if step >= end_step else 0.0
    progress = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
    return 1.0 - (1.0 - progress) ** power


def solve_threshold_offset(wrappers, target_sparsity, bounds=(-100.0, 100.0), iterations=60):
    """Common logit offset `b` at which the wrappers' overall sparsity is closest to target.

    Returns `(b, names of layers that are entirely zero at b)`. Each wrapper zeros the groups whose magnitude is <= `g(s_l + b)`, so
    overall sparsity is monotone in `b`: bisection finds it. Layer shares stay
    set by each layer's learned `s_l` and its weights.
    """
    layers = []
    total = 0
    for w in wrappers:
        magnitudes, sizes = w.threshold_magnitudes()
        magnitudes = magnitudes.ravel()
        sizes = np.broadcast_to(np.asarray(sizes, "float64"), magnitudes.shape)
        order = np.argsort(magnitudes, kind="stable")
        # Entries zeroed when the first i groups (by magnitude) are pruned.
        cumulative = np.concatenate([[0.0], np.cumsum(sizes[order])])
        layers.append((magnitudes[order], cumulative, w))
        total += cumulative[-1]
    logits = np.array([float(ops.convert_to_numpy(w.threshold_logit)) for w in wrappers], "float64")
    goal = target_sparsity * total
    threshold_fns = [_numpy_threshold_fn(w.threshold_fn) for w in wrappers]

    def layer_zeros(offset):
        return [
            cumulative[np.searchsorted(m, fn(s + offset), side="right")]
            for (m, cumulative, _), fn, s in zip(layers, threshold_fns, logits)
        ]

    def zeros(offset):
        return sum(layer_zeros(offset))

    lo, hi = bounds
    if zeros(lo) >= goal:
        best = lo
    elif zeros(hi) <= goal:
        best = hi
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if zeros(mid) <= goal:
                lo = mid
            else:
                hi = mid
        best = lo if abs(zeros(lo) - goal) <= abs(zeros(hi) - goal) else hi
    sizes = [cumulative[-1] for _, cumulative, _ in layers]
    collapsed = [_name(w) for w, z, n in zip(wrappers, layer_zeros(best), sizes) if z >= n - 0.5]
    return best, collapsed


def _numpy_threshold_fn(fn):
    # The solver evaluates g many times per update: stay in NumPy for the
    # built-in functions, go through keras.ops only for custom ones.
    if fn is sparse_ops.THRESHOLD_FUNCTIONS["sigmoid"]:
        return lambda z: float(np.float32(0.5 * (1.0 + np.tanh(0.5 * z))))
    if fn is sparse_ops.THRESHOLD_FUNCTIONS["exponential"]:
        return lambda z: float(np.float32(np.exp(min(z, 80.0))))
    return lambda z: float(ops.convert_to_numpy(fn(ops.convert_to_tensor(np.float32(z)))))


@keras.saving.register_keras_serializable(package="tf_sparsity")
class TargetSparsity(keras.callbacks.Callback):
    """Steers STR thresholds so training ends at a requested overall sparsity.

    Every `update_every` steps it sets a common offset `b` on all thresholds,
    `g(s_l + b)`, so the overall sparsity follows a cubic ramp from 0 at
    `begin_step` to `target` at `end_step` and holds it after. Each layer's
    own logit `s_l` is still learned by the loss and its decay, so layers keep
    their own shares (non-uniform budgets); only the global level is steered.
    The schedule reads `optimizer.iterations`, so training resumed from a
    checkpoint continues the same schedule.

    Args:
        target: overall sparsity in (0, 1) over all wrapped kernels.
        begin_step: optimizer step at which the ramp starts.
        end_step: step at which `target` is reached; default: `end_fraction`
            of the steps of the `fit` call (epochs x steps per epoch).
        end_fraction: used when `end_step` is None.
        update_every: steps between offset updates.
        on_collapse: "warn", "stop" or "raise" when a layer becomes all zero.

    Example:

    >>> sparse = tfs.soft_threshold(model)  # doctest: +SKIP
    >>> sparse.fit(x, y, epochs=30, callbacks=[tfs.callbacks.TargetSparsity(0.9)])  # doctest: +SKIP
    """

    def __init__(self, target, begin_step=0, end_step=None, end_fraction=0.7, update_every=20,
                 power=3, on_collapse="warn"):
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"`target` must be a sparsity in (0, 1); received {target!r}.")
        if not 0 < end_fraction <= 1:
            raise ValueError(f"`end_fraction` must be in (0, 1]; received {end_fraction!r}.")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an integer >= 1; received {update_every!r}.")
        if end_step is not None and end_step < begin_step:
            raise ValueError(f"`end_step` ({end_step}) must be >= `begin_step` ({begin_step}).")
        _check_on_collapse(on_collapse)
        self.target = float(target)
        self.begin_step = int(begin_step)
        self.end_step = end_step
        self.end_fraction = float(end_fraction)
        self.update_every = update_every
        self.power = power
        self.on_collapse = on_collapse
        self._reported = set()

    def _wrappers(self):
        found = [w for w in surgery.wrappers(self.model) if hasattr(w, "threshold_offset")]
        found += thresholded_matrices(self.model)  # low-rank RNN matrices: rank is steered too
        if not found:
            raise ValueError(
                "TargetSparsity needs a model with learned thresholds "
                "(tfs.soft_threshold, tfs.layers.SoftThreshold or low-rank cells); found none."
            )
        return found

    def on_train_begin(self, logs=None):
        self.wrappers = self._wrappers()
        if self.end_step is None:
            epochs = (self.params or {}).get("epochs")
            steps = (self.params or {}).get("steps")
            if not epochs or not steps:
                raise ValueError(
                    "TargetSparsity cannot infer the schedule length (unknown steps per "
                    "epoch); pass `end_step`."
                )
            self._end = max(self.begin_step, int(self.end_fraction * epochs * steps))
        else:
            self._end = int(self.end_step)
        self._step = self._optimizer_step()
        self.update(self._step)

    def current_target(self, step):
        """The scheduled overall sparsity at optimizer step `step`."""
        return self.target * polynomial_ramp(step, self.begin_step, self._end, self.power)

    def update(self, step=None):
        """Set the threshold offsets for `step` (default: the optimizer's). Custom loops call this."""
        if step is None:
            step = self._optimizer_step()
        offset, collapsed = solve_threshold_offset(self.wrappers, self.current_target(step))
        for wrapper in self.wrappers:
            wrapper.threshold_offset.assign(offset)
        _report_collapse(collapsed, step, self.on_collapse, self.model, self._reported)
        return offset

    def _optimizer_step(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_batch_end(self, batch, logs=None):
        # Count steps in Python: reading `iterations` every batch forces a sync.
        self._step += 1
        if self._step % self.update_every == 0 or self._step == self._end:
            self.update(self._step)

    def on_train_end(self, logs=None):
        self.update()

    def get_config(self):
        return {
            "target": self.target, "begin_step": self.begin_step, "end_step": self.end_step,
            "end_fraction": self.end_fraction, "update_every": self.update_every,
            "power": self.power, "on_collapse": self.on_collapse,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
