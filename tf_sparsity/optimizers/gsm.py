"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019) as a Keras 3 optimizer.

Each step, over one global pool of kernels, only the top-Q entries by
`|w * dL/dw|` receive their loss gradient; every weight keeps its (coupled) L2
decay through momentum, so the unselected ones drift to zero:

    B = top-Q mask of |w * g| over the whole pool (recomputed every step)
    z <- beta * z + eta * w + B * g
    w <- w - alpha * z

At the end `final_prune` keeps the global top-Q by |w| and zeroes the rest
(no fine-tuning, as in the paper).
"""

import re
import warnings

import keras
import numpy as np
import tensorflow as tf  # raw momentum kernel, XLA programs, tf.distribute
from keras import ops

from tf_sparsity import ops as sparse_ops
from tf_sparsity import prunable

_METRICS = ("taylor", "magnitude")
_METHODS = ("histogram", "exact", "sample")


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def default_pool(variable):
    """The default GSM pool: every trainable variable of rank >= 2 (kernels)."""
    return len(variable.shape) >= 2


def _pool_predicate(pool):
    """Turn the `pool` argument into `variable -> bool`."""
    if pool is None:
        return default_pool
    if isinstance(pool, str):
        pool = [pool]
    if isinstance(pool, (list, tuple)):
        if not pool or not all(isinstance(p, str) for p in pool):
            raise ValueError(
                "`pool` must be None, a callable `variable -> bool`, or a regex / list of "
                f"regexes matched against variable paths; received {pool!r}."
            )
        patterns = [re.compile(p) for p in pool]
        return lambda v: any(p.search(_path(v)) for p in patterns)
    if isinstance(pool, dict):  # a serialized registered function
        return keras.saving.deserialize_keras_object(pool)
    if callable(pool):
        return pool
    raise ValueError(
        "`pool` must be None, a callable `variable -> bool`, or a regex / list of "
        f"regexes matched against variable paths; received {pool!r}."
    )


def _path(variable):
    return getattr(variable, "path", None) or variable.name


def display_name(variable):
    """Short key for a pool variable: its path without a trailing `/kernel`."""
    path = _path(variable)
    return path[: -len("/kernel")] if path.endswith("/kernel") else path


def _target_q(n, compression, target_sparsity):
    """Number of weights to keep out of `n`: round(n / compression) or n * (1 - sparsity)."""
    if compression is not None:
        return int(round(n / compression))
    return int(round(n * (1.0 - target_sparsity)))


def _check_budget(compression, target_sparsity):
    if (compression is None) == (target_sparsity is None):
        raise ValueError(
            "Pass exactly one of `compression` (> 1, keep N / compression weights) or "
            "`target_sparsity` (in (0, 1)); received "
            f"compression={compression!r}, target_sparsity={target_sparsity!r}."
        )
    if compression is not None and (not _is_number(compression) or not compression > 1):
        raise ValueError(f"`compression` must be a number > 1; received {compression!r}.")
    if target_sparsity is not None and (not _is_number(target_sparsity) or not 0 < target_sparsity < 1):
        raise ValueError(f"`target_sparsity` must be in (0, 1); received {target_sparsity!r}.")


def _check_q(q, n, compression, target_sparsity):
    budget = f"compression={compression}" if compression is not None else f"target_sparsity={target_sparsity}"
    if q >= n:
        raise ValueError(
            f"`compression`/`target_sparsity`: the pool has only {n} weights and {budget} keeps "
            f"Q={q} of them, so nothing would be pruned. Use a higher compression / sparsity "
            "or a larger `pool`."
        )
    if q < 1:
        raise ValueError(
            f"`compression`/`target_sparsity`: {budget} keeps Q={q} of the pool's {n} weights; "
            "at least one weight must remain."
        )


def _in_xla_context():
    # The histogram threshold gathers a data-dependent number of entries,
    # which XLA cannot compile; `exact` (a static-k top_k) can.
    try:
        from tensorflow.python.ops import control_flow_util

        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:  # private API moved: assume no XLA
        return False


@keras.saving.register_keras_serializable(package="tf_sparsity")
class GlobalSparseMomentum(keras.optimizers.Optimizer):
    """Global Sparse Momentum SGD: only the top-Q weights get loss gradients.

    Every step, over one global *pool* (by default every trainable variable
    of rank >= 2, i.e. all kernels of all layers), the optimizer keeps the
    `Q` entries with the largest `|w * g|` (first-order Taylor estimate of
    the loss change if the weight were removed; `g` is the loss-only
    gradient) and zeroes the loss gradient of all others. Then, for every
    variable (pool or not), momentum SGD with a *coupled* L2 term:

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
        weight_decay: coupled L2 coefficient `eta` for every variable.
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
        target_sparsity=None,
        threshold_method="histogram",
        metric="taylor",
        ramp_steps=0,
        pool=None,
        count_every=10,
        name=None,
        **kwargs,
    ):
        _check_budget(compression, target_sparsity)
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be a number in [0, 1); received {momentum!r}.")
        if weight_decay is None:
            weight_decay = 0.0
        if not _is_number(weight_decay) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0; received {weight_decay!r}.")
        if threshold_method not in _METHODS:
            raise ValueError(f"`threshold_method` must be one of {_METHODS}; received {threshold_method!r}.")
        if metric not in _METRICS:
            raise ValueError(f"`metric` must be one of {_METRICS}; received {metric!r}.")
        if not isinstance(ramp_steps, (int, np.integer)) or isinstance(ramp_steps, bool) or ramp_steps < 0:
            raise ValueError(f"`ramp_steps` must be an integer >= 0; received {ramp_steps!r}.")
        if not isinstance(count_every, (int, np.integer)) or isinstance(count_every, bool) or count_every < 1:
            raise ValueError(f"`count_every` must be an integer >= 1; received {count_every!r}.")
        predicate = _pool_predicate(pool)
        # Keras' own weight_decay is decoupled (AdamW style); ours goes through
        # momentum as in the paper, so the base class must not apply any.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.l2 = float(weight_decay)
        self.compression = None if compression is None else float(compression)
        self.target_sparsity = None if target_sparsity is None else float(target_sparsity)
        self.threshold_method = threshold_method
        self.metric = metric
        self.ramp_steps = int(ramp_steps)
        self.pool = pool
        self.count_every = int(count_every)
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
        q = _target_q(n, self.compression, self.target_sparsity)
        _check_q(q, n, self.compression, self.target_sparsity)
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
                    name=f"{_path(v).replace('/', '_')}_active",
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
        t = ops.cast(self.iterations, "float64")
        progress = ops.minimum(t / float(self.ramp_steps), 1.0)
        pruned = float(n_present - q) * (1.0 - (1.0 - progress) ** 3)
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
            threshold = _sampled_threshold([tf.convert_to_tensor(w) for w in ws], gs, k,
                                           tf.convert_to_tensor(self.iterations), self.metric)
            return [threshold if i in pool else None for i in range(len(grads))]
        method = self.threshold_method
        if method == "histogram" and _in_xla_context():
            method = "exact"
        scores = [_scores(w, g, self.metric) for w, g in zip(ws, gs)]
        found = sparse_ops.global_topk_masks(scores, k, method=method)
        for i, mask in zip(pool, found):
            masks[i] = mask
        return masks

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        # 1. All-reduce (a no-op outside tf.distribute replica contexts) so the
        #    mask is taken on the global-batch gradient, never per replica.
        reduced = self._all_reduce_sum_gradients(list(zip(grads, trainable_variables)))
        grads = [g for g, _ in reduced]
        # 2. One global top-Q over the whole pool. Every replica now holds the
        #    same reduced gradients and mirrored weights, hence the same mask.
        masks = self._global_masks(grads, trainable_variables)
        # 3. Per-variable momentum updates (on every replica's copy).
        tf_vars = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_gsm_update, self._distribution_strategy,
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
            w_new, z_new, active = _fused_step(
                tf.convert_to_tensor(variable), gradient, tf.convert_to_tensor(z), selection,
                ops.cast(learning_rate, dtype), ops.cast(l2, dtype), ops.cast(self.momentum, dtype),
                metric=self.metric, nesterov=self.nesterov,
            )
            self.assign(variable, w_new)
            self.assign(z, z_new)
            return lambda: active
        keep = _keep(variable, gradient, selection, self.metric)
        g = ops.cast(gradient, dtype)
        d = ops.where(keep, g, ops.zeros_like(g))
        if l2:
            d = d + ops.cast(l2, dtype) * variable
        self._momentum_step(variable, z, d, ops.cast(learning_rate, dtype))
        return lambda: ops.sum(ops.cast(keep, "int32"))

    def _decays(self, variable):
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
            wanted = {self._var_key(v) for v in _variables_of(model_or_vars)}
            pool = [v for v in pool if self._var_key(v) in wanted]
            if not pool:
                raise ValueError("`model_or_vars` holds none of this optimizer's pool variables.")
        n = sum(int(np.prod(v.shape)) for v in pool)
        masks = _magnitude_masks(pool, min(self.q, n), self.threshold_method)
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
            "target_sparsity": self.target_sparsity,
            "threshold_method": self.threshold_method,
            "metric": self.metric,
            "ramp_steps": self.ramp_steps,
            "pool": pool,
            "count_every": self.count_every,
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


