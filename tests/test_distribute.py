"""tfs.distribute.fit: equal to model.fit, to one process on the global batch, and after a crash.

The multi-worker tests start real worker processes on 127.0.0.1 (free ports
picked at runtime) running tests/_distributed_worker.py under
`MultiWorkerMirroredStrategy`; every subprocess has a timeout.
"""

import doctest
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparsity as tfs
from tf_sparsity import distribute
from support import small_sparse_model

WORKER = Path(__file__).with_name("_distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 400  # seconds for one job: ~20 s on a quiet machine, 2 min seen at load 7 on two cores
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ----------------------------------------------------------------- helpers
def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TF_CONFIG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def start(workers, out, *extra, log_dir):
    """Start `workers` processes (1 = the single-process reference)."""
    ports = free_ports(workers) if workers > 1 else []
    procs = []
    for index in range(workers):
        log = open(Path(log_dir) / f"{Path(out).name}_w{index}.log", "w")
        cmd = [sys.executable, str(WORKER), "--ports", ",".join(map(str, ports)), "--index", str(index),
               "--out", str(out), *extra]
        procs.append((subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def wait(procs, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        kill(procs)
        pytest.fail(f"worker job exceeded {timeout}s:\n{_logs(procs)}")
    finally:
        for _, log in procs:
            log.close()
    return codes


def kill(procs):
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _logs(procs):
    text = []
    for _, log in procs:
        log.flush()
        text.append(Path(log.name).read_text()[-3000:])
    return "\n-----\n".join(text)


def run_job(workers, out, *extra, log_dir):
    procs = start(workers, out, *extra, log_dir=log_dir)
    codes = wait(procs)
    assert codes == [0] * workers, _logs(procs)


def load(out, kind, index=0):
    weights = np.load(Path(out) / f"{kind}_worker{index}.npz")
    info = json.loads((Path(out) / f"{kind}_worker{index}.json").read_text())
    return [weights[k] for k in sorted(weights.files)], info


def assert_close(a, b, rtol):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        scale = max(float(np.max(np.abs(v))), 1e-6)
        err = float(np.max(np.abs(u - v))) / scale
        assert err <= rtol, f"variable {i}: max |diff| / max |w| = {err:.2e} > {rtol}"


def small_model(kind="str", seed=3):
    return small_sparse_model(kind, seed)


def mnist_dataset(data, n=512, batch=64, seed=5):
    (x, y), _ = data
    return tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).shuffle(n, seed=seed).batch(batch)


class _Crash(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise RuntimeError("simulated crash")


# -------------------------------------------------------- fast: API checks
@pytest.mark.parametrize("name, value", [
    ("validation_split", 0.1), ("validation_data", None), ("class_weight", {0: 1.0}),
    ("batch_size", 32), ("shuffle", True), ("sample_weight", None), ("x", None),
])
def test_unsupported_fit_arguments_raise_naming_them(name, value):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((4, 3)), np.zeros((4, 1)))).batch(2)
    with pytest.raises(ValueError, match=f"`{name}`"):
        tfs.distribute.fit(model, data, **{name: value})


def test_argument_errors_are_clear():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    data = tf.data.Dataset.from_tensor_slices((np.zeros((4, 3)), np.zeros((4, 1)))).batch(2)
    with pytest.raises(ValueError, match="compiled"):
        tfs.distribute.fit(model, data)
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="tf.data.Dataset"):
        tfs.distribute.fit(model, (np.zeros((4, 3)), np.zeros((4, 1))))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        tfs.distribute.fit(model, data.repeat())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        tfs.distribute.fit(model, data, steps_per_epoch=1)
    with pytest.raises(ValueError, match="assert_cardinality"):
        tfs.distribute.fit(model, data.filter(lambda a, b: True))
    with pytest.raises(ValueError, match="save_freq"):
        tfs.distribute.fit(model, data, save_freq="batch")
    with pytest.raises(ValueError, match="backup_dir"):
        tfs.distribute.fit(model, data, callbacks=[keras.callbacks.BackupAndRestore("/tmp/nowhere")])
    with pytest.raises(TypeError, match="unexpected keyword"):
        tfs.distribute.fit(model, data, epoch=3)
    model.compile("sgd", "mse", steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution"):
        tfs.distribute.fit(model, data)


def test_model_from_another_strategy_is_refused(mirrored_strategy):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((4, 3)), np.zeros((4, 1)))).batch(2)
    with pytest.raises(ValueError, match="strategy.scope"):
        tfs.distribute.fit(model, data, strategy=mirrored_strategy)


