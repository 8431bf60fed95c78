"""STR on the BatchNorm MNIST-1D CNN: the paper's learned per-layer thresholds vs a shared threshold vs tfmot.

    # issue 16 (docs/benchmarks.md): one process per seed S = 0, 1, 2, then merged
    python benchmarks/str_bn_cnn.py --seed-list S --epochs 12 --methods paper-regime str-learned shared \
        --decay-gains 3 --paper-st-decays 0.03 0.05 --trace --out /tmp/str_test_seedS.json
    TFS_BASELINE_PYTHON=/work/venv-baseline/bin/python \
        python benchmarks/str_bn_cnn.py --seed-list S --epochs 12 --no-dense --methods tfmot --out /tmp/tfmot_seedS.json
    python benchmarks/str_bn_cnn.py --merge /tmp/str_test_seed0.json ... --out benchmarks/results/str_bn_cnn.json
    python benchmarks/str_bn_cnn.py --seeds 1 --epochs 12 --validation --targets 0.95 \
        --methods str-learned --decay-gains 1 3 --out /tmp/str_bn_tune.json   # tuning, validation split
    python benchmarks/str_bn_cnn.py --seed-list S --epochs 12 --targets 0.95 0.98 --no-dense --methods paper-steered \
        --decay-gains 5 --decay-max-rates 0.05 --trace --out /tmp/test_ps_seedS.json   # session 6, the paper regime steered

`tfs.zoo.mnist1d_cnn_bn()` (conv-BN-ReLU x3, dense256, dense10; Keras'
Glorot-uniform init for every row), MNIST-1D (`--samples`, 80/20 split),
batch 128, SGD-Nesterov 0.1 with cosine decay, coupled L2 `--weight-decay`
on the kernels for every row. With `--validation` the last 1/8 of the
training split is held out and reported instead of the test split: that is
where hyperparameters are chosen.

Rows (`--methods`):
- `str-learned`: "STR (learned per-layer thresholds, the paper)":
  `soft_threshold(learn_threshold=True)`, steered to the target by the
  decay on `s` (`TargetSparsity(steer="decay")`, no offset while training,
  one final offset to land on the target).
- `str-mean`: "STR, learned per-layer thresholds, per-weight (mean) threshold
  gradient (our variant)": as `str-learned` with
  `threshold_gradient="mean"` (the loss gradient on each `s` divided by the
  layer's kernel entry count) and `threshold_lr_scale` from
  `--threshold-lr-scales`.
- `str-sqrt`: the same with `threshold_gradient="sqrt"` (divided by the
  square root of the entry count).
- `str-learned-offset`: the same thresholds steered by a common offset
  (the package's old steering; an ablation).
- `shared`: "shared-threshold soft pruning": `learn_threshold=False`, one
  threshold level steered by the offset.
- `tfmot`: `prune_low_magnitude` + `PolynomialDecay`, own process
  (`TFS_BASELINE_PYTHON`, a venv with the `baseline` extra); the same model,
  recipe and ramp in tf_keras, BatchNorm recalibrated the same way
  (`_tfmot_worker.py --recalibrate-bn`).
- `paper-regime`: the paper's schedule: `s_init=--paper-s-init` (sigmoid
  gradient exactly 0), sparsity from the decay on `s` alone
  (`threshold_decay=--paper-st-decay`), no steering; one row, whatever
  sparsity it reaches.
- `paper-steered`: the paper regime steered to the target by the paper's
  knob: `s_init=--paper-s-init`, learned thresholds with the sum gradient
  (the paper's update), `TargetSparsity(steer="decay", decay_rule="ratio")`
  scaling the decay on `s` (base `threshold_decay=--paper-st-decays[0]`)
  so that `s` contracts multiplicatively, at most `--decay-max-rates` in
  `log |s|` per step, until sparsity appears and then follows the ramp;
  one final offset lands on the target as in `str-learned`.
Each row reports accuracy after `tfs.recalibrate_batchnorm` (and as
trained), sparsity, effective MACs / dense MACs and the per-layer budgets;
`--trace` adds per-epoch thresholds, sparsity and dL/dtau per layer.
"""

