"""GSM vs momentum SGD, magnitude pruning + fine-tuning and tfmot: accuracy and step time.

    python benchmarks/gsm_vs_sgd.py --skip-timing --seeds 3 --model cnn --out benchmarks/results/gsm_cnn.json
    python benchmarks/gsm_vs_sgd.py --skip-timing --seeds 3 --model lenet --out benchmarks/results/gsm_lenet.json
    python benchmarks/gsm_vs_sgd.py --skip-accuracy --reps 30 --out benchmarks/results/gsm_timing.json

1. Step time (`--timing-models`): a 1.1M-parameter MLP (batch 128 and 512;
   the worst case for GSM, one multiply-add per weight per sample) and a
   0.83M-parameter MobileNet (batch 128), a compiled custom training step
   (`tf.function`: forward, gradient, `optimizer.apply`). Plain
   `keras.optimizers.SGD(momentum=0.99)` and GSM at compression 10 with every
   threshold method run in the same process, interleaved in blocks of
   `--block` steps, `--reps` times (rotating the order); the table shows the
   median and the best block's per-step time and their ratios to SGD.
2. Accuracy. MNIST-1D (`--samples`, 80/20 split), `--model cnn`
   (`tfs.zoo.mnist1d_cnn()`) or `lenet` (40-300-100-10), batch 128. Every
   method starts from the same dense model (`--epochs` 20, SGD-Nesterov 0.9,
   lr `--lr`, cosine, L2 `--weight-decay` 5e-4) and gets `--gsm-epochs` 40
   more with the same optimizer (momentum 0.99, Nesterov, lr `--gsm-lr`
   0.02 cosine, L2 `--gsm-weight-decay` 5e-3 on the kernels only for every
   row: GSM's `decay_scope="kernels"`, the others' kernel_regularizer):
   - dense, continued: no mask (the control);
   - GSM (`--methods gsm gsm-sample`): `GlobalSparseMomentum` with the exact
     or the sampled threshold, then `final_prune`, no fine-tuning;
   - magnitude-ft: one-shot global magnitude pruning, then training with
     the masks fixed;
   - tfmot: `prune_low_magnitude` ramped over the first 70%, in its own
     process (`_tfmot_worker.py`, needs the `baseline` extra);
   - dense-small: dense nets of `--small-hidden` widths (about GSM's nonzero
     count), pre-trained and continued exactly like the control (capacity).
   `--dataset digits` runs LeNet-300-100 (64-300-100-10) on scikit-learn's
   bundled 8x8 digits instead (1,797 samples, 80/20 split), the
   over-parameterized regime of the paper's MNIST result.
   Compressions `--compressions` 10 30 60; mean (min-max) over seeds.
   `--gsm-batch-size` (128) sets the batch of the GSM phase, its control and
   the baselines: GSM's decay budget `eta * sum(lr) / (1 - beta)` counts
   steps, so batch 32 gives MNIST-1D's 8k samples about the steps per epoch
   of MNIST at the official batch 256 (the budget is printed and saved).
"""

import argparse
import os
import pathlib
import platform
import tempfile
import sys
import time

from common import BASELINE_PYTHON, HERE, parser, write_results, run_tfmot_worker  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
from tf_sparsity.optimizers import GlobalSparseMomentum, GSMMonitor, final_prune  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------------------- step time
TIMING_MODELS = {
    # ~1.1M parameters each: the MLP is the worst case for GSM's per-weight
    # overhead (one multiply-add per weight and sample); the MobileNet reuses
    # each conv weight at every position, like most vision models.
    "mlp": ("mnist1d_mlp(hidden=(1024, 1024))", lambda: tfs.zoo.mnist1d_mlp(hidden=(1024, 1024)),
            lambda batch: (np.random.default_rng(0).normal(size=(batch, 40, 1)).astype("float32"))),
    "mobilenet": ("keras.applications.MobileNet(alpha=0.5, input_shape=(32, 32, 3), classes=10)",
                  lambda: keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.5, weights=None,
                                                       classes=10, classifier_activation=None),
                  lambda batch: np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype("float32")),
}


def _compiled_step(optimizer, model_name="mlp", seed=0):
    keras.utils.set_random_seed(seed)
    model = TIMING_MODELS[model_name][1]()
    variables = model.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return model, step