def test_worker_info_outside_multi_worker():
    assert tfs.distribute.worker_info() == (None, 0, True, 1)
    assert tfs.distribute.is_chief()


def test_callback_hooks_logs_and_stop_training():
    events = []

    class Recorder(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            events.append(("train_begin", self.params["epochs"], self.params["steps"]))

        def on_epoch_begin(self, epoch, logs=None):
            events.append(("epoch_begin", epoch))

        def on_train_batch_begin(self, batch, logs=None):
            events.append(("batch_begin", batch))

        def on_train_batch_end(self, batch, logs=None):
            events.append(("batch_end", batch, sorted(logs)))
            if int(self.model.optimizer.iterations.numpy()) == 6:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            events.append(("epoch_end", epoch, sorted(logs)))

        def on_train_end(self, logs=None):
            events.append(("train_end", sorted(logs)))

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", metrics=["mae"])
    data = tf.data.Dataset.from_tensor_slices((np.ones((16, 3)), np.ones((16, 1)))).batch(4)
    history = tfs.distribute.fit(model, data, epochs=5, callbacks=[Recorder()], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 6  # stopped after the 6th step
    assert events[0] == ("train_begin", 5, 4)
    assert events[1:6] == [("epoch_begin", 0), ("batch_begin", 0), ("batch_end", 0, ["loss", "mae"]),
                           ("batch_begin", 1), ("batch_end", 1, ["loss", "mae"])]
    assert [e for e in events if e[0] == "epoch_end"] == [("epoch_end", 0, ["loss", "mae"]),
                                                          ("epoch_end", 1, ["loss", "mae"])]
    assert events[-1] == ("train_end", ["loss", "mae"])
    assert len(history.history["loss"]) == 2


def test_verbose_zero_is_silent_and_one_shows_progress(capsys):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.ones((8, 3)), np.ones((8, 1)))).batch(4)
    tfs.distribute.fit(model, data, epochs=1, verbose=0)
    assert capsys.readouterr().out == ""
    tfs.distribute.fit(model, data, epochs=1, verbose=1)
    out = capsys.readouterr().out
    assert "2/2" in out and "loss" in out


def test_fit_docstring_example_runs():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(distribute.fit, "fit", globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


def test_infinite_dataset_with_steps_per_epoch_matches_fit():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)).astype("float32"), rng.normal(size=(20, 1)).astype("float32")

    def run(loop):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(20, seed=2).repeat().batch(4)
        history = loop(model, data)
        return model, history.history["loss"]

    a, loss_a = run(lambda m, d: m.fit(d, epochs=3, steps_per_epoch=3, verbose=0, shuffle=False))
    b, loss_b = run(lambda m, d: tfs.distribute.fit(m, d, epochs=3, steps_per_epoch=3, verbose=0))
    assert int(b.optimizer.iterations.numpy()) == 9
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for u, v in zip(a.weights, b.weights):
        np.testing.assert_allclose(v.numpy(), u.numpy(), rtol=1e-6, atol=1e-7)


def test_chief_only_forwards_hooks_on_the_chief():
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(epoch)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.ones((8, 3)), np.ones((8, 1)))).batch(4)
    tfs.distribute.fit(model, data, epochs=2, callbacks=[tfs.distribute.chief_only(Probe())], verbose=0)
    assert seen == [0, 1]  # one process: it is the chief