import os
import pathlib
import tempfile

from common import BASELINE_PYTHON, HERE, parser, write_results, run_tfmot_worker  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  (threshold-gradient probe)

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402

LEARNED = ("str-learned", "str-mean", "str-sqrt", "str-learned-offset")
GRADIENT = {"str-mean": "mean", "str-sqrt": "sqrt"}  # threshold_gradient of each row (default "sum")
NAMES = {
    "dense": "dense",
    "str-learned": "STR (learned per-layer thresholds, the paper), decay-steered",
    "str-learned-offset": "STR (learned per-layer thresholds), offset-steered",
    "str-mean": "STR, learned per-layer thresholds, per-weight (mean) threshold gradient (our variant), decay-steered",
    "str-sqrt": "STR, learned per-layer thresholds, threshold gradient / sqrt(layer size) (our variant), decay-steered",
    "shared": "shared-threshold soft pruning",
    "tfmot": "tfmot magnitude pruning (prune_low_magnitude + PolynomialDecay)",
    "paper-regime": "STR (learned per-layer thresholds, the paper), paper regime: s_init -3200, decay alone, no steering",
    "paper-steered": "STR (learned per-layer thresholds, the paper), paper regime (s_init -3200), decay steered to the "
                     "target (ratio rule)",
}
DECAY_STEERED = ("str-learned", "str-mean", "str-sqrt", "paper-steered")


class ThresholdTrace(keras.callbacks.Callback):
    """Per epoch: each layer's `s`, threshold, sparsity, and the loss gradient on
    its threshold (dL/dtau on a fixed batch of `probe` training samples,
    training mode, regularizers excluded), plus accuracy with BatchNorm on
    batch statistics (training mode) next to the inference-mode one."""

    def __init__(self, x, y, x_val, y_val, probe=2048):
        super().__init__()
        self.x, self.y = tf.constant(x[:probe]), tf.constant(y[:probe])
        self.x_val, self.y_val = x_val, y_val
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        # The probes run in training mode, which moves the BN statistics: restore them after.
        stats = [(v, v.numpy()) for l in tfs.batchnorm.batchnorm_layers(self.model)
                 for v in (l.moving_mean, l.moving_variance)]
        self._probe(epoch, logs)
        for v, value in stats:
            v.assign(value)

    def _probe(self, epoch, logs):
        wrappers = tfs.surgery.wrappers(self.model)
        logits = [w.threshold_logit for w in wrappers]
        with tf.GradientTape() as tape:
            tape.watch([v.value for v in logits])
            out = self.model(self.x, training=True)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(self.y, out)
        grads = tape.gradient(loss, [v.value for v in logits])
        report = tfs.summary(self.model, print_fn=None)
        batch_stats = np.concatenate([self.model(self.x_val[i:i + 500], training=True).numpy()
                                      for i in range(0, len(self.x_val), 500)])
        row = {"epoch": epoch + 1, "val_accuracy": (logs or {}).get("val_accuracy"),
               "accuracy_bn_batch_stats": float(np.mean(np.argmax(batch_stats, -1) == self.y_val)),
               "sparsity": report.sparsity, "layers": {}}
        sparsity = {r.name: r.sparsity for r in report.layers if r.prunable}
        for w, g in zip(wrappers, grads):
            s = float(w.threshold_logit.numpy()) + float(w.threshold_offset.numpy())
            e = np.exp(-abs(s))
            slope = e / (1.0 + e) ** 2  # sigmoid'(s + offset)
            g = 0.0 if g is None else float(g)
            row["layers"][w.layer.name] = {
                "s": float(w.threshold_logit.numpy()), "threshold": w.threshold_value(),
                "sparsity": sparsity.get(w.layer.name), "dL_ds": g,
                "dL_dthreshold": g / slope if slope > 0 else None,
                "kernel_rms": float(np.sqrt(np.mean(np.square(w.kernels[0].numpy()))))}
        self.rows.append(row)