def _variables_of(model_or_vars):
    if isinstance(model_or_vars, keras.layers.Layer):
        return list(model_or_vars.trainable_variables)
    if isinstance(model_or_vars, (list, tuple)):
        return list(model_or_vars)
    raise TypeError(
        "`model_or_vars` must be a Keras model/layer or a list of variables; "
        f"received {type(model_or_vars).__name__}."
    )


def _magnitude_masks(variables, k, method):
    if method == "sample":  # final_prune is always exact
        method = "histogram"
    scores = [_scores(v, None, "magnitude") for v in variables]
    return sparse_ops.global_topk_masks(scores, k, method=method)


def _scores(w, g, metric):
    """GSM's selection score in float32: `|w * g|` ("taylor") or `|w|`."""
    w = ops.cast(w, "float32")
    return ops.abs(w * ops.cast(g, "float32")) if metric == "taylor" else ops.abs(w)


def _keep(w, g, selection, metric):
    if len(selection.shape):
        return selection
    score = _scores(w, g, metric)
    # threshold 0 means "fewer than k non-zero scores": keep just those.
    return ops.where(selection > 0, score >= selection, score > 0)


# Both are XLA programs: inside one, only the sampled scores are ever computed,
# and the selection, masked gradient, L2 and momentum fuse into one pass.
@tf.function(jit_compile=True)
def _sampled_threshold(ws, gs, k, step, metric):
    scores = [_scores(w, g, metric) for w, g in zip(ws, gs)]
    return sparse_ops.sampled_threshold(scores, k, offset=step)