# ------------------------------------------- slow: equal to fit, resumable
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["str", "gsm"])
def test_default_strategy_matches_model_fit(mnist1d_data, kind):
    """Loss curve, metrics and final weights equal `model.fit` (reshuffled data, callbacks)."""
    def callbacks():
        if kind == "str":
            return [tfs.callbacks.TargetSparsity(0.8, update_every=4), tfs.callbacks.SparsityMonitor()]
        return [tfs.optimizers.GSMMonitor()]

    reference = small_model(kind)
    expected = reference.fit(mnist_dataset(mnist1d_data), epochs=3, verbose=0, callbacks=callbacks(), shuffle=False)
    model = small_model(kind)
    history = tfs.distribute.fit(model, mnist_dataset(mnist1d_data), epochs=3, verbose=0, callbacks=callbacks())
    assert set(history.history) == set(expected.history)
    for key, values in expected.history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-6, atol=1e-7, err_msg=key)
    assert int(model.optimizer.iterations.numpy()) == 24
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    for a, b in zip(reference.optimizer.variables, model.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


@pytest.mark.slow
def test_mirrored_strategy_matches_one_device(mnist1d_data, mirrored_strategy):
    single = small_model("gsm")
    tfs.distribute.fit(single, mnist_dataset(mnist1d_data), epochs=2, verbose=0)
    with mirrored_strategy.scope():
        mirrored = small_model("gsm")
    history = tfs.distribute.fit(mirrored, mnist_dataset(mnist1d_data), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert_close([v.numpy() for v in mirrored.weights], [v.numpy() for v in single.weights], 1e-5)
    for count in mirrored.optimizer.active_counts:  # the same global mask on both replicas
        values = [int(c.numpy()) for c in count.value.values]
        assert values[0] == values[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["str", "gsm"])
def test_backup_resumes_mid_epoch_on_the_same_trajectory(mnist1d_data, tmp_path, kind):
    """A crash mid-epoch, then a fresh model + fit with the same `backup_dir`: same end state."""
    def callbacks():
        if kind == "str":
            return [tfs.callbacks.TargetSparsity(0.8, update_every=4)]
        return []

    straight = small_model(kind)
    tfs.distribute.fit(straight, mnist_dataset(mnist1d_data), epochs=3, verbose=0, callbacks=callbacks())
    backup = tmp_path / "backup"
    crashed = small_model(kind)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tfs.distribute.fit(crashed, mnist_dataset(mnist1d_data), epochs=3, verbose=0,
                           callbacks=callbacks() + [_Crash(23)], backup_dir=str(backup), save_freq=4)
    saved = np.load(backup / "tfs_backup.npz")
    assert json.loads(str(saved["__meta__"])) == {"epoch": 2, "step_in_epoch": 4, "iterations": 20}
    resumed = small_model(kind, seed=99)  # a new process would start from other weights
    keras.utils.set_random_seed(3)  # ... but builds its data the same way (the shuffle seeds)
    history = tfs.distribute.fit(resumed, mnist_dataset(mnist1d_data), epochs=3, verbose=0,
                                 callbacks=callbacks(), backup_dir=str(backup), save_freq=4)
    assert len(history.history["loss"]) == 1  # only the last epoch ran
    assert int(resumed.optimizer.iterations.numpy()) == 24
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables):  # momentum, counts
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    assert not backup.exists()  # deleted once training completed, as BackupAndRestore does


def test_backup_restores_dropout_rng_and_reshuffled_order(tmp_path):
    def run(crash=None, seed=0):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dropout(0.5),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        data = tf.data.Dataset.from_tensor_slices(
            (rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 1)).astype("float32"))
        ).shuffle(32, seed=1).batch(8)
        callbacks = [] if crash is None else [_Crash(crash)]
        tfs.distribute.fit(model, data, epochs=3, verbose=0, callbacks=callbacks,
                           backup_dir=str(tmp_path / "b"), save_freq=2)
        return model

    straight = run()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash=7)  # backup at step 6: epoch 1, step 2
    resumed = run(seed=5)
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------ slow: real worker processes
@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """One uninterrupted 2-worker job and the 1-process reference, run concurrently."""
    root = tmp_path_factory.mktemp("cluster")
    jobs = [start(2, root / "two", log_dir=root), start(1, root / "one", log_dir=root)]
    for procs in jobs:
        codes = wait(procs)
        assert codes == [0] * len(procs), _logs(procs)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["str", "gsm"])