def run_keras(kind, target, seed, data, a, gain=None, st_decay=None, lr_scale=1.0, max_rate=None):
    keras.utils.set_random_seed(seed)
    callbacks = []
    if kind == "dense":
        model = tfs.zoo.mnist1d_cnn_bn(weight_decay=a.weight_decay)
    elif kind == "paper-regime":
        model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn_bn(), s_init=a.paper_s_init, weight_decay=a.weight_decay,
                                   threshold_decay=st_decay)
    elif kind == "paper-steered":
        model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn_bn(), s_init=a.paper_s_init, weight_decay=a.weight_decay,
                                   threshold_decay=a.paper_st_decays[0])
        callbacks = [tfs.callbacks.TargetSparsity(target, end_fraction=a.end_fraction, steer="decay",
                                                  decay_gain=gain, decay_rule="ratio", decay_max_rate=max_rate)]
    else:
        model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn_bn(), s_init=a.s_init, weight_decay=a.weight_decay,
                                   learn_threshold=kind != "shared", threshold_lr_scale=lr_scale,
                                   threshold_gradient=GRADIENT.get(kind, "sum"))
        steer = "decay" if kind in ("str-learned", "str-mean", "str-sqrt") else "offset"
        callbacks = [tfs.callbacks.TargetSparsity(target, end_fraction=a.end_fraction, steer=steer,
                                                  decay_gain=gain or a.decay_gains[0])]
    trace = ThresholdTrace(*data[0], *data[1]) if kind != "dense" and a.trace else None
    result = train_classifier(model, *data, epochs=a.epochs, callbacks=callbacks + ([trace] if trace else []))
    report = tfs.summary(model, print_fn=None)
    # The BN statistics lag the thresholds (docs/str.md): re-estimate them
    # from the training inputs with the weights fixed, for every row.
    tfs.recalibrate_batchnorm(model, data[0][0], batch_size=256)
    _, recalibrated = model.evaluate(*data[1], verbose=0, batch_size=512)
    out = {"accuracy_as_trained": result["accuracy"], "accuracy": float(recalibrated),
           "val_history": result["history"].get("val_accuracy"), "sparsity": report.sparsity,
           "paper_st_decay": st_decay, "trace": trace.rows if trace else None,
           "macs_ratio": report.effective_flops / report.flops if report.flops else None,
           "layer_sparsity": {r.name: r.sparsity for r in report.layers if r.prunable},
           "seconds_per_step": result["seconds_per_step"], "decay_gain": gain,
           "threshold_lr_scale": lr_scale if kind in LEARNED else None, "epochs": a.epochs,
           "decay_max_rate": max_rate}
    if kind != "dense":
        out["logits"] = {w.layer.name: float(w.threshold_logit) for w in tfs.surgery.wrappers(model)}
    if callbacks and getattr(callbacks[0], "mode", None) == "decay":
        out["sparsity_before_finish"] = callbacks[0].sparsity_before_finish
        out["decay_trace"] = callbacks[0].trace
    return out


