"""`fit` for any `tf.distribute` strategy, including several worker machines.

Keras 3's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
inside Keras itself, even for a plain `Dense` model (keras-team/keras#20585).
`tfs.distribute.fit` is a thin loop over `strategy.run(model.train_step)`:
the model's own `train_step` (compiled loss, `model.losses`, metrics and
`optimizer.apply_gradients`, which all-reduces the gradients) runs on every
replica, the callbacks get the standard hooks, and the chief can checkpoint
the whole training state so that a killed job resumes on the same trajectory.
See docs/distributed.md.
"""

import io
import json
import os

import keras
import numpy as np
import tensorflow as tf  # tf.distribute and tf.data: this module is TensorFlow-only

from tf_sparsity import _compat




# `model.fit` arguments this loop does not implement: each raises instead of
# silently differing from `fit`.
_UNSUPPORTED = {
    "x": "pass a batched `tf.data.Dataset` (or a callable `epoch -> Dataset`) as `dataset`",
    "y": "put the targets in the dataset: `tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)`",
    "batch_size": "batch the dataset with the *global* batch size before passing it",
    "shuffle": "shuffle inside the dataset (for exact resumption: a callable `epoch -> Dataset` with a per-epoch seed)",
    "sample_weight": "yield `(x, y, sample_weight)` from the dataset",
    "class_weight": "weight the examples in the dataset (`(x, y, sample_weight)`); class weights are not applied",
    "validation_split": "validation is not run; call `model.evaluate` after training",
    "validation_data": "validation is not run; call `model.evaluate` after training",
    "validation_steps": "validation is not run",
    "validation_batch_size": "validation is not run",
    "validation_freq": "validation is not run",
}


def _check_unsupported(kwargs):
    for name in kwargs:
        if name in _UNSUPPORTED:
            raise ValueError(f"tfs.distribute.fit does not support `{name}`: {_UNSUPPORTED[name]}.")
        raise TypeError(f"tfs.distribute.fit got an unexpected keyword argument `{name}`.")


