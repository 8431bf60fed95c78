"""`tf-sparsity demo`: every method on MNIST-1D, one comparison table."""

import json
import pathlib
import time

import keras

from tf_sparsity import callbacks, datasets, plots, zoo
from tf_sparsity.experiments import train_classifier
from tf_sparsity.pruning.str import soft_threshold
from tf_sparsity.summary import summary


def run_demo(output="demo_out", quick=False, epochs=None, seed=0, verbose=1):
    """Train a dense MNIST-1D CNN and its STR versions; write report.md, JSON and plots.

    Returns the results dict. `quick` is a smoke run (4000 samples, 4 epochs).
    """
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    samples = 4000 if quick else 10000
    epochs = epochs or (4 if quick else 20)
    targets = [0.9] if quick else [0.9, 0.95, 0.98]
    train, test = datasets.mnist1d(num_samples=samples)
    say = print if verbose else (lambda *a, **k: None)
    say(f"MNIST-1D: {len(train[0])} train / {len(test[0])} test samples, {epochs} epochs per run")

    runs = [("dense", None, None)] + [("str", t, False) for t in targets] + [("str-learned", targets[0], True)]
    results, reports, histories = [], {}, {}
    progress = keras.utils.Progbar(len(runs), verbose=verbose, unit_name="run")
    for i, (method, target, learn) in enumerate(runs):
        start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        if method == "dense":
            model = zoo.mnist1d_cnn(weight_decay=5e-4)
            cbs = []
        else:
            model = soft_threshold(zoo.mnist1d_cnn(), weight_decay=5e-4, learn_threshold=learn)
            cbs = [callbacks.TargetSparsity(target), callbacks.SparsityMonitor()]
        result = train_classifier(model, train, test, epochs=epochs, callbacks=cbs, seed=seed)
        report = summary(model, print_fn=None)
        label = method if target is None else f"{method}@{target:.2f}"
        reports[label] = report
        histories[label] = result["history"]
        results.append({
            "method": method, "target": target, "accuracy": result["accuracy"],
            "sparsity": report.sparsity, "params": report.params, "nonzeros": report.nonzeros,
            "flops": report.flops, "effective_flops": report.effective_flops,
            "seconds": time.perf_counter() - start, "summary": report.to_dict(),
        })
        progress.update(i + 1, values=[("acc", result["accuracy"])])

    table = _table(results)
    say("\n" + table)
    best = max((r for r in results if r["method"] == "str"), key=lambda r: r["target"])
    say("\n" + str(reports[f"str@{best['target']:.2f}"]))

    plots.layer_sparsity_bars({k: v for k, v in reports.items() if k != "dense"}, out / "layer_sparsity.png")
    plots.accuracy_vs_sparsity(
        {"STR (TargetSparsity)": [(r["sparsity"], r["accuracy"]) for r in results if r["method"] == "str"]},
        out / "accuracy_vs_sparsity.png", dense_accuracy=results[0]["accuracy"])
    learned = next(k for k in histories if k.startswith("str-learned"))
    plots.threshold_dynamics(histories[learned], out / "str_dynamics.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(
        "# tf_sparsity demo (MNIST-1D)\n\n" + table + "\n\n```\n" + str(reports[f"str@{best['target']:.2f}"])
        + "\n```\n\n![per-layer sparsity](layer_sparsity.png)\n![accuracy](accuracy_vs_sparsity.png)\n"
        "![STR dynamics](str_dynamics.png)\n")
    say(f"\nWrote {out / 'report.md'}, results.json and plots.")
    return results


def _table(results):
    lines = ["| method | target | accuracy | sparsity | nonzero / prunable weights | MACs (effective / dense) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        target = "-" if r["target"] is None else f"{r['target']:.2f}"
        lines.append(
            f"| {r['method']} | {target} | {r['accuracy'] * 100:.2f}% | {r['sparsity'] * 100:.1f}% | "
            f"{r['nonzeros']:,} / {r['summary']['prunable']:,} | {r['effective_flops']:,} / {r['flops']:,} |")
    return "\n".join(lines)