def step_time(x, y, reps, block, batch_size=128, model_name="mlp"):
    x = tf.constant(TIMING_MODELS[model_name][2](batch_size))
    y = tf.constant(y[:batch_size])
    runs = {
        "SGD(momentum=0.99)": keras.optimizers.SGD(0.01, momentum=0.99),
        "GSM histogram": GlobalSparseMomentum(0.01, momentum=0.99, compression=10),
        "GSM sample": GlobalSparseMomentum(0.01, momentum=0.99, compression=10, threshold_method="sample"),
        "GSM exact": GlobalSparseMomentum(0.01, momentum=0.99, compression=10, threshold_method="exact"),
    }
    steps = {}
    for name, opt in runs.items():
        model, steps[name] = _compiled_step(opt, model_name)
        params = model.count_params()
        for _ in range(5):  # trace and warm up
            steps[name](x, y)
    times = {name: [] for name in runs}
    names = list(steps)
    for rep in range(reps):  # interleaved, rotating order: drift and load hit every optimizer alike
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(block):
                loss = step(x, y)
            float(loss)  # wait for the device
            times[name].append((time.perf_counter() - start) / block)
    sgd = float(np.median(times["SGD(momentum=0.99)"]))
    sgd_min = float(np.min(times["SGD(momentum=0.99)"]))
    pool = runs["GSM histogram"].pool_size
    return {
        "model": TIMING_MODELS[model_name][0], "params": params, "pool": pool,
        "batch_size": batch_size, "reps": reps, "block": block,
        "rows": [
            {"optimizer": name, "ms_per_step": 1e3 * float(np.median(t)),
             "ms_min": 1e3 * float(np.min(t)), "ratio_to_sgd": float(np.median(t)) / sgd,
             "ratio_to_sgd_min": float(np.min(t)) / sgd_min}
            for name, t in times.items()
        ],
    }


# -------------------------------------------------------------- accuracy
MODELS = {
    # The 1-D CNN and LeNet-300-100's shape (40-300-100-10 on MNIST-1D, 64-300-100-10 on digits);
    # `hidden` gives the dense-small baselines their own widths.
    "cnn": lambda weight_decay=0.0, seq_len=40, hidden=None: tfs.zoo.mnist1d_cnn(weight_decay=weight_decay),
    "lenet": lambda weight_decay=0.0, seq_len=40, hidden=None: tfs.zoo.mnist1d_mlp(
        hidden=hidden or (300, 100), weight_decay=weight_decay, seq_len=seq_len,
        name="lenet_300_100" if hidden is None else "dense_small"),
}


def load_data(a):
    """`(train, test)` of `--dataset`, `x` of shape `(n, length, 1)`; with `--validation`
    the test split is replaced by the last 1/8 of the training split (tuning never sees test)."""
    if a.dataset == "digits":
        if a.samples is not None:
            raise ValueError("`--samples`: scikit-learn's digits has a fixed 1,797 samples; "
                             "use --samples only with --dataset mnist1d.")
        if a.model != "lenet":
            raise ValueError(f"`--model`: --dataset digits takes --model lenet; received {a.model!r}.")
        (x, y), (xt, yt) = tfs.datasets.digits(test_fraction=0.2, seed=0)
        train, test = (x.reshape(len(x), 64, 1), y), (xt.reshape(len(xt), 64, 1), yt)
    else:
        train, test = tfs.datasets.mnist1d(num_samples=a.samples or 10000)
    if a.validation:
        cut = len(train[0]) * 7 // 8
        train, test = (train[0][:cut], train[1][:cut]), (train[0][cut:], train[1][cut:])
    return train, test


def _model(a, data, weight_decay=0.0, hidden=None):
    return MODELS[a.model](weight_decay=weight_decay, seq_len=data[0][0].shape[1], hidden=hidden)


def run_dense(seed, data, a, epochs, weights=None, hidden=None):
    keras.utils.set_random_seed(seed)
    model = _model(a, data, a.weight_decay, hidden)
    if weights is not None:
        model.set_weights(weights)
    result = train_classifier(model, *data, epochs=epochs, learning_rate=a.lr)
    row = {"accuracy": result["accuracy"], "accuracy_pruned": result["accuracy"], "sparsity": 0.0,
           "seconds_per_step": result["seconds_per_step"]}
    return row, model.get_weights()


