"""Pruning at initialization: SynFlow (Tanaka et al., NeurIPS 2020), SNIP, GraSP,
magnitude and random, with fixed masks (`tfs.layers.Masked`)."""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf  # gradients of scores (incl. GraSP's Hessian-gradient product)

from tf_sparsity import _compat
from tf_sparsity import ops as sparse_ops
from tf_sparsity import prunable, surgery
from tf_sparsity.budget import resolve_budget
from tf_sparsity.collapse import LayerCollapseWarning, check_on_collapse, report_collapse  # noqa: F401
from tf_sparsity.layers.masked import Masked
from tf_sparsity.pruning import connectivity, flow_network

METHODS = ("synflow", "snip", "grasp", "magnitude", "random")
DATA_METHODS = ("snip", "grasp")
GRASP_TEMPERATURE = 200.0  # the GraSP reference divides logits by T = 200
THRESHOLD_METHODS = ("partition", "histogram", "exact")  # the same masks; see `prune_at_init`


def _check_args(method, compression, sparsity, iterations, schedule, scope, data, loss, on_collapse,
                threshold_method="partition"):
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}; received {method!r}.")
    if threshold_method not in THRESHOLD_METHODS:
        raise ValueError(f"`threshold_method` must be one of {list(THRESHOLD_METHODS)}; "
                         f"received {threshold_method!r}.")
    density = resolve_budget(compression, sparsity).density
    if iterations is not None and (not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"`iterations` must be an integer >= 1; received {iterations!r}.")
    if schedule not in ("exponential", "linear"):
        raise ValueError(f"`schedule` must be 'exponential' or 'linear'; received {schedule!r}.")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"`scope` must be 'global' or 'layerwise'; received {scope!r}.")
    if method in DATA_METHODS:
        if data is None:
            raise ValueError(f"method '{method}' needs a batch of data: pass `data=(x, y)`.")
        if loss is None:
            raise ValueError(f"method '{method}' needs a `loss` (e.g. "
                             "keras.losses.SparseCategoricalCrossentropy(from_logits=True)).")
    check_on_collapse(on_collapse, training=False)
    return density


# Layers that keep the |theta| network positively homogeneous in each kernel
# (f(c * W) = c * f(W) given zero offsets); anything else runs in float64.
_HOMOGENEOUS_LAYERS = (
    "InputLayer", "Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D",
    "SeparableConv1D", "SeparableConv2D", "BatchNormalization", "ReLU", "MaxPooling1D", "MaxPooling2D",
    "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
    "GlobalMaxPooling3D", "Flatten", "Reshape", "Dropout", "ZeroPadding1D",
    "ZeroPadding2D", "Activation", "Identity",
)
_OFFSETS = ("bias", "beta", "moving_mean")  # must be zero for homogeneity


def _homogeneous(model):
    """True when every kernel of `model`'s |theta| network can be rescaled
    without changing the SynFlow ranking: whitelisted layers, ReLU/linear
    activations, zero biases / BN offsets."""
    for layer in prunable.iter_layers(model):
        if isinstance(layer, keras.Model):
            continue
        if type(layer).__name__ not in _HOMOGENEOUS_LAYERS:
            return False
        activation = getattr(layer, "activation", None)
        if activation is not None and getattr(activation, "__name__", "") not in ("relu", "linear"):
            return False
        if type(layer).__name__ == "ReLU":
            config = layer.get_config()
            if config.get("max_value") is not None or config.get("threshold", 0) != 0:
                return False
        for v in layer.weights:
            if v.name in _OFFSETS and np.any(v.numpy() != 0):
                return False
    return True


