"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019) as a Keras 3 optimizer.

Each step, over one global pool of kernels, only the top-Q entries by
`|w * dL/dw|` receive their loss gradient; every weight keeps its (coupled) L2
decay through momentum, so the unselected ones drift to zero:

    B = top-Q mask of |w * g| over the whole pool (recomputed every step)
    z <- beta * z + eta * w + B * g
    w <- w - alpha * z

The per-step math (scores, selection, the fused XLA update) is in
`gsm_kernels`, the pool in `pool`, `final_prune` and `GSMMonitor` in their own
modules. At the end `final_prune` keeps the global top-Q by |w| and zeroes the rest
(no fine-tuning, as in the paper).
"""

import keras
import numpy as np
import tensorflow as tf  # raw momentum kernel, XLA programs, tf.distribute
from keras import ops

from tf_sparsity import _compat
from tf_sparsity import ops as sparse_ops
from tf_sparsity.budget import resolve_budget
from tf_sparsity.optimizers import gsm_kernels
from tf_sparsity.optimizers.pool import display_name, pool_predicate
from tf_sparsity.optimizers.pool import pool_path
from tf_sparsity.schedules import PolynomialRamp

__all__ = ["GlobalSparseMomentum", "check_keep", "variables_of"]

_METRICS = ("taylor", "magnitude")
_METHODS = ("histogram", "exact", "sample")
_DECAY_SCOPES = ("kernels", "all")


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_keep(q, n, budget):
    """Raise unless keeping `q` of the pool's `n` weights prunes something and keeps something."""
    if q >= n:
        raise ValueError(
            f"`compression`/`sparsity`: the pool has only {n} weights and {budget} keeps "
            f"Q={q} of them, so nothing would be pruned. Use a higher compression / sparsity "
            "or a larger pool."
        )
    if q < 1:
        raise ValueError(
            f"`compression`/`sparsity`: {budget} keeps Q={q} of the pool's {n} weights; "
            "at least one weight must remain."
        )