def run_dense_continued(seed, data, a, weights, hidden=None):
    """Control: GSM's optimizer and epochs without the mask (momentum SGD + coupled L2).
    With `hidden`, a dense net of those widths (`weights` its own pre-training)."""
    keras.utils.set_random_seed(seed)
    model = _model(a, data, a.gsm_weight_decay, hidden)  # coupled L2 on the kernels
    model.set_weights(weights)
    result = train_classifier(model, *data, epochs=a.gsm_epochs, optimizer=_continued_sgd(data, a),
                              batch_size=a.gsm_batch_size)
    return {"accuracy": result["accuracy"], "accuracy_pruned": result["accuracy"], "sparsity": 0.0,
            "seconds_per_step": result["seconds_per_step"]}


def _gsm_schedule(data, a):
    """The GSM phase's learning rate: cosine to 0, or the official code's
    linear warm-up then x0.1 steps (`--gsm-schedule step`; LeNet-300: at
    epochs 160/200/240 of 280, i.e. at 4/7, 5/7, 6/7 of training)."""
    per_epoch = _steps_per_epoch(data, a)
    steps = a.gsm_epochs * per_epoch
    if a.gsm_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(a.gsm_lr, steps)
    bounds = [int(steps * f) for f in (4 / 7, 5 / 7, 6 / 7)]
    values = [a.gsm_lr * 0.1 ** i for i in range(4)]
    step_lr = keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    warmup = a.gsm_warmup_epochs * per_epoch
    if not warmup:
        return step_lr
    return _Warmup(step_lr, warmup)


def _steps_per_epoch(data, a):
    """Steps per epoch of the GSM phase (and of every row trained alongside it) at `--gsm-batch-size`."""
    return int(np.ceil(len(data[0][0]) / a.gsm_batch_size))


def decay_budget(data, a):
    """GSM's decay budget `eta * sum(lr) / (1 - beta)` over the GSM phase (docs/gsm.md)."""
    schedule = _gsm_schedule(data, a)
    steps = a.gsm_epochs * _steps_per_epoch(data, a)
    lrs = keras.ops.convert_to_numpy(schedule(keras.ops.arange(steps, dtype="float32")))
    return float(a.gsm_weight_decay * np.sum(lrs) / (1.0 - a.gsm_momentum))


@keras.saving.register_keras_serializable(package="benchmarks")
class _Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 over `warmup` steps, then `schedule` (the official WarmupMultiStepLR)."""

    def __init__(self, schedule, warmup):
        self.schedule, self.warmup = schedule, int(warmup)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        factor = keras.ops.minimum(1.0, step / float(self.warmup))
        return factor * self.schedule(step)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "warmup": self.warmup}


def _continued_sgd(data, a):
    return keras.optimizers.SGD(_gsm_schedule(data, a), momentum=a.gsm_momentum, nesterov=True)


def run_magnitude_finetune(compression, seed, data, a, weights):
    """Baseline: one-shot global magnitude pruning of the dense model, then the
    control's `--gsm-epochs` of training with the masks fixed."""
    keras.utils.set_random_seed(seed)
    dense = _model(a, data, a.gsm_weight_decay)
    dense.set_weights(weights)
    model = tfs.prune_at_init(dense, "magnitude", compression=compression, verbose=0, on_collapse="ignore")
    _, acc0 = _evaluate(model, data)
    result = train_classifier(model, *data, epochs=a.gsm_epochs, optimizer=_continued_sgd(data, a),
                              batch_size=a.gsm_batch_size)
    report = tfs.summary(tfs.strip(model), print_fn=None)
    return {"accuracy": None, "accuracy_no_finetune": acc0, "accuracy_pruned": result["accuracy"],
            "sparsity": report.sparsity,
            "collapsed_layers": report.collapsed, "seconds_per_step": result["seconds_per_step"]}


def run_dense_small(seed, data, a, hidden, lenet_weights, epochs):
    """Capacity baseline: a dense net of widths `hidden` (about GSM's nonzero count), pre-trained
    and continued exactly like the dense control (same optimizers, batches, steps, kernel L2)."""
    _, weights = run_dense(seed, data, a, a.epochs, hidden=hidden)
    r = run_dense_continued(seed, data, a, weights, hidden=hidden)
    model = _model(a, data, hidden=hidden)
    n = sum(int(np.prod(w.shape)) for w in model.trainable_weights if len(w.shape) >= 2)
    pool = sum(int(np.prod(w.shape)) for w in lenet_weights if w.ndim >= 2)
    widths = "-".join(str(v) for v in (data[0][0].shape[1], *hidden, 10))
    return dict(method=f"dense {widths} ({n:,} kernel weights)", compression=round(pool / n, 1), epochs=epochs,
                seed=seed, nonzeros=n, **r)