def _batches(data, batch_size=256):
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError("`data` must be a tuple `(x, y)` of arrays.")
    x, y = data
    n = len(y)
    if n == 0:
        raise ValueError("`data` is empty.")
    for start in range(0, n, batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


class _Pruner:
    """Holds a masked model and scores its kernels; one instance per `prune_at_init` call."""

    def __init__(self, masked, method, data, loss, seed, bn_mode="train"):
        if bn_mode not in ("train", "eval"):
            raise ValueError(f"`bn_mode` must be 'train' or 'eval'; received {bn_mode!r}.")
        self.training = bn_mode == "train"  # SNIP/GraSP: normalization mode while scoring
        self.model = masked
        self.method = method
        self.wrappers = surgery.wrappers(masked)
        self.kernels = [k for w in self.wrappers for k in w.kernels]
        self._mask_vars = [m for w in self.wrappers for m in w.masks]
        self._rounds = None  # NumPy state of the pruning rounds (`_start`)
        self.owner = [w.layer.name for w in self.wrappers for _ in w.kernels]
        self.kernel_keys = [(w.layer.name, i) for w in self.wrappers for i in range(len(w.kernels))]
        self.data, self.seed = data, seed
        self.loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        self._rng = np.random.default_rng(seed)
        if method == "synflow":
            self._build_synflow()

    @property
    def masks(self):
        """The wrappers' mask variables, brought up to date with the rounds."""
        self._sync_masks()
        return self._mask_vars

    # -- scores: one array per kernel; larger means keep -------------------
    def scores(self, fast=False):
        if self.method == "synflow":
            return self._synflow(fast)
        return getattr(self, f"_{self.method}")()

    def _magnitude(self):
        return [tf.abs(k * m) for k, m in zip(self.kernels, self.masks)]

    def _random(self):
        return [tf.constant(self._rng.random(k.shape), tf.float32) for k in self.kernels]

    def _data_gradients(self, fn):
        # Normalization layers run in training mode (the reviewers caught the
        # reference scoring SNIP/GraSP in eval mode); their moving statistics
        # are restored afterwards, so scoring leaves the model unchanged.
        saved = [v.numpy() for v in self.model.non_trainable_variables]
        try:
            return fn()
        finally:
            for v, value in zip(self.model.non_trainable_variables, saved):
                v.assign(value)

    def _loss(self, x, y, temperature=1.0):
        if temperature != 1.0 and flow_network.softmax_heads(self.model):
            # Softmax head (keras.applications): the temperature divides the
            # logits, and the loss sees softmax(logits / T).
            with flow_network.logits_of(self.model):
                logits = self.model(x, training=self.training)
            return self.loss(y, tf.nn.softmax(logits / temperature))
        return self.loss(y, self.model(x, training=self.training) / temperature)

    def _snip(self):
        def run():
            total = [tf.zeros_like(k) for k in self.kernels]
            for x, y in _batches(self.data):
                with tf.GradientTape() as tape:
                    loss = self._loss(x, y)
                grads = tape.gradient(loss, self.kernels)
                total = [t + g for t, g in zip(total, grads)]
            return [tf.abs(g * k * m) for g, k, m in zip(total, self.kernels, self.masks)]
        return self._data_gradients(run)

    def _grasp(self):
        def run():
            g0 = [tf.zeros_like(k) for k in self.kernels]
            for x, y in _batches(self.data):
                with tf.GradientTape() as tape:
                    loss = self._loss(x, y, GRASP_TEMPERATURE)
                g0 = [a + b for a, b in zip(g0, tape.gradient(loss, self.kernels))]
            hg = [tf.zeros_like(k) for k in self.kernels]
            for x, y in _batches(self.data):
                with tf.GradientTape() as outer:
                    with tf.GradientTape() as inner:
                        loss = self._loss(x, y, GRASP_TEMPERATURE)
                    grads = inner.gradient(loss, self.kernels)
                    z = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(a)) for g, a in zip(grads, g0)])
                hg = [a + (b if b is not None else 0.0) for a, b in zip(hg, outer.gradient(z, self.kernels))]
            # Keep the largest theta * Hg (GraSP removes the largest -theta * Hg).
            return [h * k * m for h, k, m in zip(hg, self.kernels, self.masks)]
        return self._data_gradients(run)

    def _build_synflow(self):
        # A copy of the network with |theta| everywhere, normalization in
        # inference mode. Path products overflow float32 in deep nets, so the
        # reference scores are float64. When the |theta| network is positively
        # homogeneous in every kernel (no additive offsets, only ReLU-like
        # nonlinearities -- e.g. any such net at Keras' zero-bias init),
        # rescaling one kernel by c multiplies R and *every* score by c: the
        # pruning rounds then run in float32 with each kernel normalized to
        # unit mean fan-in sum, the same ranking at ~3x the speed.
        plain = surgery.strip(self.model)
        self._synflow_fns = {}
        self._plain = plain
        # Issue 18: the linearized flow network with exact power-of-two
        # rescaling (any architecture it supports runs in float32).
        self._flow = flow_network.flow_network_or_none(plain, self.kernel_keys)
        if self._flow is None:  # generic path on a linearized copy
            plain = flow_network.linearized(plain)
        self._synflow_plain = plain
        self.synflow_fast = self._flow is not None or _homogeneous(plain)

    def _synflow_fn(self, dtype):
        if dtype in self._synflow_fns:
            return self._synflow_fns[dtype]

        def with_dtype(layer):
            if isinstance(layer, keras.layers.InputLayer):
                return None
            config = layer.get_config()
            config["dtype"] = dtype
            return layer.__class__.from_config(config)

        abs_model = surgery.map_layers(self._synflow_plain, with_dtype)
        for v in abs_model.weights:
            v.assign(tf.abs(v))
        layers = [l for l in prunable.iter_layers(abs_model) if prunable.is_prunable(l)]
        names = {w.layer.name for w in self.wrappers}
        kernels = [k for l in layers if l.name in names for k in prunable.prunable_kernels(l)]
        bases = [tf.constant(np.abs(k.numpy()), dtype) for k in self.kernels]
        ones = [tf.ones([1, *t.shape[1:]], dtype) for t in abs_model.inputs]
        rescale = dtype != "float64"

        @tf.function(reduce_retracing=True)
        def score(masks):
            for var, base, mask in zip(kernels, bases, masks):
                w = base * tf.cast(mask, dtype)
                if rescale:  # unit mean fan-in sum per output unit
                    total = tf.reduce_sum(w)
                    w = w * tf.where(total > 0, w.shape[-1] / total, tf.ones_like(total))
                var.assign(w)
            with tf.GradientTape() as tape:
                out = abs_model(ones if len(ones) > 1 else ones[0], training=False)
                total = tf.add_n([tf.reduce_sum(o) for o in tf.nest.flatten(out)])
            grads = tape.gradient(total, kernels)
            return total, [tf.abs(g * v) for g, v in zip(grads, kernels)]

        self._synflow_fns[dtype] = score
        self._abs_model = abs_model
        return score

    def _synflow(self, fast=False):
        if self._flow is not None:
            return flow_network.round_scores(self._flow, self.masks, fast)
        dtype = "float32" if fast and self.synflow_fast else "float64"
        _, scores = self._synflow_fn(dtype)(list(self.masks))
        return scores

    # -- the pruning loop ---------------------------------------------------
    # The rounds keep their state in NumPy: per kernel a flat 0/1 mask, the
    # sorted flat indices of its alive entries and (SynFlow's flow network)
    # the float32 kernel |theta| * mask, each updated in place at the pruned
    # entries only. Only alive entries compete (masks only shrink), compacted
    # in flat order, so position tie-breaks are those of a top-k over the
    # whole mask; after the first rounds of an exponential schedule they are
    # a few percent of the weights. The mask variables are written when
    # read (`masks`), not every round.
    def reset(self):
        for m in self._mask_vars:
            m.assign(tf.ones_like(m))
        self._rounds = None

    def _start(self):
        flat = [m.numpy().reshape(-1).astype(np.float32) for m in self._mask_vars]
        state = {"masks": flat, "alive": [np.flatnonzero(f > 0) for f in flat], "dirty": set(), "ws": None}
        if self.method == "synflow" and self._flow is not None:
            shapes = [tuple(m.shape) for m in self._mask_vars]
            state["ws"] = [w.reshape(-1) for w in self._flow.weights([f.reshape(s) for f, s in zip(flat, shapes)])]
        self._rounds = state

    def _sync_masks(self):
        if self._rounds is None:
            return
        for i in sorted(self._rounds["dirty"]):
            var = self._mask_vars[i]
            var.assign(self._rounds["masks"][i].reshape(var.shape))
        self._rounds["dirty"].clear()

    def _mask_arrays(self):
        if self._rounds is None:
            return [m.numpy() for m in self._mask_vars]
        return [f.reshape(v.shape) for f, v in zip(self._rounds["masks"], self._mask_vars)]

    def _alive_scores(self, keep):
        state = self._rounds
        if state["ws"] is not None:
            shaped = [w.reshape(v.shape) for w, v in zip(state["ws"], self._mask_vars)]
            return flow_network.alive_scores(self._flow, shaped, self._mask_arrays(), state["alive"], keep)
        self._sync_masks()  # SNIP / GraSP run the masked model itself
        compact = []
        for s, idx in zip(self.scores(fast=True), state["alive"]):
            s = np.asarray(s).reshape(-1)
            compact.append(s if idx.size == s.size else s[idx])
        return compact

    @staticmethod
    def _select(compact, keep, scope, threshold_method):
        """Boolean keep-masks over the compacted scores (exactly `keep` entries)."""
        if threshold_method == "partition":
            if scope != "global":
                return [sparse_ops.topk_mask_numpy(c, k) for c, k in zip(compact, keep)]
            kept = sparse_ops.topk_mask_numpy(np.concatenate(compact), keep[0])
            return np.split(kept, np.cumsum([c.size for c in compact])[:-1])
        tensors = [tf.constant(c) for c in compact]
        if scope == "global":
            kept = sparse_ops.global_topk_masks(tensors, keep[0], method=threshold_method)
        else:
            kept = [sparse_ops.topk_mask(c, min(k, int(c.shape[0])), method=threshold_method)
                    for c, k in zip(tensors, keep)]
        return [np.asarray(m) for m in kept]

    def step(self, density, scope="global", threshold_method="partition"):
        """One round: score, then keep `density` of the weights (masks only shrink)."""
        if threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"`threshold_method` must be one of {list(THRESHOLD_METHODS)}; "
                             f"received {threshold_method!r}.")
        if self._rounds is None:
            self._start()
        state = self._rounds
        sizes = [f.size for f in state["masks"]]
        keep = [int(round(density * sum(sizes)))] if scope == "global" else [int(round(density * n)) for n in sizes]
        compact = self._alive_scores((scope, keep))  # SynFlow's float32 rounds decide when float64 is needed
        for i, kept in enumerate(self._select(compact, keep, scope, threshold_method)):
            if kept.all():
                continue
            idx = state["alive"][i]
            dropped = idx[~kept]
            state["masks"][i][dropped] = 0.0
            if state["ws"] is not None:
                state["ws"][i][dropped] = 0.0
            state["alive"][i] = idx[kept]
            state["dirty"].add(i)

    def prune(self, density, iterations, schedule, scope, threshold_method, verbose):
        bar = keras.utils.Progbar(iterations, verbose=verbose, unit_name="round")
        # The flow network's graph is large and runs only here (its gradient
        # function is instantiated on the first round).
        with _compat.without_graph_optimizer() if self.method == "synflow" else contextlib.nullcontext():
            for k in range(1, iterations + 1):
                d = density ** (k / iterations) if schedule == "exponential" else 1 - (1 - density) * k / iterations
                self.step(d, scope, threshold_method)
                bar.update(k, values=[("density", d)])
        return self.collapsed()

    def connectivity(self):
        """`tfs.pruning.connectivity.ConnectivityReport` of the current masks."""
        if getattr(self, "_checker", None) is None:
            plain = getattr(self, "_plain", None) or surgery.strip(self.model)
            self._checker = connectivity.Checker(plain, self.kernel_keys)
        return self._checker.check(self._mask_arrays())

    def collapsed(self):
        alive = {}
        for name, m in zip(self.owner, self._mask_arrays()):
            alive[name] = alive.get(name, 0) + int(np.count_nonzero(m))
        return [name for name, count in alive.items() if count == 0]


