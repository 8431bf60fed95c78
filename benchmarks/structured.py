"""Structured pruning on the MNIST-1D CNN at equal FLOPs: channel-STR vs greedy vs L1 vs random.

    python benchmarks/structured.py --seeds 3 --epochs 20
    python benchmarks/structured.py --apps            # keras.applications timing only
    python benchmarks/structured.py --groups --seeds 3 --epochs 10 --finetune-epochs 3   # 1-D ResNet / MobileNet

Per seed: train the dense CNN (SGD-Nesterov 0.1, cosine, 20 epochs, L2 5e-4).
Channel-STR trains from scratch for the same epochs with
`granularity="channel"`, the hard group mask (`shrink=False`,
`learn_threshold=False`) and `TargetSparsity(--channel-target)`; `tfs.strip`
removes the zeroed filters and its MACs ratio f sets the budget of the others:
greedy (local / global with Taylor ranking / auto), L1-norm and random channel
selection prune the dense model to `flops=f`, each followed by the same
imitation fine-tune (`--finetune-steps` Adam steps on the dense model's
outputs). Two more rows: channel-STR with the shrinking group soft threshold
(`shrink=True`, STR's proximal step), and the stripped channel-STR
architecture re-initialized and trained from scratch like the dense model
(does STR pick the channels, or is the narrower network simply better?).

Every final model is exported with `tfs.export.convert(target="tflm")` (int8)
and timed on tflite-micro (host build, Python-driven): median invoke time,
rounds interleaved across the seed's models so load on the shared machine
hits all alike.
"""

import time

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from export_targets import litert_invoker, time_interleaved, tflm_invoker  # noqa: E402  (benchmarks/ is on sys.path)



def evaluate(model, test):
    """Accuracy of `model` (logits) on `test` = (x, y)."""
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return float(model.evaluate(*test, verbose=0, batch_size=512)[1])


def random_channels(model, flops, x, steps, seed):
    """Random channels of every dependency group (`tfs.pruning.random_prune`)."""
    return tfs.pruning.random_prune(model, flops=flops, data=x, finetune_steps=steps, seed=seed)


def applications(a):
    """Time L1 and greedy ("reconstruction") on keras.applications nets; the MACs they reach.

    weights=None, `--apps-size` square inputs, 10 classes, `--apps-samples`
    standard-normal inputs for greedy (no labels are used), budget 0.5 and 0.3.
    """
    rows = []
    for name in a.apps_nets:
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, input_shape=(a.apps_size, a.apps_size, 3),
                                                  classes=10)
        dense = tfs.summary(model, print_fn=None).flops
        x = np.random.default_rng(0).normal(size=(a.apps_samples, a.apps_size, a.apps_size, 3)).astype("float32")
        for budget in (0.5, 0.3):
            for method, make in (
                    ("l1-norm", lambda: tfs.pruning.l1_norm_prune(model, flops=budget)),
                    ("greedy (reconstruction)", lambda: tfs.greedy_prune(
                        model, x, objective="reconstruction", flops=budget, tolerance=0.0,
                        batch_size=a.apps_samples, verbose=0))):
                start = time.perf_counter()
                small = make()
                seconds = time.perf_counter() - start
                rows.append({"network": name, "method": method, "asked": budget, "seconds": seconds,
                             "macs": tfs.summary(small, print_fn=None).flops / dense})
                print(f"{name} {method} asked {budget}: MACs {rows[-1]['macs']:.3f} in {seconds:.0f} s", flush=True)
    lines = ["| network | method | MACs asked | MACs reached | time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['method']} | {r['asked']} | {r['macs']:.3f} | {r['seconds']:.0f} |" for r in rows]
    print("\n".join(lines))
    write_results(HERE / "results" / "structured_apps.json", {"args": vars(a), "rows": rows, "table": lines})