def run_tfmot(target, seed, npz, a):
    r = run_tfmot_worker("--data", npz, "--sparsity", target, "--seed", seed, "--epochs", a.epochs,
                         "--weight-decay", a.weight_decay, "--end-fraction", a.end_fraction, "--model", "cnn_bn",
                         "--recalibrate-bn")
    r["macs_ratio"] = None  # uniform per-layer sparsity: MACs ratio = 1 - target on these layers
    return r


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-list", type=int, nargs="+", help="run these seeds instead of range(--seeds)")
    p.add_argument("--merge", nargs="+", help="only merge these result files into --out and print the table")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--methods", nargs="+", default=["str-learned", "shared", "tfmot"], choices=sorted(NAMES))
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--s-init", type=float, default=-5.0)
    p.add_argument("--end-fraction", type=float, default=0.7)
    p.add_argument("--decay-gains", type=float, nargs="+", default=[1.0])
    p.add_argument("--decay-max-rates", type=float, nargs="+", default=[0.025],
                   help="paper-steered: largest change of log|s| per step (one row each)")
    p.add_argument("--threshold-lr-scales", type=float, nargs="+", default=[1.0],
                   help="threshold_lr_scale values for the learned rows (one row each)")
    p.add_argument("--paper-s-init", type=float, default=-3200.0)
    p.add_argument("--paper-st-decays", type=float, nargs="+", default=[1e-2],
                   help="threshold_decay values for the paper-regime row (one row each)")
    p.add_argument("--trace", action="store_true", help="per-epoch thresholds, sparsity and dL/dtau per layer")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--validation", action="store_true", help="report a held-out 1/8 of train, not test")
    p.add_argument("--out", default=str(HERE / "results" / "str_bn_cnn.json"))
    a = p.parse_args()
    if a.merge:  # seeds run as separate processes, one table
        import json

        parts = [json.loads(pathlib.Path(f).read_text()) for f in a.merge]
        rows = [r for part in parts for r in part["rows"]]
        merged = [m for f, part in zip(a.merge, parts) for m in part.get("merged", [f])]  # keep the provenance
        write_results(a.out, {"args": parts[0]["args"], "merged": merged, "rows": rows})
        print(table(rows))
        print(trace_table(rows))
        print(trace_table(rows, "paper-regime"))
        print(trace_table(rows, "paper-steered"))
        return
    train, test = tfs.datasets.mnist1d(num_samples=a.samples)
    if a.validation:
        cut = len(train[0]) * 7 // 8
        train, test = (train[0][:cut], train[1][:cut]), (train[0][cut:], train[1][cut:])
    data = (train, test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "data.npz")
        np.savez(npz, x=train[0], y=train[1], x_test=test[0], y_test=test[1])
        for seed in a.seed_list or range(a.seeds):
            if not a.no_dense:
                rows.append(dict(method="dense", target=0.0, seed=seed, **run_keras("dense", None, seed, data, a)))
                print(f"seed {seed} dense {rows[-1]['accuracy']:.4f}", flush=True)
            for st_decay in (a.paper_st_decays if "paper-regime" in a.methods else []):
                rows.append(dict(method="paper-regime", target=None, seed=seed,
                                 **run_keras("paper-regime", None, seed, data, a, st_decay=st_decay)))
                write_results(a.out, {"args": vars(a), "rows": rows, "partial": True})
                print(f"seed {seed} paper-regime st-decay {st_decay} {rows[-1]['accuracy']:.4f} "
                      f"sp {rows[-1]['sparsity']:.4f} {rows[-1]['layer_sparsity']}", flush=True)
            for target in a.targets:
                for kind in a.methods:
                    if kind == "paper-regime":
                        continue
                    for gain, lr_scale, rate in [(g, c, m) for g in (a.decay_gains if kind in DECAY_STEERED else [None])
                                                 for c in (a.threshold_lr_scales if kind in LEARNED else [1.0])
                                                 for m in (a.decay_max_rates if kind == "paper-steered" else [None])]:
                        r = run_tfmot(target, seed, npz, a) if kind == "tfmot" else run_keras(
                            kind, target, seed, data, a, gain, lr_scale=lr_scale, max_rate=rate)
                        rows.append(dict(method=kind, target=target, seed=seed, **r))
                        write_results(a.out, {"args": vars(a), "rows": rows, "partial": True})
                        print(f"seed {seed} {kind} {target} gain {gain} lr-scale {lr_scale} max-rate {rate} acc {r['accuracy']:.4f} "
                              f"(as trained {r.get('accuracy_as_trained')}) "
                              f"sp {r['sparsity']:.4f} before-finish {r.get('sparsity_before_finish')} "
                              f"macs {r.get('macs_ratio')} {r.get('layer_sparsity')}", flush=True)
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, {"args": vars(a), "rows": rows})
    print(table(rows))


