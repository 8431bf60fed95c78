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
                 "greedy (loss, budget stop)", "greedy (loss, 98% stop)")


def group_pruned(method, dense, budget, train, a, seed):
    """One pruned model of `group_nets` (before the shared fine-tune)."""
    x, y = train
    if method == "l1-norm (uniform)":
        return tfs.pruning.l1_norm_prune(dense, flops=budget)
    if method == "l1-norm (global)":
        return tfs.pruning.l1_norm_prune(dense, flops=budget, allocation="global")
    if method == "random":
        return tfs.pruning.random_prune(dense, flops=budget, seed=seed)
    if method == "greedy (reconstruction)":
        return tfs.greedy_prune(dense, x[:512], objective="reconstruction", flops=budget, tolerance=0.0,
                                batch_size=512, verbose=0, seed=seed)
    if method == "greedy (loss, budget stop)":  # the paper's selection, stopped by the MACs cap
        return tfs.greedy_prune(dense, (x, y), objective="loss", flops=budget, accuracy_fraction=None,
                                candidates=a.candidates, batch_size=128, finetune_steps=a.between_steps,
                                verbose=0, seed=seed)
    if method == "greedy (loss, 98% stop)":  # the paper's selection and stop rule, no MACs budget
        return tfs.greedy_prune(dense, (x, y), objective="loss", accuracy_fraction=0.98,
                                candidates=a.candidates, batch_size=128, finetune_steps=a.between_steps,
                                verbose=0, seed=seed)
    raise ValueError(method)


def exported(models, x, a):
    """TFLM int8 bytes / arena / invoke and LiteRT float invoke per model (timings interleaved)."""
    from tf_sparsity.export import runtimes

    tflm, litert, out = {}, {}, {}
    for name, model in models.items():
        r = tfs.export.convert(model, target="tflm", representative_data=x[:256])
        tflm[name] = r.tflite
        out[name] = {"tflm_bytes": len(r.tflite), "tflm_arena": r.report.tflm.get("arena_bytes")}
        litert[name] = tfs.export.convert(model, target="litert").tflite
    with runtimes.captured_stderr():
        t_tflm = time_interleaved({k: tflm_invoker(v) for k, v in tflm.items()}, a.tflm_runs, a.tflm_rounds, warmup=5)
    t_lite = time_interleaved({k: litert_invoker(v) for k, v in litert.items()}, a.tflm_runs * 5, a.tflm_rounds,
                              warmup=20)
    for name in models:
        out[name].update(tflm_us=t_tflm[name] * 1e6, litert_us=t_lite[name] * 1e6,
                         tflm_speedup=t_tflm["dense"] / t_tflm[name], litert_speedup=t_lite["dense"] / t_lite[name])
    return out


def group_table(rows):
    """The markdown table of `group_nets` rows (mean over seeds)."""
    lines = ["| net | method | MACs asked | MACs reached | params | test accuracy % (mean ± std) | before fine-tune % "
             "| TFLM int8 bytes | TFLM arena | TFLM invoke vs dense | LiteRT invoke vs dense | pruning time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["net"], r["method"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["net"], r["method"], r["budget"]) == key]
        acc = np.array([r["accuracy"] for r in group]) * 100
        pre = np.array([r.get("accuracy_before_finetune", r["accuracy"]) for r in group]) * 100
        mean = lambda k: np.mean([r[k] for r in group]) if all(k in r for r in group) else float("nan")  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {key[2] if key[1] != 'dense' else '—'} | {mean('flops'):.3f} | "
                     f"{mean('params'):.3f} | {acc.mean():.2f} ± {acc.std():.2f} (n={len(acc)}) | {pre.mean():.2f} | "
                     f"{mean('tflm_bytes'):,.0f} | {mean('tflm_arena'):,.0f} | {mean('tflm_speedup'):.2f}× | "
                     f"{mean('litert_speedup'):.2f}× | {mean('seconds'):.0f} |")
    return lines


def group_nets(a):
    """Dependency-group pruning on the zoo's 1-D ResNet and 1-D MobileNetV2-style net (MNIST-1D).

    Per net and seed: train dense (`--epochs`, SGD-Nesterov 0.1 cosine, L2
    5e-4) on the training split minus a validation split (`--val`); prune to
    each `--budgets` fraction of the dense MACs with each of GROUP_METHODS;
    fine-tune every pruned model the same way (`--finetune-epochs` with the
    labels, SGD-Nesterov `--finetune-lr` cosine); test accuracy once at the
    end. "greedy (loss, ...)" is the paper's selection (`objective="loss"`,
    `--candidates` per step, `--between-steps` SGD steps between groups);
    "greedy (reconstruction)" is our least-squares variant. Export: TFLM int8
    (file bytes, arena, invoke) and LiteRT float32 (invoke), ratios to the
    dense model of the same seed, timings interleaved.
    """
    (x_all, y_all), test = tfs.datasets.mnist1d(num_samples=a.samples)
    cut = len(x_all) - int(a.val * len(x_all))
    train, val = (x_all[:cut], y_all[:cut]), (x_all[cut:], y_all[cut:])
    rows = []
    for net in a.nets:
        for seed in range(a.seed_start, a.seed_start + a.seeds):
            keras.utils.set_random_seed(seed)
            dense = getattr(tfs.zoo, net)(weight_decay=5e-4)
            fit = train_classifier(dense, train, val, epochs=a.epochs)
            dense_summary = tfs.summary(dense, print_fn=None)
            models = {"dense": dense}
            rows.append({"net": net, "method": "dense", "budget": 1.0, "seed": seed, "val": fit["accuracy"],
                         "accuracy": evaluate(dense, test), "flops": 1.0, "params": 1.0, "seconds": 0})
            print(f"{net} seed {seed} dense: val {fit['accuracy']:.4f} test {rows[-1]['accuracy']:.4f}", flush=True)
            for budget in a.budgets:
                for method in a.methods:
                    keras.utils.set_random_seed(seed)
                    start = time.perf_counter()
                    small = group_pruned(method, dense, budget, train, a, seed)
                    seconds = time.perf_counter() - start
                    before = evaluate(small, test)
                    fit = train_classifier(small, train, val, epochs=a.finetune_epochs, learning_rate=a.finetune_lr)
                    s = tfs.summary(small, print_fn=None)
                    key = f"{method} @{budget}"
                    models[key] = small
                    rows.append({"net": net, "method": method, "budget": budget, "seed": seed, "seconds": seconds,
                                 "val": fit["accuracy"], "accuracy": evaluate(small, test),
                                 "accuracy_before_finetune": before, "key": key,
                                 "flops": s.flops / dense_summary.flops, "params": s.params / dense_summary.params})
                    print(f"{net} seed {seed} {key}: test {rows[-1]['accuracy']:.4f} (before fine-tune {before:.4f}) "
                          f"MACs {rows[-1]['flops']:.3f} params {rows[-1]['params']:.3f} ({seconds:.0f} s)", flush=True)
            if a.tflm_runs:
                export = exported(models, train[0], a)
                for r in rows:
                    if r["net"] == net and r["seed"] == seed:
                        r.update(export[r.get("key", "dense")])
            write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows, "partial": True})
    lines = group_table(rows)
    print("\n".join(lines))
    write_results(HERE / "results" / a.out, {"args": vars(a), "rows": rows, "table": lines})


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
    p.add_argument("--between-steps", type=int, default=10, help="greedy loss: SGD steps between groups")
    p.add_argument("--out", default="structured_groups.json")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (run seeds in parallel processes)")
    p.add_argument("--merge", nargs="+", help="only merge these results/*.json of --groups runs into --out")
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