def channel_str(epochs, target, shrink, train, test):
    """Channel-STR from scratch (logits left dense), stripped to the smaller model.

    Per-layer channel thresholds (`channel_groups=False`), as the rows in
    docs/benchmarks.md were measured; with the logits skipped, the group form
    would leave fc1's group alone. Channel-STR over dependency groups:
    benchmarks/structured_str.py.
    """
    model = tfs.soft_threshold(tfs.zoo.mnist1d_cnn(), granularity="channel", weight_decay=5e-4,
                               learn_threshold=False, shrink=shrink, skip=["logits"], channel_groups=False)
    train_classifier(model, train, test, epochs=epochs, callbacks=[tfs.callbacks.TargetSparsity(target)])
    return tfs.strip(model)


def retrained(model, train, test, epochs, weight_decay=5e-4):
    """`model`'s architecture re-initialized and trained with the dense recipe."""
    def fresh(layer):
        config = layer.get_config()
        if "kernel_regularizer" in config:  # coupled L2, as tfs.zoo puts on the dense model
            config["kernel_regularizer"] = keras.regularizers.L2(weight_decay / 2)
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=fresh)
    train_classifier(new, train, test, epochs=epochs)
    return new


GROUP_METHODS = ("l1-norm (uniform)", "l1-norm (global)", "random", "greedy (reconstruction)",
                 "greedy (reconstruction, global)",
                 "channel-STR (groups)", "channel-STR (groups, MACs target)", "greedy (loss, budget stop)",
                 "greedy (loss, 98% stop)")


def str_target(a, net, budget):
    """`--str-targets` "net:budget:target" entries: channel-STR's weight-sparsity target for a MACs budget."""
    for entry in a.str_targets:
        n, b, t = entry.split(":")
        if n == net and abs(float(b) - budget) < 1e-9:
            return float(t)
    raise ValueError(f"--str-targets has no entry for {net} at flops={budget} (expected 'net:budget:target')")


def group_pruned(method, dense, budget, train, a, seed, val=None, net=None):
    """One pruned model of `group_nets` (before the shared fine-tune)."""
    x, y = train
    if method == "channel-STR (groups)":  # from scratch, same epochs as dense, then strip
        from structured_str import channel_str as str_groups

        sparse, _, _ = str_groups(net, str_target(a, net, budget), True, train, val, a.epochs)
        return tfs.strip(sparse)
    if method == "channel-STR (groups, MACs target)":  # the same, steered by TargetFlops(budget)
        from structured_str import channel_str as str_groups

        sparse, _, _ = str_groups(net, None, True, train, val, a.epochs, flops=budget)
        return tfs.strip(sparse)
    if method == "l1-norm (uniform)":
        return tfs.pruning.l1_norm_prune(dense, flops=budget)
    if method == "l1-norm (global)":
        return tfs.pruning.l1_norm_prune(dense, flops=budget, allocation="global")
    if method == "random":
        return tfs.pruning.random_prune(dense, flops=budget, seed=seed)
    if method == "greedy (reconstruction)":
        return tfs.greedy_prune(dense, x[:512], objective="reconstruction", flops=budget, tolerance=0.0,
                                batch_size=512, verbose=0, seed=seed)
    if method == "greedy (reconstruction, global)":  # one relative-error level across groups
        return tfs.greedy_prune(dense, x[:512], objective="reconstruction", flops=budget, tolerance=0.0,
                                batch_size=512, verbose=0, seed=seed, allocation="global")
    if method == "greedy (loss, budget stop)":  # the paper's selection, stopped by the MACs cap
        return tfs.greedy_prune(dense, (x, y), objective="loss", flops=budget, accuracy_fraction=None,
                                candidates=a.candidates, batch_size=a.loss_batch, finetune_steps=a.between_steps,
                                verbose=0, seed=seed)
    if method == "greedy (loss, 98% stop)":  # the paper's selection and stop rule, no MACs budget
        return tfs.greedy_prune(dense, (x, y), objective="loss", accuracy_fraction=0.98,
                                candidates=a.candidates, batch_size=a.loss_batch, finetune_steps=a.between_steps,
                                verbose=0, seed=seed)
    raise ValueError(method)