def test_two_workers_match_one_process(cluster_runs, kind):
    w0, info0 = load(cluster_runs / "two", kind, 0)
    w1, info1 = load(cluster_runs / "two", kind, 1)
    one, info = load(cluster_runs / "one", kind, 0)
    assert info0["replicas"] == 2 and info["replicas"] == 1
    assert info0["chief"] and not info1["chief"]
    assert info0["iterations"] == info1["iterations"] == info["iterations"] == 16
    for a, b in zip(w0, w1):  # every worker holds the same weights
        np.testing.assert_array_equal(a, b)
    assert_close(w0, one, rtol=1e-5)  # and they equal one process on the global batch
    assert info0["nonzeros"] == info1["nonzeros"] == info["nonzeros"]
    np.testing.assert_allclose(info0["history"]["loss"], info["history"]["loss"], rtol=1e-5)
    if kind == "str":
        assert abs(info0["sparsity"] - 0.9) <= 0.01 and info0["sparsity"] == info1["sparsity"]
    else:  # GSM: one global top-Q on the all-reduced gradient, the same on both workers
        assert info0["history"]["gsm_active/fc1"] == info1["history"]["gsm_active/fc1"] \
            == info["history"]["gsm_active/fc1"]


@pytest.mark.slow
def test_only_the_chief_writes_files(cluster_runs):
    _, chief = load(cluster_runs / "two", "str", 0)
    for kind in ("str", "gsm"):
        events = list((cluster_runs / "two" / f"tb_{kind}").glob("events.out.tfevents.*"))
        assert len(events) == 1, events
        assert f".{chief['pid']}." in events[0].name  # written by the chief's process
        assert (cluster_runs / "two" / f"{kind}.weights.h5").exists()  # ModelCheckpoint, chief only


@pytest.mark.slow
def test_killed_worker_restarts_from_the_backup(cluster_runs, tmp_path):
    """SIGKILL worker 1 mid-epoch 2 (STR phase), kill the stuck chief, restart both."""
    backup = tmp_path / "backup"
    procs = start(2, tmp_path / "killed", "--backup", str(backup), "--kill-at-step", "14", log_dir=tmp_path)
    try:
        code = procs[1][0].wait(timeout=TIMEOUT)
        assert code == -signal.SIGKILL, _logs(procs)
        time.sleep(1.0)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker 1 did not reach step 14:\n{_logs(procs)}")
    finally:
        kill(procs)  # the chief blocks in the next all-reduce: end it too
        for _, log in procs:
            log.close()
    saved = np.load(backup / "str" / "tfs_backup.npz")
    meta = json.loads(str(saved["__meta__"]))
    assert meta == {"epoch": 1, "step_in_epoch": 4, "iterations": 12}  # mid-epoch 2
    run_job(2, tmp_path / "resumed", "--backup", str(backup), log_dir=tmp_path)
    for kind in ("str", "gsm"):
        straight, info = load(cluster_runs / "two", kind, 0)
        for index in (0, 1):
            resumed, rinfo = load(tmp_path / "resumed", kind, index)
            assert_close(resumed, straight, rtol=1e-6)
            assert rinfo["nonzeros"] == info["nonzeros"]
            assert rinfo["sparsity"] == info["sparsity"]
    _, rinfo = load(tmp_path / "resumed", "str", 0)
    assert len(rinfo["history"]["loss"]) == 1  # the resumed job trained epoch 2 only