def _widths(text):
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"`--small-hidden`: expected comma-separated positive widths like 57,30; received {text!r}.")
    return widths


def _evaluate(model, data):
    model.compile(loss=LOSS, metrics=["accuracy"])
    loss, acc = model.evaluate(*data[1], verbose=0, batch_size=512)
    return float(loss), float(acc)


def run_tfmot(compression, seed, data, a, weights, workdir):
    """Baseline: tfmot's prune_low_magnitude from the dense weights, the
    control's optimizer and epochs, sparsity ramped over the first 70%
    (its own process: tfmot needs Keras 2)."""
    npz = pathlib.Path(workdir) / f"dense_{a.model}_{seed}.npz"
    (x, y), (xt, yt) = data
    np.savez(npz, x=x, y=y, x_test=xt, y_test=yt, **{f"w{i}": w for i, w in enumerate(weights)})
    r = run_tfmot_worker("--data", npz, "--model", a.model, "--init-weights", "--sparsity", 1 - 1 / compression,
                         "--seed", seed, "--epochs", a.gsm_epochs, "--lr", a.gsm_lr, "--momentum", "0.99",
                         "--weight-decay", a.gsm_weight_decay, "--batch-size", a.gsm_batch_size)
    return {"accuracy": None, "accuracy_pruned": r["accuracy"], "sparsity": r["sparsity"],
            "seconds_per_step": r["seconds_per_step"]}


def run_gsm(compression, seed, data, a, weights=None, threshold_method="histogram"):
    keras.utils.set_random_seed(seed)
    model = _model(a, data)  # no kernel_regularizer: GSM applies the L2
    if weights is not None:
        model.set_weights(weights)
    opt = GlobalSparseMomentum(_gsm_schedule(data, a), momentum=a.gsm_momentum, nesterov=True,
                               weight_decay=a.gsm_weight_decay, compression=compression,
                               threshold_method=threshold_method, decay_scope=a.gsm_decay_scope,
                               ramp_steps=a.gsm_ramp_epochs * _steps_per_epoch(data, a))
    result = train_classifier(model, *data, epochs=a.gsm_epochs, optimizer=opt,
                              callbacks=[GSMMonitor()], batch_size=a.gsm_batch_size)
    active = opt.active_fractions()
    magnitudes = np.sort(np.concatenate([np.abs(v.numpy()).ravel() for v in opt.pool_variables]))[::-1]
    final_prune(model)
    _, pruned = model.evaluate(*data[1], verbose=0, batch_size=512)
    report = tfs.summary(model, print_fn=None)
    return {
        "accuracy": result["accuracy"], "accuracy_pruned": float(pruned), "sparsity": report.sparsity,
        "nonzeros": report.nonzeros, "q": opt.q, "pool": opt.pool_size,
        # How close to zero GSM drove the weights that final_prune removes.
        "mean_abs_kept": float(magnitudes[:opt.q].mean()), "mean_abs_pruned": float(magnitudes[opt.q:].mean()),
        "layer_sparsity": {r.name: r.sparsity for r in report.layers if r.prunable},
        "collapsed_layers": report.collapsed,
        "final_active_fraction": active,
        "active_history": {k: v for k, v in result["history"].items() if k.startswith("gsm_active/")},
        "seconds_per_step": result["seconds_per_step"],
    }