def exported(models, x, a):
    """TFLM int8 bytes / arena / invoke and LiteRT float invoke per model (timings interleaved)."""
    from tf_sparsity.export import runtimes

    tflm, litert, out = {}, {}, {}
    for name, model in models.items():
        try:
            r = tfs.export.convert(model, target="tflm", representative_data=x[:256])
        except tfs.export.ExportError as error:  # recorded in the row and the table, timing skipped
            out[name] = {"export_error": str(error)[:300]}
            print(f"{name}: export failed: {str(error)[:300]}", flush=True)
            continue
        tflm[name] = r.tflite
        edgetpu = tfs.export.inspect(r.tflite).verdict("edgetpu")
        out[name] = {"tflm_bytes": len(r.tflite), "tflm_arena": r.report.tflm.get("arena_bytes"),
                     "edgetpu_ok": edgetpu.ok, "edgetpu_tpu_ops": edgetpu.tpu_ops, "edgetpu_cpu_ops": edgetpu.cpu_ops}
        litert[name] = tfs.export.convert(model, target="litert").tflite
    with runtimes.captured_stderr():
        t_tflm = time_interleaved({k: tflm_invoker(v) for k, v in tflm.items()}, a.tflm_runs, a.tflm_rounds, warmup=5)
    t_lite = time_interleaved({k: litert_invoker(v) for k, v in litert.items()}, a.tflm_runs * 5, a.tflm_rounds,
                              warmup=20)
    for name in tflm:
        out[name].update(tflm_us=t_tflm[name] * 1e6, litert_us=t_lite[name] * 1e6,
                         tflm_speedup=t_tflm["dense"] / t_tflm[name], litert_speedup=t_lite["dense"] / t_lite[name])
    return out


def export_error(model, x):
    """None if `model` converts for the TFLM target, else the converter's message (first 300 characters)."""
    try:
        tfs.export.convert(model, target="tflm", representative_data=x[:256])
    except Exception as error:  # recorded in the results, not hidden
        return f"{type(error).__name__}: {error}"[:300]
    return None


def group_table(rows):
    """The markdown table of `group_nets` rows (mean over seeds)."""
    lines = ["| net | method | MACs asked | MACs reached | params | test accuracy % (mean ± std) | before fine-tune % "
             "| TFLM int8 bytes | TFLM arena | TFLM invoke vs dense | LiteRT invoke vs dense | EdgeTPU preflight "
             "| pruning time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["net"], r["method"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["net"], r["method"], r["budget"]) == key]
        acc = np.array([r["accuracy"] for r in group]) * 100
        pre = np.array([r.get("accuracy_before_finetune", r["accuracy"]) for r in group]) * 100
        mean = lambda k: np.mean([r[k] for r in group if k in r]) if any(k in r for r in group) else float("nan")  # noqa: E731
        timed = sum("tflm_us" in r for r in group)
        n_timed = f" (n={timed})" if timed < len(group) else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2] if key[1] != 'dense' else '—'} | {mean('flops'):.3f} | "
                     f"{mean('params'):.3f} | {acc.mean():.2f} ± {acc.std():.2f} (n={len(acc)}) | {pre.mean():.2f} | "
                     f"{mean('tflm_bytes'):,.0f} | {mean('tflm_arena'):,.0f} | {mean('tflm_speedup'):.2f}×{n_timed} | "
                     f"{mean('litert_speedup'):.2f}× | {edgetpu_cell(group)} | {mean('seconds'):.0f} |")
    return lines


def edgetpu_cell(group):
    """"OK (n TPU ops / m CPU)" or "NO (...)" over the seeds' EdgeTPU verdicts; "—" if not exported."""
    group = [r for r in group if "edgetpu_ok" in r]
    if not group:
        return "—"
    verdicts = sorted({(r["edgetpu_ok"], r["edgetpu_tpu_ops"], r["edgetpu_cpu_ops"]) for r in group}, key=str)
    return ", ".join(f"{'OK' if ok else 'NO'} ({tpu} TPU / {cpu} CPU ops)" for ok, tpu, cpu in verdicts)


