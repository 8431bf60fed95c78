"""`tf-sparsity demo`: every method on MNIST-1D, exported to every target, one table."""

import json
import pathlib
import time

import keras
import numpy as np

from tf_sparsity import callbacks, datasets, export, plots, recipes, zoo
from tf_sparsity.experiments import train_classifier
from tf_sparsity.export import runtimes
from tf_sparsity.layers.low_rank import LowRankGRU
from tf_sparsity.optimizers import final_prune
from tf_sparsity.pruning.at_init import prune_at_init
from tf_sparsity.pruning.greedy import greedy_prune
from tf_sparsity.summarize import summary
from tf_sparsity.surgery import strip


def _methods(quick, epochs, steps_per_epoch):
    """(name, target, build) triples; `build(dense)` returns (model, train kwargs, finish)."""
    targets = [0.9] if quick else [0.9, 0.95, 0.98]

    def str_run(target, learn, granularity="weight"):
        def build(dense):
            # Blocks are kept whole (shrink=False): measured far better than shrinking them.
            model = recipes.str_model(zoo.mnist1d_cnn(), learn_threshold=learn, granularity=granularity,
                                      block_shape=(4, 1), shrink=granularity == "weight")
            steer = callbacks.TargetSparsity(target, begin_step=recipes.STR_WARMUP_EPOCHS * steps_per_epoch)
            return model, {"callbacks": [steer, callbacks.SparsityMonitor()]}, strip
        return build

    def gsm(dense):
        # As in the official pipeline: GSM continues from the trained dense
        # weights; coupled L2 5e-3 drives the unselected weights to ~0.
        model = zoo.mnist1d_cnn()  # no kernel_regularizer: GSM applies the L2 itself
        model.set_weights(dense.get_weights())
        optimizer = recipes.gsm_optimizer(epochs * steps_per_epoch, sparsity=0.9)
        return model, {"optimizer": optimizer}, lambda m: final_prune(m) or m

    def lowrank_gru(dense):
        # MNIST-1D as a 40-step sequence; TargetSparsity steers the ranks
        # (0.75 of the factor weights removed ~ rank 1/4 of max_rank).
        inputs = keras.Input((40, 1))
        # Relative, exponential threshold steered from far below (see docs/low_rank.md).
        hidden = LowRankGRU(32, name="lowrank_gru", **recipes.LOW_RANK_STR)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden), name="lowrank_gru_net")
        # Constant learning rate and the default ramp: measured better at 15 epochs than the
        # benchmark's cosine + ramp to 0.5 (recipes.py, docs/benchmarks.md).
        return model, {"optimizer": recipes.low_rank_optimizer(),
                       "callbacks": [callbacks.TargetSparsity(0.75)]}, strip

    def synflow(dense):
        model = prune_at_init(zoo.mnist1d_cnn(weight_decay=recipes.DENSE_WEIGHT_DECAY), "synflow", compression=10, verbose=0)
        return model, {}, strip

    runs = [("dense", None, lambda dense: (dense, {}, lambda m: m))]
    runs += [("str-shared", t, str_run(t, False)) for t in targets]
    runs += [("str-block1x4", 0.9, str_run(0.9, False, "block")), ("str-learned", 0.9, str_run(0.9, True)),
             ("gsm", 0.9, gsm), ("synflow", 0.9, synflow)]
    runs += [("greedy", None, None)]  # prunes the trained dense model, no training of its own
    runs += [("lowrank-gru", 0.75, lowrank_gru)]
    return runs