def table(rows):
    lines = ["| method | target | accuracy % (mean ± std), BN recalibrated | as trained (stale BN statistics) | "
             "sparsity | sparsity before final offset | "
             "effective MACs / dense | per-layer sparsity conv1/conv2/conv3/fc1/logits |",
             "|---|---|---|---|---|---|---|---|"]
    def key(r):
        return (r["method"], r["target"], r.get("decay_gain") or r.get("paper_st_decay"),
                r.get("threshold_lr_scale") if r.get("threshold_lr_scale") not in (None, 1.0) else None,
                r.get("epochs"), r.get("decay_max_rate"))

    keys = []
    for r in rows:
        if key(r) not in keys:
            keys.append(key(r))
    for method, target, gain, lr_scale, epochs, rate in keys:
        group = [r for r in rows if key(r) == (method, target, gain, lr_scale, epochs, rate)]
        acc = np.array([r["accuracy"] for r in group]) * 100
        raw = [r["accuracy_as_trained"] for r in group if r.get("accuracy_as_trained") is not None]
        raw = f"{100 * np.mean(raw):.2f} ± {100 * np.std(raw):.2f}" if raw else "–"
        sp = np.mean([r.get("sparsity", 0.0) for r in group]) * 100
        before = [r["sparsity_before_finish"] for r in group if r.get("sparsity_before_finish") is not None]
        macs = [r["macs_ratio"] for r in group if r.get("macs_ratio") is not None]
        layers = [r["layer_sparsity"] for r in group if r.get("layer_sparsity")]
        per = ("/".join(f"{100 * np.mean([l[n] for l in layers]):.0f}" for n in layers[0]) if layers else "–")
        knob = "threshold_decay" if method == "paper-regime" else "gain"
        name = NAMES[method] + (f" ({knob} {gain:g})" if gain else "") + (
            f" (threshold_lr_scale {lr_scale:g})" if lr_scale else "") + (
            f" (max rate {rate:g})" if rate else "") + (f", {epochs} epochs" if epochs else "")
        lines.append(f"| {name} | {'-' if target is None else f'{target:.2f}'} | {acc.mean():.2f} ± {acc.std():.2f} "
                     f"(n={len(acc)}) | {raw} | {sp:.1f}% | {f'{100 * np.mean(before):.1f}%' if before else '–'} | "
                     f"{f'{np.mean(macs):.3f}' if macs else '–'} | {per} |")
    return "\n".join(lines)



def trace_table(rows, method="str-learned", seed=0):
    """Per-epoch threshold trace (seed `seed`) of each `method` row with `--trace`:
    overall sparsity, inference-mode vs batch-statistics accuracy, and per layer
    sparsity % / threshold / dL/dtau."""
    out = []
    for r in rows:
        if r["method"] != method or r.get("seed") != seed or not r.get("trace"):
            continue
        layers = list(r["trace"][0]["layers"])
        out += [f"{NAMES[method]}, target {r['target']}, seed {seed}" + (
                    f", threshold_decay {r['paper_st_decay']:g}" if r.get("paper_st_decay") else ""), "",
                "| epoch | sparsity | val acc (stale BN) | acc, BN batch stats | "
                + " | ".join(f"{l}: sparsity / τ / dL/dτ" for l in layers) + " |",
                "|---|---|---|---|" + "---|" * len(layers)]
        for t in r["trace"]:
            cells = []
            for l in layers:
                d = t["layers"][l]
                g = d["dL_dthreshold"]
                cells.append(f"{100 * d['sparsity']:.0f}% / {d['threshold']:.3g} / "
                             f"{'–' if g is None else f'{g:.3g}'}")
            out.append(f"| {t['epoch']} | {100 * t['sparsity']:.1f}% | {100 * (t['val_accuracy'] or 0):.1f} | "
                       f"{100 * t['accuracy_bn_batch_stats']:.1f} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
