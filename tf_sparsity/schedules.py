"""Ramp schedules: how much of a budget is reached at a given step.

One serializable `PolynomialRamp` serves `TargetSparsity` (the share of the
target sparsity steered so far) and `GlobalSparseMomentum(ramp_steps=...)`
(the share of weights pruned so far).
"""

import keras
import numpy as np
from keras import ops

__all__ = ["PolynomialRamp"]


@keras.saving.register_keras_serializable(package="tf_sparsity")
class PolynomialRamp:
    """Fraction of a target reached at `step`: 0 at `begin_step`, 1 at `end_step` and after.

    `1 - (1 - progress) ** power`; the cubic default is the gradual-pruning
    schedule of Zhu & Gupta (2017). Accepts Python numbers (returns a float)
    and tensors (returns a float32 tensor, usable inside compiled steps).

    Args:
        begin_step: step at which the ramp leaves 0.
        end_step: step at which it reaches 1 (>= `begin_step`).
        power: curvature; 1 is linear.

    >>> ramp = PolynomialRamp(0, 100)
    >>> ramp(0), ramp(50), ramp(100), ramp(500)
    (0.0, 0.875, 1.0, 1.0)
    """

    def __init__(self, begin_step=0, end_step=1, power=3):
        if end_step < begin_step:
            raise ValueError(f"`end_step` ({end_step}) must be >= `begin_step` ({begin_step}).")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 0:
            raise ValueError(f"`power` must be a number > 0; received {power!r}.")
        self.begin_step, self.end_step, self.power = int(begin_step), int(end_step), power

    def __call__(self, step):
        length = self.end_step - self.begin_step
        if isinstance(step, (int, float, np.integer, np.floating)):
            if length <= 0:
                return 1.0 if step >= self.end_step else 0.0
            progress = min(max((step - self.begin_step) / length, 0.0), 1.0)
            return 1.0 - (1.0 - progress) ** self.power
        step = ops.cast(step, "float32")
        if length <= 0:
            return ops.cast(step >= self.end_step, "float32")
        progress = ops.clip((step - self.begin_step) / float(length), 0.0, 1.0)
        return 1.0 - (1.0 - progress) ** self.power

    def get_config(self):
        return {"begin_step": self.begin_step, "end_step": self.end_step, "power": self.power}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