@tf.function(jit_compile=True)
def _fused_step(w, g, z, selection, lr, l2, beta, metric, nesterov):
    keep = _keep(w, g, selection, metric)
    g = tf.cast(g, w.dtype)
    d = tf.where(keep, g, tf.zeros_like(g)) + l2 * w
    z = beta * z + d
    w = w - lr * (d + beta * z if nesterov else z)
    return w, z, tf.reduce_sum(tf.cast(keep, tf.int32))


def find_gsm(optimizer):
    """The `GlobalSparseMomentum` inside `optimizer` (unwrapping loss scaling), or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GlobalSparseMomentum):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


def final_prune(model_or_vars, compression=None, target_sparsity=None, pool=None,
                threshold_method="histogram"):
    """Keep exactly the global top-Q weights by |w| over the GSM pool; zero the rest.

    With a model compiled with `GlobalSparseMomentum` and no budget
    arguments, the optimizer's Q and pool are used (and its momentum for
    the zeroed entries is cleared). Otherwise pass `compression` or
    `target_sparsity` (and optionally `pool`, as in the optimizer). The
    result is plain zeros in the kernels: `tfs.summary(model)` shows it.
    Returns `model_or_vars`.

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(10)])
    >>> _ = final_prune(m, compression=4)
    >>> tfs.summary(m, print_fn=None).nonzeros
    25
    """
    variables = _variables_of(model_or_vars)
    if compression is None and target_sparsity is None and pool is None:
        gsm = find_gsm(getattr(model_or_vars, "optimizer", None))
        if gsm is not None and gsm.built:
            return gsm.final_prune(model_or_vars)
    _check_budget(compression, target_sparsity)
    predicate = _pool_predicate(pool)
    pool_vars = [v for v in variables if predicate(v)]
    n = sum(int(np.prod(v.shape)) for v in pool_vars)
    if n == 0:
        raise ValueError("`pool`: no variable of `model_or_vars` is in the pool (rank >= 2 by default).")
    q = _target_q(n, compression, target_sparsity)
    _check_q(q, n, compression, target_sparsity)
    for v, m in zip(pool_vars, _magnitude_masks(pool_vars, q, threshold_method)):
        v.assign(ops.where(m, v, ops.zeros_like(v)))
    return model_or_vars


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
        from tf_sparsity.callbacks import publish  # callbacks imports layers; keep optimizers light

        publish({f"gsm_active/{k}": v for k, v in gsm.active_fractions().items()}, logs, self._writer, epoch)

    def get_config(self):
        return {"every_n_steps": self.every_n_steps, "log_dir": self.log_dir}

    @classmethod
    def from_config(cls, config):
        # keras.callbacks.Callback has no from_config; deserialization needs one.
        return cls(**config)


__all__ = ["GlobalSparseMomentum", "GSMMonitor", "final_prune", "find_gsm", "default_pool", "display_name"]
