"""Step time of `tfs.distribute.fit` vs `model.fit`, and of two localhost workers vs one.

    python benchmarks/distributed_fit.py --reps 7 --out benchmarks/results/distributed_fit.json

1. One process (`--part loop`): the same STR-wrapped MNIST-1D CNN
   (`tfs.zoo.mnist1d_cnn()`, 4000 samples, global batch 128, 32 steps per
   epoch, `TargetSparsity(0.9)` and `SparsityMonitor` callbacks, verbose=0)
   trained by `model.fit` and by `tfs.distribute.fit` in the same process,
   alternating which goes first, `--reps` times. Each rep is one call with
   `--epochs` epochs; the first epoch (tracing) is dropped and the step time
   is the median over the other epochs of epoch wall time / steps. The
   table reports the median over reps of each loop and of the per-rep ratio,
   and the fastest epoch of each loop (least disturbed by other load).
2. Workers (`--part workers`): the same training with `tfs.distribute.fit`
   under `MultiWorkerMirroredStrategy`, two worker processes on 127.0.0.1
   (this script with `--worker`), vs one process with the default strategy,
   same global batch. Reported only: the machine has two cores, so two
   workers split the same cores and add a ring all-reduce per step.
"""

import argparse
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time

from common import write_results  # noqa: E402  (first: quiet TensorFlow, results with the environment)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["loop", "workers", "all"], default="all")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--worker-epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_fit.json"))
    # internal: one worker of part 2
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ports", default="", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _data(samples, batch):
    import tensorflow as tf

    import tf_sparsity as tfs

    (x, y), _ = tfs.datasets.mnist1d(num_samples=samples)
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=1).batch(batch)


def _model():
    import keras

    import tf_sparsity as tfs

    keras.utils.set_random_seed(0)
    model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn(), s_init=-5.0, weight_decay=5e-3)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def _callbacks(timer):
    import tf_sparsity as tfs

    return [tfs.callbacks.TargetSparsity(0.9), tfs.callbacks.SparsityMonitor(), timer]


def _timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    return EpochTimer()


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def part_loop(args):
    import tf_sparsity as tfs

    data = _data(args.samples, args.batch)
    steps = int(data.cardinality())
    models = {"model.fit": _model(), "tfs.distribute.fit": _model()}
    runs = {name: [] for name in models}
    ratios = []
    best = {}
    for rep in range(args.reps):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        step = {}
        for name in order:
            timer = _timer()
            model = models[name]
            if name == "model.fit":
                model.fit(data, epochs=args.epochs, verbose=0, callbacks=_callbacks(timer))
            else:
                tfs.distribute.fit(model, data, epochs=args.epochs, verbose=0, callbacks=_callbacks(timer))
            step[name] = _median(timer.seconds[1:]) / steps
            runs[name].append(step[name])
            best[name] = min(best.get(name, float("inf")), min(timer.seconds[1:]) / steps)
        ratios.append(step["tfs.distribute.fit"] / step["model.fit"])
        print(f"rep {rep}: model.fit {step['model.fit'] * 1e3:.2f} ms/step, "
              f"tfs.distribute.fit {step['tfs.distribute.fit'] * 1e3:.2f} ms/step, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    return {
        "steps_per_epoch": steps,
        "ms_per_step": {name: [v * 1e3 for v in values] for name, values in runs.items()},
        "median_ms_per_step": {name: _median(values) * 1e3 for name, values in runs.items()},
        "ratios": ratios,
        "median_ratio": _median(ratios),
        # The fastest epoch of each loop: least disturbed by other load on a shared machine.
        "best_ms_per_step": {name: v * 1e3 for name, v in best.items()},
        "best_ratio": best["tfs.distribute.fit"] / best["model.fit"],
    }


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker(args):
    import tensorflow as tf

    ports = [int(p) for p in args.ports.split(",") if p]
    if len(ports) > 1:
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": args.index},
        })
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    else:
        strategy = tf.distribute.get_strategy()
    import tf_sparsity as tfs

    data = _data(args.samples, args.batch)
    with strategy.scope():
        model = _model()
    timer = _timer()
    history = tfs.distribute.fit(model, data, epochs=args.worker_epochs, verbose=0, callbacks=_callbacks(timer))
    steps = int(data.cardinality())
    if args.result and tfs.distribute.is_chief(strategy):
        pathlib.Path(args.result).write_text(json.dumps({
            "replicas": strategy.num_replicas_in_sync,
            "epoch_seconds": timer.seconds,
            "ms_per_step": _median(timer.seconds[1:]) / steps * 1e3,
            "final_loss": history.history["loss"][-1],
            "sparsity": float(tfs.sparsity(model)),
        }))


def _launch(n, args, result):
    ports = _free_ports(n) if n > 1 else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--ports", ",".join(map(str, ports)), "--index", str(i),
         "--result", result, "--samples", str(args.samples), "--batch", str(args.batch),
         "--worker-epochs", str(args.worker_epochs)], env=env)
        for i in range(n)]
    try:
        for p in procs:
            if p.wait(timeout=1200) != 0:
                raise RuntimeError(f"worker exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return json.loads(pathlib.Path(result).read_text())


def part_workers(args):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(1, args, os.path.join(tmp, "one.json"))
        two = _launch(2, args, os.path.join(tmp, "two.json"))
    return {"one_process": one, "two_workers": two, "ratio_two_over_one": two["ms_per_step"] / one["ms_per_step"]}


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    import keras
    import tensorflow as tf

    result = {
        "command": "python benchmarks/distributed_fit.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "config": {"samples": args.samples, "batch": args.batch, "epochs": args.epochs, "reps": args.reps,
                   "worker_epochs": args.worker_epochs},
    }
    if args.part in ("loop", "all"):
        result["loop"] = dict(part_loop(args), command=result["command"], load_average=os.getloadavg())
    if args.part in ("workers", "all"):
        result["workers"] = dict(part_workers(args), command=result["command"], load_average=os.getloadavg())
    out = pathlib.Path(args.out)
    if out.exists() and args.part != "all":  # keep the other part of an earlier run
        previous = json.loads(out.read_text())
        previous.update({k: v for k, v in result.items()})
        result = previous
    result.pop("environment", None)
    write_results(out, result)
    print(json.dumps({k: v for k, v in result.items() if k in ("loop", "workers")}, indent=2))


if __name__ == "__main__":
    main()
