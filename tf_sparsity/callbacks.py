"""Callbacks: per-layer sparsity logging, collapse guard, target-sparsity / target-MACs steering."""

import warnings

import keras
from keras import ops

from tf_sparsity import surgery
from tf_sparsity.budget import resolve_budget
from tf_sparsity.logs import publish
from tf_sparsity.protocols import DecaySteerable
from tf_sparsity.collapse import LayerCollapseError, LayerCollapseWarning, check_on_collapse, report_collapse
from tf_sparsity.schedules import PolynomialRamp
from tf_sparsity.steering import (DecayController, current_sparsity, logit_bounds, solve_flops_offset,
                                  solve_threshold_offset, steerables)
from tf_sparsity.summarize import summary

__all__ = ["LayerCollapseError", "LayerCollapseWarning", "SparsityMonitor", "TargetFlops", "TargetSparsity",
           "publish"]


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
    report_collapse(message, on_collapse, model, stacklevel=4)


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
        check_on_collapse(on_collapse)
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


@keras.saving.register_keras_serializable(package="tf_sparsity")
class TargetSparsity(keras.callbacks.Callback):
    """Steers STR thresholds so training ends at a requested overall sparsity.

    The overall sparsity follows a cubic ramp from 0 at `begin_step` to
    `target` at `end_step` and holds it after. With `steer="offset"` every
    `update_every` steps sets a common offset `b` on all thresholds,
    `g(s_l + b)` (exact; the mode for one shared threshold level,
    `learn_threshold=False`). With `steer="decay"` (experimental) nothing is added to the thresholds while training: the
    decay on every `s_l` is scaled up or down so the sparsity tracks the
    ramp, each `s_l` stays learned by the loss and its decay, and one
    final offset (`finish="offset"`) lands the model exactly on the target.
    The schedule reads `optimizer.iterations`, so training resumed from a
    checkpoint continues the same schedule.

    Args:
        sparsity: overall sparsity in (0, 1) over all wrapped kernels (or
            `compression=C`, keep 1/C; `target=` is the deprecated name).
        begin_step: optimizer step at which the ramp starts.
        end_step: step at which `target` is reached; default: `end_fraction`
            of the steps of the `fit` call (epochs x steps per epoch).
        end_fraction: used when `end_step` is None.
        update_every: steps between offset updates.
        on_collapse: "warn", "stop" or "raise" when a layer becomes all zero.
        steer: "offset" (default: a common offset `b` on all thresholds,
            found exactly by bisection; the mode for `learn_threshold=False`),
            "decay" (experimental: no offset during training, a controller
            scales every layer's decay on `s`, the paper's knob, so each
            learned `s_l` stays free; see
            `tf_sparsity.steering.DecayController` and docs/str.md for its
            measured state) or "auto" ("decay" when every wrapper learns
            its threshold with a nonzero decay on `s`, else "offset").
        finish: with `steer="decay"`, "offset" (default) sets one common
            offset at the end of training so the model ends exactly at the
            target (a last correction after all learning); "none" leaves
            the sparsity where the controller brought it.
        decay_gain: share of the needed logit shift the decay should make
            over the next `update_every` steps (1 = all of it).
        decay_rule: with `steer="decay"`, how the multiplier is sized
            (`tf_sparsity.steering.DecayController`): "shift" (default,
            linearized in logits, at most 2 logits per update) or "ratio"
            (multiplicative in `s`, exact under momentum, for any `s_init`:
            the paper regime, `s_init=-3200`).
        decay_max_rate: with `decay_rule="ratio"`, the largest change of
            `log |s|` per step (below -log(momentum) / 2, where momentum
            would carry `s` past 0).

    Example:

    >>> sparse = tfs.soft_threshold(model)  # doctest: +SKIP
    >>> sparse.fit(x, y, epochs=30, callbacks=[tfs.callbacks.TargetSparsity(0.9)])  # doctest: +SKIP
    """

    def __init__(self, sparsity=None, begin_step=0, end_step=None, end_fraction=0.7, update_every=20,
                 power=3, on_collapse="warn", *, compression=None, target=None, steer="offset",
                 finish="offset", decay_gain=1.0, decay_rule="shift", decay_max_rate=0.025):
        super().__init__()
        budget = resolve_budget(compression, sparsity, target=target)
        if not 0 < end_fraction <= 1:
            raise ValueError(f"`end_fraction` must be in (0, 1]; received {end_fraction!r}.")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an integer >= 1; received {update_every!r}.")
        if end_step is not None and end_step < begin_step:
            raise ValueError(f"`end_step` ({end_step}) must be >= `begin_step` ({begin_step}).")
        check_on_collapse(on_collapse)
        if steer not in ("auto", "offset", "decay"):
            raise ValueError(f"`steer` must be 'auto', 'offset' or 'decay'; received {steer!r}.")
        if finish not in ("offset", "none"):
            raise ValueError(f"`finish` must be 'offset' or 'none'; received {finish!r}.")
        self._controller = DecayController(decay_gain, rule=decay_rule, max_rate=decay_max_rate)  # checks both
        self.decay_rule = decay_rule
        self.decay_max_rate = float(decay_max_rate)
        self.steer = steer
        self.finish = finish
        self.decay_gain = float(decay_gain)
        self.budget = budget
        self.target = budget.target_sparsity
        self.begin_step = int(begin_step)
        self.end_step = end_step
        self.end_fraction = float(end_fraction)
        self.update_every = update_every
        self.power = power
        self.on_collapse = on_collapse
        self._reported = set()

    def _wrappers(self):
        found = steerables(self.model)  # STR wrappers and low-rank matrices: ranks are steered too
        if not found:
            raise ValueError(
                "TargetSparsity needs a model with learned thresholds "
                "(tfs.soft_threshold, tfs.layers.SoftThreshold or low-rank cells); found none."
            )
        return found

    def _mode(self):
        if self.steer != "auto":
            return self.steer
        decay = all(isinstance(w, DecaySteerable) and w.learn_threshold and w.s_decay for w in self.wrappers)
        return "decay" if decay else "offset"

    def on_train_begin(self, logs=None):
        self.wrappers = self._wrappers()
        self.mode = self._mode()
        if self.mode == "decay":
            bad = [w.steering_name for w in self.wrappers if not isinstance(w, DecaySteerable)]
            if bad:
                raise ValueError(f"`steer='decay'` needs SoftThreshold wrappers; {bad} have no decay on `s`.")
            self._controller = DecayController(self.decay_gain, rule=self.decay_rule, max_rate=self.decay_max_rate)
            for wrapper in self.wrappers:  # the dynamics carry no offset
                wrapper.threshold_offset.assign(0.0)
            self.trace = []  # (step, scheduled target, sparsity, decay multiplier)
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
        return self.target * PolynomialRamp(self.begin_step, self._end, self.power)(step)

    def update(self, step=None):
        """Set the threshold offsets for `step` (default: the optimizer's). Custom loops call this."""
        if step is None:
            step = self._optimizer_step()
        if getattr(self, "mode", "offset") == "decay":
            target = self.current_target(step)
            opt = self.model.optimizer
            lr = opt.learning_rate
            lr = lr(opt.iterations) if callable(lr) else lr
            scale, sparsity = self._controller.update(
                self.wrappers, target, float(ops.convert_to_numpy(lr)),
                getattr(opt, "momentum", 0.0) or 0.0, self.update_every)
            self.trace.append((int(step), float(target), float(sparsity), scale))
            collapsed = [w.steering_name for w in self.wrappers if w.is_collapsed()]
            _report_collapse(collapsed, step, self.on_collapse, self.model, self._reported)
            return scale
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
        if getattr(self, "mode", "offset") == "decay":
            self.update()
            self.sparsity_before_finish = current_sparsity(self.wrappers)
            if self.finish == "offset":
                offset, collapsed = solve_threshold_offset(self.wrappers, self.current_target(self._optimizer_step()),
                                                           bounds=logit_bounds(self.wrappers))
                for wrapper in self.wrappers:
                    wrapper.threshold_offset.assign(offset)
            return
        self.update()

    def get_config(self):
        return {
            "sparsity": self.budget.sparsity, "compression": self.budget.compression, "begin_step": self.begin_step, "end_step": self.end_step,
            "end_fraction": self.end_fraction, "update_every": self.update_every,
            "power": self.power, "on_collapse": self.on_collapse, "steer": self.steer,
            "finish": self.finish, "decay_gain": self.decay_gain, "decay_rule": self.decay_rule,
            "decay_max_rate": self.decay_max_rate,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tf_sparsity")
class TargetFlops(TargetSparsity):
    """Steers channel-STR over channel groups so the stripped model has a MACs budget.

    For `tfs.soft_threshold(model, granularity="channel")` (a
    `tfs.surgery.ChannelGroupModel`): every `update_every` steps one common
    offset `b` on all thresholds is set so that `tfs.strip` of the model
    would keep the scheduled fraction of the dense MACs
    (`tf_sparsity.steering.solve_flops_offset`, counting with
    `tfs.surgery.group_macs`). The fraction follows a cubic ramp from 1 at
    `begin_step` to `flops` at `end_step` and holds it after. The mode for
    one shared threshold level (`learn_threshold=False`, the channel-STR
    recipe); reached MACs are in `.flops_reached` (a warning says when they
    end more than 0.02 from `flops`, e.g. when frozen channels forbid it).

    Args:
        flops: the MACs fraction of the dense model to end at, in (0, 1).
        begin_step: optimizer step at which the ramp starts.
        end_step: step at which `flops` is reached; default: `end_fraction`
            of the steps of the `fit` call.
        end_fraction: used when `end_step` is None.
        update_every: steps between offset updates.
        power: the ramp's exponent.
        on_collapse: "warn", "stop" or "raise" when a channel group is emptied.

    Example:

    >>> m = tfs.zoo.mnist1d_resnet(filters=(8, 16), blocks=1)
    >>> sparse = tfs.soft_threshold(m, granularity="channel", learn_threshold=False, shrink=False)
    >>> _ = sparse.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> x, y = np.random.default_rng(0).normal(size=(64, 40, 1)), np.arange(64) % 10
    >>> steer = tfs.callbacks.TargetFlops(0.5, end_step=4, update_every=2)
    >>> _ = sparse.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[steer])
    >>> small = tfs.strip(sparse)
    >>> abs(tfs.summary(small, print_fn=None).flops / tfs.summary(m, print_fn=None).flops - 0.5) <= 0.02
    True
    """

    def __init__(self, flops=0.5, begin_step=0, end_step=None, end_fraction=0.7, update_every=20, power=3,
                 on_collapse="warn"):
        if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops < 1:
            raise ValueError(f"`flops` must be the fraction of the dense MACs to keep, a number in (0, 1); "
                             f"received {flops!r}.")
        super().__init__(sparsity=0.5, begin_step=begin_step, end_step=end_step, end_fraction=end_fraction,
                         update_every=update_every, power=power, on_collapse=on_collapse, steer="offset")
        self.flops = float(flops)
        self.flops_reached = None

    def _coupling(self):
        if not isinstance(self.model, surgery.ChannelGroupModel) or self.model.channel_coupling is None:
            raise ValueError(
                "TargetFlops steers channel-STR over channel groups: train the model returned by "
                "`tfs.soft_threshold(model, granularity='channel')` (channel_groups=True); received "
                f"{type(self.model).__name__} '{self.model.name}'.")
        return self.model.channel_coupling

    def on_train_begin(self, logs=None):
        coupling = self._coupling()
        smallest = coupling.stripped_macs(coupling.floor_alive()) / coupling.dense_macs()
        if smallest > self.flops + 0.02:
            raise ValueError(
                f"`flops={self.flops:g}` cannot be reached: with every thresholdable channel group at "
                f"{max(1, coupling.min_channels)} unit(s) (`min_channels`) the model keeps {smallest:.3f} of "
                "its MACs; channels frozen by the group analysis "
                f"({sorted(coupling.groups.frozen.items())[:4]}) or read by layers left out of channel-STR "
                "are never removed.")
        super().on_train_begin(logs)

    @property
    def emptied_groups(self):
        """Names of the channel groups that were emptied at some update (none while `min_channels` >= 1)."""
        return sorted(self._reported)

    def current_target(self, step):
        """The scheduled MACs fraction at optimizer step `step`."""
        return 1.0 - (1.0 - self.flops) * PolynomialRamp(self.begin_step, self._end, self.power)(step)

    def update(self, step=None):
        """Set the threshold offsets for `step` (default: the optimizer's). Custom loops call this."""
        if step is None:
            step = self._optimizer_step()
        offset, self.flops_reached, emptied = solve_flops_offset(self._coupling(), self.current_target(step))
        for wrapper in self.wrappers:
            wrapper.threshold_offset.assign(offset)
        new = [n for n in emptied if n not in self._reported]
        if new:
            self._reported.update(new)
            report_collapse(
                f"Channel groups emptied at step {step}: every channel of {new} is zero. In a residual "
                "branch that removes the branch (strip keeps one channel); on the main path no signal "
                "passes (accuracy falls to chance): keep `min_channels` >= 1 (the default of "
                "`tfs.soft_threshold`), lower the MACs cut or skip those layers.",
                self.on_collapse, self.model, stacklevel=3)
        return offset

    def on_train_end(self, logs=None):
        self.update()
        if self._optimizer_step() >= self._end and abs(self.flops_reached - self.flops) > 0.02:
            warnings.warn(f"TargetFlops ended at {self.flops_reached:.3f} of the dense MACs, not {self.flops:g}: "
                          "the channel groups' sizes do not allow a closer cut.", stacklevel=2)

    def get_config(self):
        return {"flops": self.flops, "begin_step": self.begin_step, "end_step": self.end_step,
                "end_fraction": self.end_fraction, "update_every": self.update_every, "power": self.power,
                "on_collapse": self.on_collapse}