def run_demo(output="demo_out", quick=False, epochs=None, seed=0, verbose=1):
    """Train dense / STR / GSM / SynFlow / greedy / low-rank GRU on MNIST-1D, export each for
    litert, tflm and edgetpu, run them on the real runtimes; write report.md,
    results.json and plots into `output`. Returns the results.

    `quick` is a smoke run (4000 samples, 4 epochs, one STR target).
    """
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    samples = 4000 if quick else 10000
    epochs = epochs or (4 if quick else 15)
    train, test = datasets.mnist1d(num_samples=samples)
    say = print if verbose else (lambda *a, **k: None)
    say(f"MNIST-1D: {len(train[0])} train / {len(test[0])} test samples, {epochs} epochs per run")
    steps = int(np.ceil(len(train[0]) / 128))
    runs = _methods(quick, epochs, steps)
    results, reports, histories = [], {}, {}
    progress = keras.utils.Progbar(len(runs), verbose=verbose, unit_name="method")
    dense = None
    for i, (method, target, build) in enumerate(runs):
        start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        label = method if target is None else f"{method}@{target:.2f}"
        if method == "greedy":
            plain = greedy_prune(dense, train[0][:2048], objective="local", flops=0.5,
                                 finetune_steps=0 if quick else 300, verbose=0, batch_size=512)
            plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
            accuracy = float(plain.evaluate(*test, verbose=0)[1])
        else:
            model, kwargs, finish = build(zoo.mnist1d_cnn(weight_decay=recipes.DENSE_WEIGHT_DECAY) if method == "dense" else dense)
            result = train_classifier(model, train, test, epochs=epochs, **kwargs)
            histories[label] = result["history"]
            trained = summary(model, print_fn=None)  # thresholds and ranks live in the trained layers
            plain = finish(model)
            if method == "dense":
                dense = model
            plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
            accuracy = float(plain.evaluate(*test, verbose=0)[1])
        report = summary(plain, print_fn=None) if method in ("greedy", "gsm") else trained
        reports[label] = report
        ranks = [f" (rank {l.rank})" for l in report.layers if l.rank]
        row = {"method": method, "target": target, "accuracy": accuracy, "sparsity": report.sparsity,
               "rank": ranks[0] if ranks else "",
               "params": report.params, "nonzeros": report.nonzeros, "prunable": report.prunable,
               "flops": report.flops, "effective_flops": report.effective_flops,
               "train_seconds": time.perf_counter() - start, "summary": report.to_dict()}
        row.update(_export_all(plain, label, train[0], out))
        results.append(row)
        progress.update(i + 1, values=[("acc", accuracy)])

    table = _table(results)
    say("\n" + table)
    best = f"str-shared@{max(r['target'] for r in results if r['method'] == 'str-shared'):.2f}"
    say("\n" + str(reports[best]))
    plots.layer_sparsity_bars({k: v for k, v in reports.items() if k.startswith(("str", "gsm", "synflow"))},
                              out / "layer_sparsity.png")
    plots.accuracy_vs_sparsity(
        {m: [(r["sparsity"], r["accuracy"]) for r in results if r["method"] == m]
         for m in dict.fromkeys(r["method"] for r in results) if m not in ("dense", "greedy", "lowrank-gru")},
        out / "accuracy_vs_sparsity.png", dense_accuracy=results[0]["accuracy"])
    plots.threshold_dynamics(histories["str-learned@0.90"], out / "str_dynamics.png")
    plots.learned_ranks(reports["lowrank-gru@0.75"], out / "learned_ranks.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(
        "# tf_sparsity demo (MNIST-1D)\n\n" + table + "\n\n"
        "LiteRT: float, `sparse=\"auto\"`, single thread, median invoke. TFLM and EdgeTPU: full int8; "
        "EdgeTPU is a preflight against Coral's op table (no compiler here).\n\n"
        f"```\n{reports[best]}\n```\n\n"
        "![per-layer sparsity](layer_sparsity.png)\n![accuracy](accuracy_vs_sparsity.png)\n"
        "![STR dynamics](str_dynamics.png)\n![learned ranks](learned_ranks.png)\n")
    say(f"\nWrote {out / 'report.md'}, results.json, .tflite files and plots.")
    return results


def _export_all(model, label, x, out):
    """Export one plain model to the three targets; measure on the runtimes."""
    stem = label.replace("@", "_")
    row = {}
    litert = export.convert(model, target="litert", path=str(out / f"{stem}_litert.tflite"))
    row["litert_bytes"] = litert.report.size_bytes
    row["litert_us"] = runtimes.time_litert(litert.tflite, runs=200) * 1e6
    row["litert_sparse_tensors"] = len(litert.report.sparse_tensors)
    tflm = export.convert(model, target="tflm", quantize="int8", representative_data=x[:200],
                          path=str(out / f"{stem}_tflm_int8.tflite"))
    # Recurrent models go to TFLM as one time step (recurrent="auto"), the state carried by the caller;
    # the head stays in the step model (step_head="joined": one interpreter, the smaller arena). With
    # step_head="separate" file_bytes / arena_bytes would be the two models' sums.
    row["tflm_bytes"] = tflm.report.recurrent.get("file_bytes") or tflm.report.size_bytes
    row["tflm_arena_bytes"] = tflm.report.tflm.get("arena_bytes")
    row["tflm_form"] = tflm.report.recurrent.get("form")
    edgetpu = export.convert(model, target="edgetpu", quantize="int8", representative_data=x[:200])
    verdict = edgetpu.report.preflight
    row["edgetpu_ok"] = bool(verdict is not None and not verdict.problems)
    return row


def _table(results):
    lines = ["| method | target | accuracy | sparsity / rank | nonzero / prunable | MACs (effective / dense) | "
             "LiteRT float bytes | LiteRT µs | TFLM int8 bytes | TFLM arena | EdgeTPU preflight |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = "-" if r["target"] is None else f"{r['target']:.2f}"
        lines.append(
            f"| {r['method']} | {target} | {r['accuracy'] * 100:.2f}% | {r['sparsity'] * 100:.1f}%{r['rank']} | "
            f"{r['nonzeros']:,} / {r['prunable']:,} | {r['effective_flops']:,} / {r['flops']:,} | "
            f"{r['litert_bytes']:,} | {r['litert_us']:.1f} | {r['tflm_bytes']:,}"
            f"{' (' + r['tflm_form'] + ')' if r.get('tflm_form') else ''} | "
            f"{r['tflm_arena_bytes'] or '-':,} | {'pass' if r['edgetpu_ok'] else 'fails'} |")
    return "\n".join(lines)