def group_data(a):
    """MNIST-1D (`--samples`): train minus the last `--val` of it, the validation split, the test split."""
    (x_all, y_all), test = tfs.datasets.mnist1d(num_samples=a.samples)
    cut = len(x_all) - int(a.val * len(x_all))
    return (x_all[:cut], y_all[:cut]), (x_all[cut:], y_all[cut:]), test


def copied(model):
    new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    return new


def group_nets(a):
    """Dependency-group pruning on the zoo's 1-D ResNet and 1-D MobileNetV2-style net (MNIST-1D).

    Per net and seed: train dense (`--epochs`, SGD-Nesterov 0.1 cosine, L2
    5e-4) on the training split minus a validation split (`--val`), or load it
    (`--dense-dir`, where every run saves it); prune to each `--budgets`
    fraction of the dense MACs with each of `--methods`; fine-tune every
    pruned model the same way (`--finetune-epochs` with the labels,
    SGD-Nesterov `--finetune-lr` cosine); test accuracy once at the end.
    "greedy (loss, ...)" is the paper's selection (`objective="loss"`,
    `--candidates` per step on minibatches of `--loss-batch`, `--between-steps`
    SGD steps between groups);
    "greedy (loss, 98% stop)" has no MACs budget (run once, budget "none");
    "greedy (reconstruction)" is our least-squares variant (", global": one
    relative-error level across groups instead of a uniform width); "channel-STR
    (groups)" trains from scratch with the weight-sparsity target
    `--str-targets` gives for the budget, then `tfs.strip`. Export: TFLM int8
    (file bytes, arena, invoke, EdgeTPU preflight of the same file) and
    LiteRT float32 (invoke), ratios to the dense model of the same seed,
    timings interleaved. The results file is rewritten after every row.
    """
    import pathlib

    train, val, test = group_data(a)
    rows = []

    def save(partial=True):
        write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows, "partial": partial})

    for net in a.nets:
        for seed in range(a.seed_start, a.seed_start + a.seeds):
            keras.utils.set_random_seed(seed)
            path = pathlib.Path(a.dense_dir) / f"{net}_s{seed}_e{a.epochs}.keras" if a.dense_dir else None
            if path is not None and path.exists():
                dense, fit = keras.models.load_model(path), {"accuracy": None}
                dense_val = evaluate(dense, val)
            else:
                dense = getattr(tfs.zoo, net)(weight_decay=5e-4)
                dense_val = train_classifier(dense, train, val, epochs=a.epochs)["accuracy"]
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    dense.save(path)
            dense_summary = tfs.summary(dense, print_fn=None)
            models = {"dense": dense}
            rows.append({"net": net, "method": "dense", "budget": 1.0, "seed": seed, "val": dense_val,
                         "accuracy": evaluate(dense, test), "flops": 1.0, "params": 1.0, "seconds": 0})
            print(f"{net} seed {seed} dense: val {dense_val:.4f} test {rows[-1]['accuracy']:.4f}", flush=True)
            save()
            for budget in a.budgets:
                for method in a.methods:
                    if method == "greedy (loss, 98% stop)" and budget != a.budgets[0]:
                        continue  # no MACs budget: once per seed
                    keras.utils.set_random_seed(seed)
                    start = time.perf_counter()
                    small = group_pruned(method, dense, budget, train, a, seed, val=val, net=net)
                    seconds = time.perf_counter() - start
                    before = evaluate(small, test)
                    fit = train_classifier(small, train, val, epochs=a.finetune_epochs, learning_rate=a.finetune_lr)
                    s = tfs.summary(small, print_fn=None)
                    shown = "none" if method == "greedy (loss, 98% stop)" else budget
                    key = f"{method} @{shown}"
                    models[key] = small
                    rows.append({"net": net, "method": method, "budget": shown, "seed": seed, "seconds": seconds,
                                 "val": fit["accuracy"], "accuracy": evaluate(small, test),
                                 "accuracy_before_finetune": before, "key": key,
                                 "flops": s.flops / dense_summary.flops, "params": s.params / dense_summary.params})
                    print(f"{net} seed {seed} {key}: test {rows[-1]['accuracy']:.4f} (before fine-tune {before:.4f}) "
                          f"MACs {rows[-1]['flops']:.3f} params {rows[-1]['params']:.3f} ({seconds:.0f} s)", flush=True)
                    save()
            if a.tflm_runs:
                export = exported(models, train[0], a)
                for r in rows:
                    if r["net"] == net and r["seed"] == seed:
                        r.update(export[r.get("key", "dense")])
                save()
    lines = group_table(rows)
    print("\n".join(lines))
    write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows, "table": lines})