def prune_at_init(model, method="synflow", compression=None, sparsity=None, iterations=None,
                  schedule="exponential", scope="global", data=None, loss=None, skip=None,
                  on_collapse="warn", threshold_method="partition", seed=0, verbose=1, bn_mode="train"):
    """Prune `model` before training; returns a new model with fixed masks.

    Prunable kernels are wrapped in `tfs.layers.Masked`; scores decide which
    weights survive, keeping `1 / compression` of them (exactly, within
    rounding). Methods:

    - "synflow": `|theta * dR/dtheta|` with `R = sum(f_|theta|(1))` -- the
      *linearized* network with all parameters made positive (every
      activation the identity, softmax heads dropped: R is a sum of
      logits), on an all-ones input, normalization layers in inference
      mode. No data. Iterative: 100 rounds by default, density
      `rho ** (k / n)`. Rounds run in float32 with exact power-of-two
      rescaling of every tensor (`tfs.pruning.flow_network`), in float64
      when float32 could rank differently; models with layers outside its
      set run a generic float64 path (float32 when positively homogeneous).
    - "snip": `|w * dL/dw|` on `data` (normalization in training mode).
    - "grasp": `w * (H g)` (keeps the largest) on `data`, logits / 200.
    - "magnitude": `|w|`; "random": uniform scores (seeded). Both data-free.

    Args:
        model: built Sequential / functional Keras model (not modified).
        method: one of "synflow", "snip", "grasp", "magnitude", "random".
        compression: keep 1/compression of the prunable weights (> 1), or
        sparsity: fraction to prune, in (0, 1).
        iterations: rounds (default 100 for SynFlow, 1 otherwise).
        schedule: density schedule over rounds, "exponential" or "linear".
        scope: "global" (one threshold over all layers) or "layerwise".
        data, loss: `(x, y)` and a Keras loss, for SNIP and GraSP.
        skip: layer names / classes / predicate to leave dense.
        on_collapse: "warn" (default), "raise" or "ignore" on layer
            collapse: the output no longer depends on the input through the
            alive weights (`tfs.pruning.connectivity`). Emptied residual
            branches / gates of a connected network give an
            `EmptiedBranchWarning` instead (not raised).
        threshold_method: how each round finds the top-k of the alive
            scores; all three give the same masks (exactly `k` kept, ties to
            the earlier flat index): "partition" (default: NumPy
            introselect, `tfs.ops.topk_mask_numpy`), "histogram"
            (`tfs.ops.topk_mask`) or "exact" (TensorFlow `top_k`).
        verbose: 1 shows a progress bar over rounds, 0 is silent.
        bn_mode: SNIP/GraSP only: "train" (default, as the SNIP and GraSP
            papers) scores with normalization layers in training mode (batch
            statistics; moving statistics restored afterwards), "eval" with
            their moving statistics (as the SynFlow paper's code did).

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> model = tfs.zoo.mnist1d_cnn()
    >>> sparse = tfs.prune_at_init(model, "synflow", compression=10, iterations=10, verbose=0)
    >>> round(tfs.sparsity(sparse), 3)
    0.9
    """
    density = _check_args(method, compression, sparsity, iterations, schedule, scope, data, loss, on_collapse,
                          threshold_method)
    if iterations is None:
        iterations = 100 if method == "synflow" else 1
    masked = surgery.wrap_prunable(model, Masked, skip=skip)
    pruner = _Pruner(masked, method, data, loss, seed, bn_mode)
    pruner.prune(density, iterations, schedule, scope, threshold_method, verbose)
    collapsed = connectivity.collapse_names(pruner.connectivity(), method, 1 / density, on_collapse)
    masks = iter(pruner._mask_arrays())
    for wrapper in pruner.wrappers:
        wrapper.set_masks([next(masks) for _ in wrapper.masks], zero_weights=True)
    if collapsed:
        report_collapse(f"Layer collapse: {method} at compression {1 / density:.3g} pruned every weight "
                        f"of {collapsed}; the network cannot pass signal. Lower the compression "
                        f"(see tfs.pruning.critical_compression).", on_collapse)
    return masked