@keras.saving.register_keras_serializable(package="tf_sparsity")
class GlobalSparseMomentum(keras.optimizers.Optimizer):
    """Global Sparse Momentum SGD: only the top-Q weights get loss gradients.

    Every step, over one global *pool* (by default every trainable variable
    of rank >= 2, i.e. all kernels of all layers), the optimizer keeps the
    `Q` entries with the largest `|w * g|` (first-order Taylor estimate of
    the loss change if the weight were removed; `g` is the loss-only
    gradient) and zeroes the loss gradient of all others. Then, for every
    variable (pool or not), momentum SGD with a *coupled* L2 term (on the
    kernels only by default, `decay_scope="kernels"`, as the official code):

        z <- momentum * z + weight_decay * w + B * g
        w <- w - learning_rate * z            (Nesterov: w <- w - lr * (d + momentum * z),
                                               d = weight_decay * w + B * g)

    so unselected kernel entries only decay and are accelerated towards zero
    by momentum, while selected ones train normally. The mask is recomputed
    every step, so weights can come back. Biases and normalization
    parameters (rank < 2) are never masked. After training, call
    `final_prune` (or `optimizer.final_prune(model)`) to keep exactly the
    global top-Q by `|w|`; the paper finds no fine-tuning is needed.

    `Q = round(N / compression)` or `round(N * (1 - target_sparsity))`, with
    `N` the number of entries in the pool.

    Weight decay: `weight_decay` here is the paper's L2 coefficient `eta`,
    applied through momentum (like PyTorch SGD's `weight_decay`), stored as
    `self.l2`. It is *not* Keras' decoupled `weight_decay` (which stays
    `None`). Do not also give the pool layers a `kernel_regularizer`: the
    L2 would be counted twice and, worse, enter `g` and hence the top-Q
    score. `exclude_from_weight_decay(...)` excludes variables from this L2.

    Distribution: under `tf.distribute` strategies the gradients are
    all-reduced first, then the top-Q is taken on the all-reduced gradient
    with the (mirrored) weights; every replica holds identical inputs and
    applies the same mask, so training matches one device on the global
    batch. Under `mixed_float16` (Keras wraps the optimizer in a
    `LossScaleOptimizer`) scores and thresholds are computed in float32 on
    unscaled gradients.

    Args:
        learning_rate: float, schedule or callable (`alpha`).
        momentum: `beta` in [0, 1); the paper uses 0.99 (with a smaller
            learning rate than plain SGD: the step scales as lr / (1 - beta)).
        nesterov: Nesterov momentum (PyTorch convention).
        weight_decay: coupled L2 coefficient `eta`.
        decay_scope: which variables the coupled L2 decays: "kernels"
            (default, the official code: every variable of rank >= 2; biases
            and normalization parameters get `weight_decay_bias=0`) or "all"
            (every variable, this package's behaviour before issue 16).
        compression: keep `N / compression` pool weights (> 1).
        target_sparsity: or keep `N * (1 - target_sparsity)`; in (0, 1).
        threshold_method: "histogram" (default: exactly Q, see
            `tf_sparsity.ops.topk_mask`), "exact" (full `top_k`, same masks,
            slow; inside XLA "histogram" falls back to it) or "sample" (about
            Q, ±1-2%: a threshold estimated from a 32k-entry sample,
            `tf_sparsity.ops.sampled_threshold`, applied inside the fused
            update -- the fastest; `final_prune` stays exact).
        metric: "taylor" (`|w * g|`, the paper) or "magnitude" (`|w|`, an
            ablation).
        ramp_steps: 0 (the paper: Q from the first step) or a number of
            steps over which the active set shrinks from the whole pool to Q
            (cubic, as in gradual pruning).
        pool: None (rank >= 2), a regex or list of regexes searched in
            variable paths, or a callable `variable -> bool`. Only None,
            regexes and registered functions survive serialization.
        count_every: steps between updates of the per-layer active counts
            (`active_fractions`, `GSMMonitor`); 1 counts every step.
        **kwargs: other Keras optimizer arguments (`clipnorm`, `use_ema`,
            `gradient_accumulation_steps`, `name`, ...).

    Example:

    >>> import keras, numpy as np, tf_sparsity as tfs
    >>> from tf_sparsity.optimizers import GlobalSparseMomentum, final_prune
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
    ...                           keras.layers.Dense(2)])
    >>> opt = GlobalSparseMomentum(0.01, momentum=0.99, compression=4)
    >>> model.compile(opt, "mse")
    >>> x, y = np.random.rand(64, 8), np.random.rand(64, 2)
    >>> _ = model.fit(x, y, epochs=2, verbose=0)
    >>> opt.q, opt.pool_size        # keep 40 of the 160 kernel entries
    (40, 160)
    >>> _ = final_prune(model)      # zero all but the global top-Q by |w|
    >>> tfs.summary(model, print_fn=None).nonzeros
    40
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.99,
        nesterov=False,
        weight_decay=5e-4,
        compression=None,
        sparsity=None,
        threshold_method="histogram",
        metric="taylor",
        ramp_steps=0,
        pool=None,
        count_every=10,
        decay_scope="kernels",
        name=None,
        target_sparsity=None,
        **kwargs,
    ):
        budget = resolve_budget(compression, sparsity, target_sparsity=target_sparsity)
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be a number in [0, 1); received {momentum!r}.")
        if weight_decay is None:
            weight_decay = 0.0
        if not _is_number(weight_decay) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0; received {weight_decay!r}.")
        if threshold_method not in _METHODS:
            raise ValueError(f"`threshold_method` must be one of {_METHODS}; received {threshold_method!r}.")
        if decay_scope not in _DECAY_SCOPES:
            raise ValueError(f"`decay_scope` must be one of {_DECAY_SCOPES}; received {decay_scope!r}.")
        if metric not in _METRICS:
            raise ValueError(f"`metric` must be one of {_METRICS}; received {metric!r}.")
        if not isinstance(ramp_steps, (int, np.integer)) or isinstance(ramp_steps, bool) or ramp_steps < 0:
            raise ValueError(f"`ramp_steps` must be an integer >= 0; received {ramp_steps!r}.")
        if not isinstance(count_every, (int, np.integer)) or isinstance(count_every, bool) or count_every < 1:
            raise ValueError(f"`count_every` must be an integer >= 1; received {count_every!r}.")
        predicate = pool_predicate(pool)
        # Keras' own weight_decay is decoupled (AdamW style); ours goes through
        # momentum as in the paper, so the base class must not apply any.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.l2 = float(weight_decay)
        self.budget = budget
        self.compression = budget.compression
        self.sparsity = budget.sparsity
        self.threshold_method = threshold_method
        self.metric = metric
        self.ramp_steps = int(ramp_steps)
        self.pool = pool
        self.count_every = int(count_every)
        self.decay_scope = decay_scope
        self._pool_fn = predicate
        self.pool_size = None  # N and Q are known once the optimizer is built
        self.q = None

    # ------------------------------------------------------------------ build
    def build(self, variables):
        if self.built:
            return
        flags = [bool(v.trainable is not False and self._pool_fn(v)) for v in variables]
        n = sum(int(np.prod(v.shape)) for v, f in zip(variables, flags) if f)
        if n == 0:
            raise ValueError(
                "`pool`: no variable of the model is in the GSM pool (by default every "
                "trainable variable of rank >= 2, i.e. the kernels). Nothing to sparsify; "
                "pass `pool=` to choose variables."
            )
        q = self.budget.keep(n)
        check_keep(q, n, self.budget)
        super().build(variables)
        self._in_pool = flags
        self.pool_size = n
        self.q = q
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Size of the last mask per pool variable: the paper's layer
        # sensitivity, one int32 scalar each (cheap to keep and to save).
        self._active_slot = [None] * len(variables)
        self.active_counts = []
        for i, (v, f) in enumerate(zip(variables, flags)):
            if f:
                self._active_slot[i] = len(self.active_counts)
                self.active_counts.append(self.add_variable(
                    shape=(), dtype="int32", initializer="zeros",
                    name=f"{pool_path(v).replace('/', '_')}_active",
                ))

    @property
    def pool_variables(self):
        """The model variables in the GSM pool (after `build`)."""
        self._require_built()
        return [v for v, f in zip(self._trainable_variables, self._in_pool) if f]

    def _require_built(self):
        if not self.built:
            raise ValueError(
                "The optimizer is not built yet: train a step or call "
                "`optimizer.build(model.trainable_variables)` first."
            )

    # ------------------------------------------------------------ the step
    def _current_k(self, n_present):
        q = min(self.q, n_present)
        if not self.ramp_steps:
            return q
        # Cubic ramp of the pruned share (Zhu & Gupta): dense at step 0, Q at ramp_steps.
        progress = ops.cast(PolynomialRamp(0, self.ramp_steps)(self.iterations), "float64")
        pruned = float(n_present - q) * progress
        return ops.cast(ops.round(float(n_present) - pruned), "int32")

    def _pool_indices(self, grads, variables):
        return [i for i, v in enumerate(variables)
                if grads[i] is not None and self._in_pool[self._get_variable_index(v)]]

    def _global_masks(self, grads, variables):
        """Per-variable selection (None outside the pool) from ONE global budget.

        The scores of every pool variable compete for the same Q: exact
        top-Q masks (`tf_sparsity.ops.global_topk_masks`), or with
        `threshold_method="sample"` one scalar threshold for all of them
        (`tf_sparsity.ops.sampled_threshold`), applied in the update.
        """
        masks = [None] * len(grads)
        pool = self._pool_indices(grads, variables)
        if not pool:
            return masks
        n_present = sum(int(np.prod(variables[i].shape)) for i in pool)
        k = self._current_k(n_present)
        ws = [variables[i] for i in pool]
        gs = [grads[i] for i in pool]
        if self.threshold_method == "sample":
            threshold = gsm_kernels.sampled_threshold([tf.convert_to_tensor(w) for w in ws], gs, k,
                                           tf.convert_to_tensor(self.iterations), self.metric)
            return [threshold if i in pool else None for i in range(len(grads))]
        method = self.threshold_method
        if method == "histogram" and _compat.in_xla_context():
            method = "exact"
        scores = [gsm_kernels.scores(w, g, self.metric) for w, g in zip(ws, gs)]
        found = sparse_ops.global_topk_masks(scores, k, method=method)
        for i, mask in zip(pool, found):
            masks[i] = mask
        return masks

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        # 1. All-reduce (a no-op outside tf.distribute replica contexts) so the
        #    mask is taken on the global-batch gradient, never per replica.
        reduced = _compat.all_reduce_sum_gradients(self, list(zip(grads, trainable_variables)))
        grads = [g for g, _ in reduced]
        # 2. One global top-Q over the whole pool. Every replica now holds the
        #    same reduced gradients and mirrored weights, hence the same mask.
        masks = self._global_masks(grads, trainable_variables)
        # 3. Per-variable momentum updates (on every replica's copy).
        tf_vars = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        _compat.maybe_merge_call(
            self._distributed_gsm_update, _compat.optimizer_strategy(self),
            list(zip(grads, tf_vars, masks)), learning_rate,
        )

    def _distributed_gsm_update(self, distribution, items, learning_rate):
        for grad, var, mask in items:
            if grad is None:
                continue
            distribution.extended.update(
                var, self._update_one, args=(grad, mask, learning_rate), group=False
            )

    def _update_one(self, variable, gradient, mask, learning_rate):
        if mask is None:
            self.update_step(gradient, variable, learning_rate)
            return
        active = self._masked_update(gradient, variable, learning_rate, mask)
        counter = self.active_counts[self._active_slot[self._get_variable_index(variable)]]
        if self.count_every == 1:
            self.assign(counter, active())
        else:
            # Counting is a full pass over the mask (~5% of a step on a
            # 1M-weight model when not fused): sample it every `count_every` steps.
            def count():
                self.assign(counter, active())
                return tf.constant(True)

            tf.cond(ops.equal(self.iterations % self.count_every, 0), count, lambda: tf.constant(False))

    # Use fused kernels: TensorFlow's momentum kernel for unmasked variables,
    # and one XLA program per pool variable that computes the selection,
    # the masked gradient, the coupled L2 and the momentum step in a single
    # pass over memory (the unfused ops make ~10 passes).
    fused_kernel = True

    def update_step(self, gradient, variable, learning_rate):
        """Unmasked variable: `d = g + l2*w`, `z <- beta*z + d`, `w <- w - lr*z` (or Nesterov)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        d = g + ops.cast(self.l2, dtype) * variable if self._decays(variable) else g
        z = self.momentums[self._get_variable_index(variable)] if self.momentum else None
        if self.fused_kernel and z is not None and keras.backend.backend() == "tensorflow":
            tf.raw_ops.ResourceApplyMomentum(
                var=_handle(variable), accum=_handle(z), lr=lr, grad=d,
                momentum=ops.cast(self.momentum, dtype), use_nesterov=self.nesterov,
            )
            return
        self._momentum_step(variable, z, d, lr)

    def _masked_update(self, gradient, variable, learning_rate, selection):
        """Pool variable: `d = B*g + l2*w`, then the momentum step.

        `selection` is a boolean mask `B` or a scalar score threshold
        (`B = score >= threshold`). Returns a callable giving `sum(B)`.
        """
        dtype = variable.dtype
        z = self.momentums[self._get_variable_index(variable)] if self.momentum else None
        l2 = self.l2 if self._decays(variable) else 0.0
        if self.fused_kernel and z is not None and keras.backend.backend() == "tensorflow":
            w_new, z_new, active = gsm_kernels.fused_step(
                tf.convert_to_tensor(variable), gradient, tf.convert_to_tensor(z), selection,
                ops.cast(learning_rate, dtype), ops.cast(l2, dtype), ops.cast(self.momentum, dtype),
                metric=self.metric, nesterov=self.nesterov,
            )
            self.assign(variable, w_new)
            self.assign(z, z_new)
            return lambda: active
        keep = gsm_kernels._keep(variable, gradient, selection, self.metric)
        g = ops.cast(gradient, dtype)
        d = ops.where(keep, g, ops.zeros_like(g))
        if l2:
            d = d + ops.cast(l2, dtype) * variable
        self._momentum_step(variable, z, d, ops.cast(learning_rate, dtype))
        return lambda: ops.sum(ops.cast(keep, "int32"))

    def _decays(self, variable):
        if self.decay_scope == "kernels" and len(variable.shape) < 2:
            return False  # biases, normalization parameters: no decay (the official code)
        return bool(self.l2) and self._use_weight_decay(variable)

    def _momentum_step(self, variable, z, d, lr):
        if z is not None:
            beta = ops.cast(self.momentum, variable.dtype)
            self.assign(z, beta * z + d)
            d = d + beta * z if self.nesterov else z
        self.assign_sub(variable, lr * d)

    # ------------------------------------------------------- sensitivity
    def active_counts_by_name(self):
        """`{name: entries selected by the last mask}` per pool variable."""
        self._require_built()
        return {
            display_name(v): int(ops.convert_to_numpy(c))
            for v, c in zip(self.pool_variables, self.active_counts)
        }

    def active_fractions(self):
        """`{name: share of the variable's entries in the last mask}`.

        High values mark sensitive layers (the loss wants many of their
        weights), low values layers GSM finds easy to prune.
        """
        self._require_built()
        return {
            display_name(v): int(ops.convert_to_numpy(c)) / int(np.prod(v.shape))
            for v, c in zip(self.pool_variables, self.active_counts)
        }

    # ----------------------------------------------------------- finish
    def final_prune(self, model_or_vars=None):
        """Keep the global top-Q pool weights by |w|; zero the rest and their momentum.

        `model_or_vars` defaults to every pool variable the optimizer was
        built with; pass a model or a list of variables to restrict. Returns
        the argument (or the list of pool variables).
        """
        self._require_built()
        pool = self.pool_variables
        if model_or_vars is not None:
            wanted = {self._var_key(v) for v in variables_of(model_or_vars)}
            pool = [v for v in pool if self._var_key(v) in wanted]
            if not pool:
                raise ValueError("`model_or_vars` holds none of this optimizer's pool variables.")
        n = sum(int(np.prod(v.shape)) for v in pool)
        masks = gsm_kernels.magnitude_masks(pool, min(self.q, n), self.threshold_method)
        for v, m in zip(pool, masks):
            v.assign(ops.where(m, v, ops.zeros_like(v)))
            if self.momentums:
                z = self.momentums[self._get_variable_index(v)]
                z.assign(ops.where(m, z, ops.zeros_like(z)))
        return pool if model_or_vars is None else model_or_vars

    # ------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        pool = self.pool
        if callable(pool):
            pool = keras.saving.serialize_keras_object(pool)
        config.update({
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.l2,
            "compression": self.compression,
            "sparsity": self.sparsity,
            "threshold_method": self.threshold_method,
            "metric": self.metric,
            "ramp_steps": self.ramp_steps,
            "pool": pool,
            "count_every": self.count_every,
            "decay_scope": self.decay_scope,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("pool"), dict):
            config["pool"] = keras.saving.deserialize_keras_object(config["pool"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


def _handle(variable):
    # The resource handle of a (Keras or tf / per-replica) variable for raw ops.
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def variables_of(model_or_vars):
    if isinstance(model_or_vars, keras.layers.Layer):
        return list(model_or_vars.trainable_variables)
    if isinstance(model_or_vars, (list, tuple)):
        return list(model_or_vars)
    raise TypeError(
        "`model_or_vars` must be a Keras model/layer or a list of variables; "
        f"received {type(model_or_vars).__name__}."
    )