def tune(a):
    """The shared recipe, chosen on the validation split with one seed (`--seed-start`), one net.

    1. dense epochs: each of `--tune-epochs`, best validation accuracy;
    2. fine-tuning after pruning: every (`--tune-finetune-epochs`, `--tune-lr`)
       pair on the `--tune-methods` models at every `--budgets` fraction,
       best mean validation accuracy;
    3. channel-STR's weight-sparsity targets: `--tune-str` targets trained with
       the chosen dense epochs, stripped; the MACs each reaches (and its
       validation accuracy) are recorded, so a target can be read off for each
       budget (interpolation).
    The test split is never used.
    """
    from structured_str import channel_str as str_groups

    train, val, _ = group_data(a)
    net, seed = a.nets[0], a.seed_start
    out = {"net": net, "seed": seed, "dense": [], "finetune": [], "str": []}

    def save():
        write_results(HERE / "results" / a.out, {"args": vars(a), "tuning": out})

    best = None
    for epochs in a.tune_epochs:
        keras.utils.set_random_seed(seed)
        dense = getattr(tfs.zoo, net)(weight_decay=5e-4)
        acc = train_classifier(dense, train, val, epochs=epochs)["accuracy"]
        out["dense"].append({"epochs": epochs, "val": acc})
        print(f"{net} dense {epochs} epochs: val {acc:.4f}", flush=True)
        save()
        if best is None or acc > best[0]:
            best = (acc, epochs, dense)
    out["chosen_epochs"], dense = best[1], best[2]
    a.epochs = best[1]
    for budget in a.budgets:
        for method in a.tune_methods:
            keras.utils.set_random_seed(seed)
            small = group_pruned(method, dense, budget, train, a, seed, val=val, net=net)
            for fe in a.tune_finetune_epochs:
                for lr in a.tune_lr:
                    keras.utils.set_random_seed(seed)
                    acc = train_classifier(copied(small), train, val, epochs=fe, learning_rate=lr)["accuracy"]
                    out["finetune"].append({"budget": budget, "method": method, "epochs": fe, "lr": lr, "val": acc})
                    print(f"{net} {method} @{budget} fine-tune {fe} ep lr {lr}: val {acc:.4f}", flush=True)
                    save()
    scores = {}
    for r in out["finetune"]:
        scores.setdefault((r["epochs"], r["lr"]), []).append(r["val"])
    out["chosen_finetune"] = max(scores, key=lambda k: np.mean(scores[k]))
    print(f"{net}: dense {out['chosen_epochs']} epochs, fine-tune {out['chosen_finetune']}", flush=True)
    dense_flops = tfs.summary(dense, print_fn=None).flops
    for target in a.tune_str:
        keras.utils.set_random_seed(seed)
        sparse, _, _ = str_groups(net, target, True, train, val, a.epochs)
        small = tfs.strip(sparse)
        out["str"].append({"target": target, "macs": tfs.summary(small, print_fn=None).flops / dense_flops,
                           "val": evaluate(small, val), "tflm_export": export_error(small, train[0])})
        print(f"{net} channel-STR target {target}: {out['str'][-1]}", flush=True)
        save()
    save()


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--channel-target", type=float, default=0.6)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--tflm-runs", type=int, default=100, help="TFLM invokes per round per model (0: no export)")
    p.add_argument("--tflm-rounds", type=int, default=5)
    p.add_argument("--apps", action="store_true", help="only time L1 / greedy on keras.applications nets")
    p.add_argument("--apps-size", type=int, default=96)
    p.add_argument("--apps-samples", type=int, default=256)
    p.add_argument("--apps-nets", nargs="+", default=["MobileNetV2", "ResNet50", "EfficientNetB0"])
    p.add_argument("--groups", action="store_true", help="only the 1-D ResNet / MobileNet group benchmark")
    p.add_argument("--nets", nargs="+", default=["mnist1d_resnet", "mnist1d_mobilenet"])
    p.add_argument("--methods", nargs="+", default=list(GROUP_METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5])
    p.add_argument("--samples", type=int, default=10000, help="MNIST-1D samples (80%% train, 20%% test)")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction cut from the training split")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--candidates", type=int, default=50, help="greedy loss: candidates per step (paper: 50)")
    p.add_argument("--loss-batch", type=int, default=128, help="greedy loss: minibatch per step (paper: 128)")
    p.add_argument("--between-steps", type=int, default=10, help="greedy loss: SGD steps between groups")
    p.add_argument("--out", default="structured_groups.json")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (run seeds in parallel processes)")
    p.add_argument("--merge", nargs="+", help="only merge these results/*.json of --groups runs into --out")
    p.add_argument("--dense-dir", help="save / load the --groups dense models here (later runs reuse them)")
    p.add_argument("--str-targets", nargs="+", default=[],
                   help="channel-STR weight-sparsity target per net and budget, 'net:budget:target'")
    p.add_argument("--tune", action="store_true", help="--groups recipe on the validation split (one net, one seed)")
    p.add_argument("--tune-epochs", nargs="+", type=int, default=[10, 20])
    p.add_argument("--tune-finetune-epochs", nargs="+", type=int, default=[3, 8])
    p.add_argument("--tune-lr", nargs="+", type=float, default=[0.01, 0.03])
    p.add_argument("--tune-methods", nargs="+", default=["l1-norm (uniform)", "greedy (reconstruction)"])
    p.add_argument("--tune-str", nargs="+", type=float, default=[0.6, 0.8], help="channel-STR targets to try")
    a = p.parse_args()
    if a.apps:
        return applications(a)
    if a.merge:
        import json

        runs = [json.loads((HERE / "results" / f).read_text()) for f in a.merge]
        rows = [r for run in runs for r in run["rows"]]
        lines = group_table(rows)
        print("\n".join(lines))
        return write_results(HERE / "results" / a.out, {"args": [run["args"] for run in runs], "rows": rows,
                                                        "table": lines})
    if a.tune:
        return tune(a)
    if a.groups:
        return group_nets(a)
    train, test = tfs.datasets.mnist1d(num_samples=10000)
    x = train[0]
    rows = []
    for seed in range(a.seeds):
        keras.utils.set_random_seed(seed)
        dense = tfs.zoo.mnist1d_cnn(weight_decay=5e-4)
        train_classifier(dense, train, test, epochs=a.epochs)
        dense_flops = tfs.summary(dense, print_fn=None).flops
        rows.append({"method": "dense", "seed": seed, "accuracy": evaluate(dense, test), "flops": 1.0, "seconds": 0})
        models = {"dense": dense}
        keras.utils.set_random_seed(seed)
        start = time.perf_counter()
        small = channel_str(a.epochs, a.channel_target, False, train, test)
        f = tfs.summary(small, print_fn=None).flops / dense_flops
        rows.append({"method": "channel-str", "seed": seed, "accuracy": evaluate(small, test), "flops": f,
                     "seconds": time.perf_counter() - start})
        models["channel-str"] = small
        candidates = [
            ("greedy-local", lambda: tfs.greedy_prune(dense, x, objective="local", flops=f, batch_size=512,
                                                      finetune_steps=a.finetune_steps, verbose=0, seed=seed)),
            ("greedy-global", lambda: tfs.greedy_prune(dense, x, objective="global", flops=f, batch_size=512,
                                                       candidates=16, taylor=True, finetune_steps=a.finetune_steps,
                                                       verbose=0, seed=seed)),
            ("greedy-auto", lambda: tfs.greedy_prune(dense, x, objective="auto", flops=f, batch_size=512,
                                                     candidates=16, taylor=True, finetune_steps=a.finetune_steps,
                                                     verbose=0, seed=seed)),
            ("greedy-local (no fine-tune)", lambda: tfs.greedy_prune(dense, x, objective="local", flops=f,
                                                                     batch_size=512, verbose=0, seed=seed)),
            ("l1-norm", lambda: tfs.pruning.l1_norm_prune(dense, flops=f, data=x, finetune_steps=a.finetune_steps,
                                                          seed=seed)),
            ("l1-norm (no fine-tune)", lambda: tfs.pruning.l1_norm_prune(dense, flops=f)),
            ("random", lambda: random_channels(dense, f, x, a.finetune_steps, seed)),
            ("channel-str (shrink=True)", lambda: channel_str(a.epochs, a.channel_target, True, train, test)),
            ("channel-str widths, retrained", lambda: retrained(small, train, test, a.epochs)),
        ]
        for name, make in candidates:
            keras.utils.set_random_seed(seed)
            start = time.perf_counter()
            pruned = make()
            rows.append({"method": name, "seed": seed, "accuracy": evaluate(pruned, test),
                         "flops": tfs.summary(pruned, print_fn=None).flops / dense_flops,
                         "seconds": time.perf_counter() - start})
            models[name] = pruned
        seed_rows = rows[-(len(candidates) + 2):]
        if a.tflm_runs:
            tflite = {name: tfs.export.convert(m, target="tflm", representative_data=x[:256]).tflite
                      for name, m in models.items()}
            times = time_interleaved({k: tflm_invoker(v) for k, v in tflite.items()}, a.tflm_runs, a.tflm_rounds,
                                     warmup=5)
            for r in seed_rows:
                r["tflm_us"], r["tflm_bytes"] = times[r["method"]] * 1e6, len(tflite[r["method"]])
        for r in seed_rows:
            print(f"seed {seed} {r['method']}: acc {r['accuracy']:.4f} flops {r['flops']:.3f} "
                  f"({r['seconds']:.0f} s) tflm {r.get('tflm_us', float('nan')):.0f} us", flush=True)
    lines = ["| method | MACs / dense | accuracy (mean ± std) | pruning time (s) | int8 .tflite bytes "
             "| TFLM invoke µs (vs dense) |", "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        acc = np.array([r["accuracy"] for r in group]) * 100
        tflm = "— | —"
        if all("tflm_us" in r for r in group):
            dense_us = {r["seed"]: r["tflm_us"] for r in rows if r["method"] == "dense"}
            speed = np.mean([dense_us[r["seed"]] / r["tflm_us"] for r in group])
            tflm = (f"{np.mean([r['tflm_bytes'] for r in group]):,.0f} | "
                    f"{np.mean([r['tflm_us'] for r in group]):.0f} ({speed:.2f}×)")
        lines.append(f"| {method} | {np.mean([r['flops'] for r in group]):.3f} | {acc.mean():.2f} ± {acc.std():.2f} "
                     f"(n={len(acc)}) | {np.mean([r['seconds'] for r in group]):.0f} | {tflm} |")
    print("\n".join(lines))
    out = HERE / "results" / "structured.json"
    out.parent.mkdir(exist_ok=True)
    write_results(out, {"args": vars(a), "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
