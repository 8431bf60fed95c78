"""One worker of a localhost `MultiWorkerMirroredStrategy` job (tests/test_distribute.py).

    python tests/_distributed_worker.py --ports P0,P1 --index I --out DIR [--backup DIR]
                                        [--kill-at-step N] [--models str,gsm]

With one port (or none) it trains in one process under the default
strategy: the reference run. It trains each requested model with
`tfs.distribute.fit` for two epochs on MNIST-1D and writes
`DIR/<model>_worker<I>.npz` (final weights) and `DIR/<model>_worker<I>.json`
(history, sparsity, pid). `--kill-at-step N` makes worker 1 SIGKILL itself
right after global step N of the first model (a crash mid-epoch).
"""

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS_PER_EPOCH = 8       # 1024 samples / global batch 128
UPDATE_EVERY = 4          # TargetSparsity offset updates ...
SAVE_FREQ = 4             # ... and backups on the same steps: exact resume


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--ports", default="")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--backup", default=None)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--models", default="str,gsm")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    return p.parse_args(argv)


def make_strategy(ports, index):
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    if len(ports) < 2:
        return tf.distribute.get_strategy()
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def build(kind):
    from support import small_sparse_model  # tests/ is this script's directory: the tests' own model

    return small_sparse_model(kind, seed=11)


def dataset(samples, batch):
    import tensorflow as tf

    import tf_sparsity as tfs

    (x, y), _ = tfs.datasets.mnist1d()
    x, y = x[:samples], y[:samples]
    # A reshuffling dataset with a fixed seed: the resumed job must reproduce its order.
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(samples, seed=5).batch(batch)


class SelfKill:
    """Worker-side crash: SIGKILL this process right after global step `step`."""

    @staticmethod
    def callback(step):
        import keras

        class _Kill(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.seen = int(self.model.optimizer.iterations.numpy())

            def on_train_batch_end(self, batch, logs=None):
                self.seen += 1
                if self.seen == step:
                    sys.stdout.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


def main(argv=None):
    args = parse(argv)
    ports = [int(p) for p in args.ports.split(",") if p]
    strategy = make_strategy(ports, args.index)  # before any other TensorFlow work

    import keras
    import numpy as np

    import tf_sparsity as tfs

    os.makedirs(args.out, exist_ok=True)
    data = dataset(args.samples, args.batch)
    for n, kind in enumerate(args.models.split(",")):
        with strategy.scope():
            model = build(kind)
        callbacks = [
            tfs.callbacks.SparsityMonitor(log_dir=os.path.join(args.out, f"tb_{kind}")),
            keras.callbacks.ModelCheckpoint(os.path.join(args.out, f"{kind}.weights.h5"), save_weights_only=True),
        ]
        if kind == "str":
            callbacks.insert(0, tfs.callbacks.TargetSparsity(0.9, update_every=UPDATE_EVERY))
        else:
            callbacks.append(tfs.optimizers.GSMMonitor())
        if args.kill_at_step is not None and args.index == 1 and n == 0:
            callbacks.append(SelfKill.callback(args.kill_at_step))
        backup = os.path.join(args.backup, kind) if args.backup else None
        history = tfs.distribute.fit(model, data, epochs=args.epochs, callbacks=callbacks, verbose=0,
                                     backup_dir=backup, save_freq=SAVE_FREQ)
        if kind == "gsm":
            tfs.optimizers.final_prune(model)
        stem = os.path.join(args.out, f"{kind}_worker{args.index}")
        np.savez(stem + ".npz", **{f"{i:03d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)})
        info = {
            "pid": os.getpid(),
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "sparsity": float(tfs.sparsity(model)) if kind == "str" else None,
            "nonzeros": int(tfs.summary(model, print_fn=None).nonzeros),
            "iterations": int(model.optimizer.iterations.numpy()),
            "replicas": int(strategy.num_replicas_in_sync),
            "chief": tfs.distribute.is_chief(strategy),
        }
        with open(stem + ".json", "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