# ------------------------------------------------------------------ workers
def worker_info(strategy=None):
    """`(task_type, task_id, is_chief, num_workers)` of this process under `strategy`.

    Outside multi-worker strategies this is `(None, 0, True, 1)`. The chief is
    the task of type "chief", or worker 0 when the cluster has no chief.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type is None:
        return None, 0, True, 1
    task_id = int(resolver.task_id or 0)
    cluster = resolver.cluster_spec().as_dict()
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if "chief" in cluster:
        chief = task_type == "chief"
    else:
        chief = task_type == "worker" and task_id == 0
    return task_type, task_id, chief, max(workers, 1)


def is_chief(strategy=None):
    """Whether this process is the one that writes files (see `worker_info`)."""
    return worker_info(strategy)[2]


_HOOKS = (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
    "on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end",
    "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end",
    "on_predict_begin", "on_predict_end", "on_predict_batch_begin", "on_predict_batch_end",
)


class ChiefOnly(keras.callbacks.Callback):
    """Runs `callback` on the chief only; on other workers its hooks are not called.

    Use it for your own callbacks that write files or print. Never wrap a
    callback that changes variables or sets `model.stop_training`: those must
    run on every worker (`tfs.distribute.fit` runs all others everywhere).
    Keras' `ModelCheckpoint`, `CSVLogger` and `TensorBoard` are wrapped
    automatically.
    """

    def __init__(self, callback, strategy=None):
        super().__init__()
        self.callback = callback
        self.strategy = strategy
        self._chief = None

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def _forward(self, hook, *args, **kwargs):
        if self._chief is None:
            self._chief = is_chief(self.strategy)
        if self._chief:
            getattr(self.callback, hook)(*args, **kwargs)


def _make_hook(name):
    def hook(self, *args, **kwargs):
        self._forward(name, *args, **kwargs)

    hook.__name__ = name
    return hook


for _hook in _HOOKS:
    setattr(ChiefOnly, _hook, _make_hook(_hook))
del _hook


def chief_only(callback, strategy=None):
    """Wrap `callback` so that only the chief calls it (see `ChiefOnly`)."""
    return ChiefOnly(callback, strategy)


_FILE_WRITERS = (keras.callbacks.ModelCheckpoint, keras.callbacks.CSVLogger, keras.callbacks.TensorBoard)


def _prepare_callbacks(callbacks, strategy, chief):
    """User callbacks as run on this worker, plus `restore()` for temporary changes."""
    prepared, undo = [], []
    for cb in callbacks or []:
        if isinstance(cb, keras.callbacks.BackupAndRestore):
            raise ValueError(
                "tfs.distribute.fit does not support `keras.callbacks.BackupAndRestore` (it resumes "
                "only at epoch boundaries and every worker would write the same files); pass "
                "`backup_dir=` (and `save_freq=`) to tfs.distribute.fit instead."
            )
        if isinstance(cb, keras.callbacks.ProgbarLogger) and not chief:
            continue
        if isinstance(cb, _FILE_WRITERS):
            cb = ChiefOnly(cb, strategy)
        elif not chief and type(cb).__module__.startswith("tf_sparsity") and getattr(cb, "log_dir", None):
            # The package's monitors must run everywhere (they may stop
            # training on layer collapse) but only the chief writes TensorBoard.
            undo.append((cb, cb.log_dir))
            cb.log_dir = None
        prepared.append(cb)

    def restore():
        for cb, log_dir in undo:
            cb.log_dir = log_dir

    return prepared, restore


# --------------------------------------------------------------- checkpoint
_CKPT = "tfs_backup.npz"


def _state_variables(model):
    """Everything a resumed job needs: model weights and optimizer variables, by stable key."""
    # Keyed by position, not by path: paths carry process-dependent suffixes
    # (`sgd_3/...`); shapes are checked on restore.
    # `model.variables` = weights + seed-generator states (dropout RNG) + metric
    # variables; metrics (sync-on-read, reset every epoch) are left out.
    model_vars = [v for v in model.variables if getattr(v, "synchronization", None) != "on_read"]
    state = {}
    for prefix, variables in (("model", model_vars), ("optimizer", model.optimizer.variables)):
        for i, v in enumerate(variables):
            state[f"{prefix}/{i:05d}"] = v
    return state


def _save_backup(backup_dir, model, epoch, step_in_epoch):
    """Chief only: write all state atomically (write a temporary file, then rename)."""
    arrays = {key: keras.ops.convert_to_numpy(v) for key, v in _state_variables(model).items()}
    meta = {"epoch": int(epoch), "step_in_epoch": int(step_in_epoch),
            "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}
    arrays["__meta__"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tf.io.gfile.makedirs(backup_dir)
    path = os.path.join(backup_dir, _CKPT)
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _load_backup(backup_dir, model):
    """Restore the state saved by `_save_backup`; returns its metadata or None."""
    path = os.path.join(backup_dir, _CKPT)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    state = _state_variables(model)
    mismatched = sorted(set(state) ^ set(arrays)) or [
        f"{state[k].path}: {tuple(arrays[k].shape)} saved, {tuple(state[k].shape)} now"
        for k in state if tuple(arrays[k].shape) != tuple(state[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"`backup_dir`: the backup in {backup_dir} was written by a different model or optimizer "
            f"(variables differ, e.g. {mismatched[:3]}). Delete it or use another `backup_dir`."
        )
    for key, v in state.items():
        v.assign(arrays[key])
    return meta


# --------------------------------------------------------------------- data
def _cardinality(dataset):
    n = int(dataset.cardinality())
    return n  # -1 infinite, -2 unknown


def _epoch_dataset(dataset, epoch):
    ds = dataset(epoch) if callable(dataset) and not isinstance(dataset, tf.data.Dataset) else dataset
    if not isinstance(ds, tf.data.Dataset):
        raise ValueError(
            "`dataset` must be a batched `tf.data.Dataset` or a callable `epoch -> tf.data.Dataset`; "
            f"received {type(ds).__name__}. For arrays: "
            "`tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch_size)`."
        )
    return ds


# ---------------------------------------------------------------------- fit
def fit(model, dataset, epochs=1, callbacks=None, strategy=None, verbose=1, initial_epoch=0,
        steps_per_epoch=None, backup_dir=None, save_freq="epoch", delete_checkpoint=True,
        **kwargs):
    """Train a compiled Keras model on any `tf.distribute` strategy, like `model.fit`.

    Works under the default strategy, `MirroredStrategy` and
    `MultiWorkerMirroredStrategy` (where Keras 3's own `fit` fails,
    keras-team/keras#20585). Each step runs the model's own `train_step`
    in `strategy.run`: the compiled loss (scaled per replica as Keras does),
    `model.losses` (STR's coupled L2), the compiled metrics and
    `optimizer.apply_gradients`, which all-reduces the gradients, so
    `GlobalSparseMomentum` takes its top-Q once on the global-batch gradient.
    Under the default strategy the result equals `model.fit` on the same
    dataset.

    Callbacks get `on_train_begin`, `on_epoch_begin`, `on_train_batch_begin`,
    `on_train_batch_end`, `on_epoch_end` and `on_train_end` with the same logs
    as `fit` (a `History` is added and returned; a `keras.utils.Progbar` is
    shown on the chief unless `verbose=0`). They run on *every* worker, so
    callbacks that change variables (`TargetSparsity` moves threshold
    offsets) do so identically everywhere; `model.stop_training` set on any
    worker stops all of them after that batch. Only the chief writes files:
    Keras' `ModelCheckpoint`, `CSVLogger` and `TensorBoard` run on the chief
    only, the package's monitors log to TensorBoard only there, and
    `chief_only(cb)` does the same for your own callbacks.

    Checkpoint and resume: with `backup_dir`, the chief saves the model
    variables (weights, STR threshold offsets, BN statistics), every optimizer
    variable (step counter, momentum, GSM's active counts, loss scale) and
    the position in the data, every `save_freq` steps or at each epoch end.
    A restarted job (all workers, with the same arguments) restores it and
    continues the same trajectory, mid-epoch included: the batches already
    trained in the current epoch are skipped on the same iterator, and the
    iterators earlier epochs opened are opened again, so a dataset shuffled
    with fixed seeds (`shuffle(n, seed=...)` after the same global seed)
    reshuffles as in the uninterrupted run (unseeded shuffling cannot be
    replayed). Keras' seed generators (dropout's RNG) are saved too. A callable
    `epoch -> Dataset` is rebuilt per epoch. `backup_dir` must be readable by
    every worker. `TargetSparsity` recomputes the offset at the resumed step:
    choose `save_freq` as a multiple of its `update_every` for an identical
    trajectory.

    Not covered (each raises a ValueError naming the argument): array
    inputs (`x`, `y`, `batch_size`, `shuffle`, `sample_weight`),
    `class_weight`, validation (`validation_data`, `validation_split`, ...),
    Keras' `BackupAndRestore` (use `backup_dir`), `steps_per_execution` > 1.
    Also: the dataset must have a known number of batches (or be
    infinite with `steps_per_epoch`), and for results equal to one process
    on the global batch every batch must split evenly over the replicas
    (Keras, like this loop, averages per replica).

    Args:
        model: a compiled Keras model, built and compiled under
            `strategy.scope()`.
        dataset: a `tf.data.Dataset` batched with the *global* batch size
            (one epoch = one pass), or a callable `epoch -> Dataset`. Under
            `MultiWorkerMirroredStrategy` every worker passes the same
            dataset; `tf.distribute` shards it.
        epochs: index of the last epoch, as in `fit`.
        callbacks: list of Keras callbacks.
        strategy: default: the strategy the model was created under
            (`model.distribute_strategy`).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch (chief only).
        initial_epoch: epoch to start from (a restored backup overrides it).
        steps_per_epoch: only with an infinite (repeated) dataset: steps per
            epoch; one iterator then runs through all epochs.
        backup_dir: directory for the resumable backup (chief writes it).
        save_freq: "epoch" or a number of steps between backups.
        delete_checkpoint: delete the backup when training completes, as
            `keras.callbacks.BackupAndRestore` does; False keeps it (a rerun
            of a finished job then restores and trains no further).

    Returns:
        The `History` callback, as `model.fit` does.

    Example (default strategy; for several workers set `TF_CONFIG` and create
    `tf.distribute.MultiWorkerMirroredStrategy()` first, see
    docs/distributed.md):

    >>> import keras, numpy as np, tensorflow as tf, tf_sparsity as tfs
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"])
    >>> x, y = np.random.rand(64, 8).astype("float32"), np.random.rand(64, 4).astype("float32")
    >>> data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    >>> history = tfs.distribute.fit(model, data, epochs=2, verbose=0)
    >>> sorted(history.history), len(history.history["loss"])
    (['loss', 'mae'], 2)
    >>> int(model.optimizer.iterations)
    8
    """
    _check_unsupported(kwargs)
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ValueError("`model` must be compiled (with an optimizer) before tfs.distribute.fit.")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"`epochs` must be an integer >= 0; received {epochs!r}.")
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"`verbose` must be 0, 1, 2 or 'auto'; received {verbose!r}.")
    if verbose == "auto":
        verbose = 1
    if save_freq != "epoch" and (not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1):
        raise ValueError(f"`save_freq` must be 'epoch' or an integer >= 1; received {save_freq!r}.")
    if getattr(model, "steps_per_execution", 1) != 1:
        raise ValueError(
            "tfs.distribute.fit does not support `steps_per_execution` > 1 (compile argument); "
            "compile with steps_per_execution=1."
        )
    strategy = strategy or model.distribute_strategy
    if not _created_in(strategy, model):
        raise ValueError(
            "`strategy`: the model's variables were not created under this strategy. Build and "
            "compile the model inside `with strategy.scope():`."
        )
    _, _, chief, num_workers = worker_info(strategy)

    first = _epoch_dataset(dataset, 0)
    cardinality = _cardinality(first)
    if steps_per_epoch is not None:
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be an integer >= 1; received {steps_per_epoch!r}.")
        per_epoch_callable = callable(dataset) and not isinstance(dataset, tf.data.Dataset)
        if cardinality != tf.data.INFINITE_CARDINALITY or per_epoch_callable:
            raise ValueError(
                "`steps_per_epoch` is only supported with one infinite dataset (`dataset.repeat()`): "
                "otherwise an epoch is one pass over the dataset."
            )
        steps = steps_per_epoch
    elif cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError("`steps_per_epoch`: the dataset is infinite; pass `steps_per_epoch`.")
    elif cardinality == tf.data.UNKNOWN_CARDINALITY:
        raise ValueError(
            "`dataset`: its number of batches is unknown (e.g. after `filter`); declare it with "
            "`dataset.apply(tf.data.experimental.assert_cardinality(n))`."
        )
    elif cardinality == 0:
        raise ValueError("`dataset` is empty.")
    else:
        steps = cardinality

    with strategy.scope():
        # Shapes only (no batch is read, so a reshuffling dataset keeps its order).
        _compat.symbolic_build(model, _zeros_like_spec(first.element_spec))
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

    start_epoch, start_step = initial_epoch, 0
    if backup_dir is not None:
        meta = _load_backup(backup_dir, model)
        if meta is not None:
            start_epoch, start_step = meta["epoch"], meta["step_in_epoch"]

    user_callbacks, restore_callbacks = _prepare_callbacks(callbacks, strategy, chief)
    callback_list = keras.callbacks.CallbackList(
        user_callbacks, add_history=True, add_progbar=verbose != 0 and chief,
        model=model, verbose=verbose if chief else 0, epochs=epochs, steps=steps,
    )
    train_function = _make_train_function(model, strategy)
    any_stop = _make_stop_sync(strategy) if num_workers > 1 else None

    def stop_requested():
        flag = bool(model.stop_training)
        if any_stop is not None:
            flag = any_stop(flag)
        model.stop_training = flag
        return flag

    def backup(epoch, step_in_epoch):
        if backup_dir is not None and chief:
            _save_backup(backup_dir, model, epoch, step_in_epoch)

    distribute = strategy.experimental_distribute_dataset
    per_epoch = callable(dataset) and not isinstance(dataset, tf.data.Dataset)
    stream = whole = None
    if steps_per_epoch is not None:  # one iterator through all epochs
        stream = iter(distribute(first))
        _advance(stream, start_epoch * steps + start_step)
    elif not per_epoch:
        whole = distribute(first)  # distributed once, iterated once per epoch (as `fit`)

    # Count steps in Python: reading `optimizer.iterations` would sync every step.
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    iterators_opened = 0
    model.stop_training = False
    training_logs = None
    logs = {}
    try:
        callback_list.on_train_begin()
        for epoch in range(start_epoch, epochs):
            model.reset_metrics()
            skip = start_step if epoch == start_epoch else 0
            if stream is not None:
                iterator = stream
            else:
                ds = first if epoch == 0 else _epoch_dataset(dataset, epoch)
                if whole is not None:
                    # Keras' fit opens two iterators per epoch (one at the end
                    # of the epoch, one at the start of the next) and trains on
                    # the second: a reshuffling dataset then shows epoch e the
                    # order of its (2e+1)-th iteration. Do the same, so results
                    # equal `fit`'s; after a restart open the iterators the
                    # earlier epochs opened, so the order is the same as well.
                    for _ in range(2 * epoch - iterators_opened):
                        iter(whole)
                    iterators_opened = 2 * epoch + 1
                iterator = iter(whole if whole is not None else distribute(ds))
                _advance(iterator, skip)
            callback_list.on_epoch_begin(epoch)
            stopped = False
            for step in range(skip, steps):
                callback_list.on_train_batch_begin(step)
                logs = train_function(iterator)
                callback_list.on_train_batch_end(step, logs)
                iterations += 1
                stopped = stop_requested()
                if stopped:
                    break
                # A backup that completes the epoch waits for on_epoch_end.
                if save_freq != "epoch" and step + 1 < steps and iterations % save_freq == 0:
                    backup(epoch, step + 1)
            epoch_logs = dict(_metrics_or_logs(model, logs))
            callback_list.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            stopped = stop_requested() or stopped
            if stopped:
                break
            if save_freq == "epoch" or iterations % save_freq == 0 or epoch + 1 == epochs:
                backup(epoch + 1, 0)
        if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
            model.optimizer.finalize_variable_values(model.trainable_weights)
        callback_list.on_train_end(logs=training_logs)
    finally:
        restore_callbacks()
    if backup_dir is not None and chief and delete_checkpoint:
        if tf.io.gfile.exists(backup_dir):
            tf.io.gfile.rmtree(backup_dir)
    return model.history


def _advance(iterator, n):
    """Skip the `n` batches a restored job already trained on (same iterator, same order)."""
    for _ in range(n):
        next(iterator)


def _created_in(strategy, model):
    if not model.weights:
        return True
    v = model.weights[0]
    return strategy.extended.variable_created_in_scope(getattr(v, "value", v))


def _zeros_like_spec(spec):
    """A batch of zeros with `spec`'s structure (unknown dimensions as 1)."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), spec
    )


def _make_train_function(model, strategy):
    """One step: `strategy.run(model.train_step)` on the next batch, logs averaged over replicas.

    As in Keras' `fit`: the logs are the replicas' metric results averaged
    (reduction "mean"), and the function is a `tf.function` unless the model
    was compiled with `run_eagerly=True`.
    """

    def one_step(iterator):
        outputs = strategy.run(model.train_step, args=(next(iterator),))
        return tf.nest.map_structure(lambda v: _mean_over_replicas(strategy, v), outputs)

    if model.run_eagerly:
        return one_step
    return tf.function(one_step, reduce_retracing=True, jit_compile=bool(model.jit_compile))


def _mean_over_replicas(strategy, value):
    if strategy.num_replicas_in_sync == 1 and not isinstance(value, tf.distribute.DistributedValues):
        return value
    return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)


def _make_stop_sync(strategy):
    """`flag -> any worker's flag`: one small all-reduce so every worker stops at the same batch."""

    @tf.function
    def any_stop(flag):
        per_replica = strategy.run(lambda: tf.cast(flag, tf.int32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0

    return lambda flag: any_stop(tf.constant(flag)).numpy()


def _metrics_or_logs(model, logs):
    # As Keras' fit: the epoch's logs are the model's metric results (read in
    # cross-replica context, i.e. aggregated over all replicas) when they
    # carry the same names as the step logs, else the last step's logs.
    metric_logs = model.get_metrics_result()
    if isinstance(logs, dict) and set(logs) == set(metric_logs):
        return metric_logs
    return logs


__all__ = ["fit", "worker_info", "is_chief", "chief_only", "ChiefOnly"]