def scores(model, method="synflow", data=None, loss=None, skip=None, seed=0, bn_mode="train"):
    """One round of `method`'s scores for every prunable kernel, as NumPy arrays.

    Returns `{layer name: [score array per kernel]}` (larger means keep).

    >>> s = tfs.pruning.scores(tfs.zoo.mnist1d_cnn(), "synflow")  # doctest: +SKIP
    >>> sorted(s)  # doctest: +SKIP
    ['conv1', 'conv2', 'conv3', 'fc1', 'logits']
    """
    _check_args(method, 10.0, None, None, "exponential", "global", data, loss, "ignore")
    pruner = _Pruner(surgery.wrap_prunable(model, Masked, skip=skip), method, data, loss, seed, bn_mode)
    out = {}
    for name, value in zip(pruner.owner, pruner.scores()):
        out.setdefault(name, []).append(np.asarray(value))
    return out


def critical_compression(model, method="synflow", tolerance=0.05, max_log10=None, iterations=None,
                         verbose=0, collapse="connectivity", **kwargs):
    """Largest log10 compression at which `method` does not collapse the network.

    Bisection on log10(compression) between 0 and `max_log10` (default:
    log10 of the number of prunable weights), to within `tolerance`. Other
    arguments go to the scorer as in `prune_at_init`.

    Args:
        collapse: "connectivity" (default): collapsed when the output no
            longer depends on the input through the alive weights
            (`tfs.pruning.connectivity`; emptied residual branches are not
            collapse); "layer": when any prunable layer has no weight left
            (the SynFlow paper's definition, for its VGG figures).

    >>> tfs.pruning.critical_compression(tfs.zoo.mnist1d_cnn(), "magnitude")  # doctest: +SKIP
    2.9
    """
    if not tolerance > 0:
        raise ValueError(f"`tolerance` must be > 0; received {tolerance!r}.")
    if collapse not in ("connectivity", "layer"):
        raise ValueError(f"`collapse` must be 'connectivity' or 'layer'; received {collapse!r}.")
    _check_args(method, 10.0, None, iterations, "exponential", "global", kwargs.get("data"),
                kwargs.get("loss"), "ignore")
    masked = surgery.wrap_prunable(model, Masked, skip=kwargs.pop("skip", None))
    pruner = _Pruner(masked, method, kwargs.pop("data", None), kwargs.pop("loss", None), kwargs.pop("seed", 0),
                     kwargs.pop("bn_mode", "train"))
    total = sum(int(np.prod(k.shape)) for k in pruner.kernels)
    iterations = iterations or (100 if method == "synflow" else 1)
    lo, hi = 0.0, max_log10 if max_log10 is not None else math.log10(total)
    threshold_method = kwargs.pop("threshold_method", "partition")
    if kwargs:
        raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        pruner.reset()
        layer_collapse = pruner.prune(10.0 ** -mid, iterations, "exponential", "global", threshold_method, verbose)
        if pruner.connectivity().collapsed if collapse == "connectivity" else layer_collapse:
            hi = mid
        else:
            lo = mid
    return lo