def _mean_range(values):
    if any(v is None for v in values):
        return "–"
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def accuracy_table(rows):
    out = ["| method | compression | epochs | sparsity | accuracy before prune % | "
           "accuracy after final_prune / fine-tuning % | fit step time vs dense, continued |",
           "|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r["method"], r["compression"]) not in keys:
            keys.append((r["method"], r["compression"]))
    def step_time(group):  # None when a run was too short to time
        times = [r["seconds_per_step"] for r in group if r["seconds_per_step"] is not None]
        return float(np.median(times)) if times else float("nan")

    dense_step = step_time([r for r in rows if r["method"] == "dense, continued"])
    for method, c in keys:
        group = [r for r in rows if r["method"] == method and r["compression"] == c]
        step = step_time(group)
        out.append(
            f"| {method} | {f'{c:g}' if c else '-'} | {group[0]['epochs']} | "
            f"{np.mean([r['sparsity'] for r in group]):.1%} | "
            f"{_mean_range([r['accuracy'] for r in group])} | "
            f"{_mean_range([r['accuracy_pruned'] for r in group])} | {step / dense_step:.2f}x |"
        )
    return "\n".join(out)


def timing_table(timing):
    out = [f"| optimizer ({timing['model']}: {timing['params']:,} params, pool {timing['pool']:,}, "
           f"batch {timing['batch_size']}) "
           "| ms / step (median) | x SGD (median) | ms / step (best block) | x SGD (best) |",
           "|---|---|---|---|---|"]
    for r in timing["rows"]:
        out.append(f"| {r['optimizer']} | {r['ms_per_step']:.2f} | {r['ratio_to_sgd']:.2f} | "
                   f"{r['ms_min']:.2f} | {r['ratio_to_sgd_min']:.2f} |")
    return "\n".join(out)


def layer_table(rows):
    gsm = [r for r in rows if r["method"].startswith("GSM") and "sampled" not in r["method"]]
    if not gsm:
        return ""
    layers = list(gsm[0]["layer_sparsity"])
    out = ["| compression | " + " | ".join(f"{l} sparsity (active share at end)" for l in layers) + " |",
           "|---|" + "---|" * len(layers)]
    for c in sorted({r["compression"] for r in gsm}):
        group = [r for r in gsm if r["compression"] == c]
        cells = []
        for l in layers:
            s = np.mean([r["layer_sparsity"][l] for r in group])
            f = np.mean([r["final_active_fraction"][l] for r in group])
            cells.append(f"{s:.1%} ({f:.1%})")
        out.append(f"| {c:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-list", type=int, nargs="+", help="run these seeds instead of range(--seeds)")
    p.add_argument("--merge", nargs="+", help="only merge these result files into --out and print the tables")
    p.add_argument("--epochs", type=int, default=20, help="dense (pre)training epochs")
    p.add_argument("--gsm-epochs", type=int, default=40, help="GSM training epochs")
    p.add_argument("--gsm-init", choices=["pretrained", "scratch"], default="pretrained",
                   help="start GSM from the trained dense model (the official pipeline) or from init")
    p.add_argument("--dataset", choices=["mnist1d", "digits"], default="mnist1d",
                   help="MNIST-1D (generated, --samples) or scikit-learn's bundled 8x8 digits (1,797 "
                        "samples, 80/20 split, seed 0; flattened to 64 inputs, --model lenet only)")
    p.add_argument("--samples", type=int, default=None, help="MNIST-1D samples (default 10000), 80/20 split")
    p.add_argument("--compressions", type=float, nargs="+", default=[10, 30, 60])
    p.add_argument("--model", choices=sorted(MODELS), default="cnn")
    p.add_argument("--methods", nargs="+", default=["gsm", "gsm-sample", "magnitude-ft", "tfmot"],
                   choices=["gsm", "gsm-sample", "magnitude-ft", "tfmot", "dense-small"],
                   help="dense-small: dense nets of the --small-hidden widths, pre-trained and continued "
                        "exactly like the dense control (the capacity baseline)")
    p.add_argument("--small-hidden", type=_widths, nargs="+", default=[(86,), (57, 30)],
                   help="hidden widths of the dense-small baselines, comma-separated per net (86 57,30: "
                        "4,300 and 4,290 kernel weights on MNIST-1D, LeNet-300-100's 43,000 / 10)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the dense control (rows run elsewhere, e.g. baselines added to a run)")
    p.add_argument("--lr", type=float, default=0.1, help="dense SGD-Nesterov(0.9) learning rate")
    p.add_argument("--gsm-lr", type=float, default=0.02, help="GSM learning rate (momentum 0.99)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="dense L2")
    p.add_argument("--gsm-weight-decay", type=float, default=5e-3, help="GSM coupled L2")
    p.add_argument("--gsm-momentum", type=float, default=0.99, help="GSM (and control) momentum")
    p.add_argument("--gsm-schedule", choices=["cosine", "step"], default="cosine",
                   help="GSM phase lr: cosine, or the official warm-up + x0.1 at 4/7, 5/7, 6/7")
    p.add_argument("--gsm-warmup-epochs", type=int, default=0, help="linear warm-up (step schedule only)")
    p.add_argument("--gsm-batch-size", type=int, default=128,
                   help="batch size of the GSM phase, its dense control and the baselines (the dense "
                        "pre-training stays at 128); smaller batches give more steps, hence more decay budget")
    p.add_argument("--gsm-ramp-epochs", type=int, default=0, help="GSM ramp_steps, in epochs")
    p.add_argument("--validation", action="store_true",
                   help="hold out the last 1/8 of the training split and report it instead of the test split")
    p.add_argument("--gsm-decay-scope", choices=["kernels", "all"], default="kernels",
                   help="GSM's L2 scope; 'kernels' = every other row's (kernel_regularizer / tfmot)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--timing-models", nargs="+", default=["mlp", "mobilenet"], choices=sorted(TIMING_MODELS))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "gsm_cnn.json"))
    a = p.parse_args()
    if a.merge:  # seeds run as separate processes, one table
        import json

        parts = [json.loads(pathlib.Path(f).read_text()) for f in a.merge]
        rows = [r for part in parts for r in part["accuracy"]]
        write_results(pathlib.Path(a.out), {"command": "python " + " ".join(sys.argv), "merged": a.merge,
                                            "args": parts[0]["args"], "accuracy": rows})
        print(accuracy_table(rows))
        print()
        print(layer_table(rows))
        return
    started = time.time()
    train, test = load_data(a)  # --validation: tuning never looks at the test split
    results = {"command": "python " + " ".join(sys.argv), "args": vars(a),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "tensorflow": tf.__version__, "keras": keras.__version__,
                           "loadavg_at_start": os.getloadavg()}}
    if not a.skip_timing:
        results["timing"] = []
        for model_name in a.timing_models:
            for batch_size in a.batch_sizes if model_name == "mlp" else a.batch_sizes[:1]:
                results["timing"].append(step_time(*train, reps=a.reps, block=a.block, batch_size=batch_size,
                                                   model_name=model_name))
            print(timing_table(results["timing"][-1]), "\n", flush=True)
    if not a.skip_accuracy:
        rows = []
        data = (train, test)
        workdir = tempfile.mkdtemp(prefix="gsm_bench_")
        results["decay_budget"] = decay_budget(data, a)
        results["gsm_steps"] = a.gsm_epochs * _steps_per_epoch(data, a)
        print(f"GSM phase: {results['gsm_steps']} steps, decay budget {results['decay_budget']:.1f}", flush=True)
        for seed in a.seed_list or range(a.seeds):
            r, weights = run_dense(seed, data, a, a.epochs)
            rows.append(dict(method="dense", compression=0, epochs=a.epochs, seed=seed, **r))
            print(f"seed {seed} dense acc {r['accuracy']:.4f}", flush=True)
            start_from = weights if a.gsm_init == "pretrained" else None
            if a.gsm_init == "pretrained" and not a.no_control:
                # Control: the same extra epochs with GSM's optimizer, no mask.
                r = run_dense_continued(seed, data, a, weights)
                rows.append(dict(method="dense, continued", compression=0, epochs=a.epochs + a.gsm_epochs,
                                 seed=seed, **r))
                print(f"seed {seed} dense continued acc {r['accuracy']:.4f}", flush=True)
            total = a.gsm_epochs + (a.epochs if a.gsm_init == "pretrained" else 0)
            if "dense-small" in a.methods:
                for hidden in a.small_hidden:
                    rows.append(run_dense_small(seed, data, a, hidden, weights, total))
                    r = rows[-1]
                    print(f"seed {seed} {r['method']} acc {r['accuracy']:.4f}", flush=True)
            for c in a.compressions:
                for method in a.methods:
                    if method == "dense-small":
                        continue
                    if method.startswith("gsm"):
                        how = "sample" if method == "gsm-sample" else "histogram"
                        r = run_gsm(c, seed, data, a, weights=start_from, threshold_method=how)
                        name = f"GSM ({a.gsm_init}{', sampled threshold' if how == 'sample' else ''})"
                    elif method == "magnitude-ft":
                        r = run_magnitude_finetune(c, seed, data, a, weights)
                        name = "magnitude prune + fine-tune"
                    else:
                        r = run_tfmot(c, seed, data, a, weights, workdir)
                        name = "tfmot prune_low_magnitude"
                    rows.append(dict(method=name, compression=c, epochs=total, seed=seed, **r))
                    print(f"seed {seed} {name} x{c:g} acc {r['accuracy']} -> {r['accuracy_pruned']:.4f} "
                          f"(sparsity {r['sparsity']:.3f})", flush=True)
        results["accuracy"] = rows
        print()
        print(accuracy_table(rows))
        print()
        print(layer_table(rows))
    results["seconds"] = time.time() - started
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, results)
    print(f"\nwrote {out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
