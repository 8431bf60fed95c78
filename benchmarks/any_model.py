"""Any Keras 3 model: a ViT-style classifier, and the MLPerf Tiny reference networks.

    python benchmarks/any_model.py --vit --seeds 3 --epochs 20
    python benchmarks/any_model.py --mlperf

`--vit`: `tfs.zoo.mnist1d_vit` (patch Conv1D, position Embedding, 2 blocks of
MultiHeadAttention + GELU FFN with residual `+`) on MNIST-1D. Every row
trains with Adam (cosine decay, batch 128) for the same epochs; its learning
rate is chosen among `--lrs` by the dense model's accuracy on a validation
split (the last 20 % of the training data, seed 0), then every row trains on
the whole training split and the test split is evaluated once. Rows: dense; STR's soft
threshold with one shared level steered to 90 / 95 % (`learn_threshold=False`
+ `TargetSparsity`, our variant; patch and position embeddings kept dense); GSM at compression 10 (Adam's step is
replaced by GSM's momentum step: `tfs.recipes.gsm_optimizer`); SynFlow at
compression 10 then trained; heads + FFN units: the trained dense model cut
by `l1_norm_prune` to 0.5 of its MACs (attention heads and FFN hidden units
are its groups), then fine-tuned `--finetune-epochs` at the same rate. Reported: test accuracy (mean +- std over
seeds), overall sparsity, sparsity of the attention projections (the four
EinsumDense kernels inside each MultiHeadAttention), LiteRT float invoke time
as a ratio to dense (medians, interleaved in the same run) and the full-int8
LiteRT file size.

`--mlperf`: the four MLPerf Tiny networks (`tfs.zoo.mlperf_tiny_*`), random
initialization, BatchNorm statistics from generated inputs of their shapes
(their datasets cannot be downloaded). Rows: dense; unstructured 90 % in
every layer (magnitude, what STR / GSM / SynFlow give a device); L1-norm
channel pruning and greedy selection (reconstruction objective, our
variant) at 0.5 MACs.
Each is exported full int8 for TFLM; file bytes, arena bytes and invoke time
(tflite-micro host interpreter, medians, interleaved) as ratios to dense.
"""

from common import parser, write_results, RESULTS  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.experiments import train_classifier  # noqa: E402
from export_targets import litert_invoker, time_interleaved, tflm_invoker  # noqa: E402


def attention_sparsity(model):
    kernels = [k for l in tfs.prunable.iter_layers(model) if isinstance(l, keras.layers.MultiHeadAttention)
               for k in tfs.prunable.prunable_kernels(l)]
    zeros = sum(int(np.sum(keras.ops.convert_to_numpy(k) == 0)) for k in kernels)
    return zeros / max(1, sum(int(np.prod(k.shape)) for k in kernels))


def adam(lr, epochs, steps):
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, epochs * steps))


def select_lr(a, train):
    """The dense ViT's best Adam learning rate on a validation split cut from `train`."""
    x, y = train
    cut = int(0.8 * len(x))
    fit, val = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    steps = int(np.ceil(cut / 128))
    scores = {}
    for lr in a.lrs:
        keras.utils.set_random_seed(0)
        scores[lr] = train_classifier(tfs.zoo.mnist1d_vit(), fit, val, epochs=a.epochs,
                                      optimizer=adam(lr, a.epochs, steps))["accuracy"]
        print(f"lr {lr}: validation accuracy {scores[lr]:.4f}", flush=True)
    return max(scores, key=scores.get), scores


def vit_rows(a):
    train, test = tfs.datasets.mnist1d()
    steps = int(np.ceil(len(train[0]) / 128))
    lr, a.validation = select_lr(a, train)
    rows = []
    for seed in range(a.seeds):
        models = {}
        for method in ("dense", "str90", "str95", "gsm10", "synflow10", "l1_heads_ffn_0.5"):
            keras.utils.set_random_seed(seed)
            base = tfs.zoo.mnist1d_vit()
            callbacks, optimizer, model = [], adam(lr, a.epochs, steps), base
            if method.startswith("str"):
                # The patch and position embeddings are small in magnitude: one shared level
                # empties them first (measured: positions at step 40, patches at 95 %).
                model = tfs.soft_threshold(base, learn_threshold=False, shrink=False, skip=["positions", "patches"])
                callbacks = [tfs.callbacks.TargetSparsity(int(method[3:]) / 100)]
            elif method == "gsm10":
                optimizer = tfs.recipes.gsm_optimizer(a.epochs * steps, compression=10)
            elif method == "synflow10":
                model = tfs.prune_at_init(base, "synflow", compression=10, verbose=0)
            elif method.startswith("l1"):
                model = tfs.pruning.l1_norm_prune(models["dense"], flops=0.5)
            epochs = a.finetune_epochs if method.startswith("l1") else a.epochs
            optimizer = adam(lr, epochs, steps) if method.startswith("l1") else optimizer
            result = train_classifier(model, train, test, epochs=epochs, callbacks=callbacks, optimizer=optimizer)
            if method == "gsm10":
                tfs.optimizers.final_prune(model)
                result["accuracy"] = float(model.evaluate(*test, verbose=0, batch_size=512)[1])
            plain = tfs.strip(model)
            models[method] = plain
            int8 = tfs.export.convert(plain, target="litert", quantize="int8", representative_data=train[0][:200])
            rows.append({"seed": seed, "method": method, "lr": lr, "accuracy": result["accuracy"],
                         "macs_ratio": tfs.summary(plain, print_fn=None).flops / tfs.summary(
                             models["dense"], print_fn=None).flops,
                         "sparsity": tfs.sparsity(plain), "attention_sparsity": attention_sparsity(plain),
                         "int8_bytes": len(int8.tflite)})
            print(rows[-1], flush=True)
        floats = {m: tfs.export.convert(p, target="litert", representative_data=train[0][:16]).tflite
                  for m, p in models.items()}
        times = time_interleaved({m: litert_invoker(t) for m, t in floats.items()}, runs=200, rounds=5)
        for row in rows[-len(models):]:
            row["litert_float_time_ratio"] = times[row["method"]] / times["dense"]
    return rows


def mlperf_rows(a):
    rows = []
    rng = np.random.default_rng(0)
    for name in ("mlperf_tiny_dscnn", "mlperf_tiny_mobilenet", "mlperf_tiny_resnet8", "mlperf_tiny_autoencoder"):
        keras.utils.set_random_seed(0)
        dense = getattr(tfs.zoo, name)()
        x = rng.standard_normal((64, *dense.input_shape[1:])).astype("float32")
        tfs.recalibrate_batchnorm(dense, x, batch_size=len(x))
        # Unstructured 90 % in every layer (a shared level on random weights empties whole
        # layers: the export then folds a constant network, which says nothing).
        unstructured = tfs.strip(tfs.prune_at_init(dense, "magnitude", sparsity=0.9, scope="layerwise", verbose=0))
        variants = {"dense": dense, "magnitude_layerwise_0.9": unstructured,
                    "l1_0.5": tfs.pruning.l1_norm_prune(dense, flops=0.5),
                    "greedy_reconstruction_0.5": tfs.greedy_prune(dense, x, objective="reconstruction", flops=0.5,
                                                                  verbose=0)}
        quant = {"weight_quantization": "per_tensor"} if name.endswith("autoencoder") else {}
        files, reports = {}, {}
        for key, model in variants.items():
            result = tfs.export.convert(model, target="tflm", quantize="int8", representative_data=x, **quant)
            files[key], reports[key] = result.tflite, result.report
        times = time_interleaved({k: tflm_invoker(t) for k, t in files.items()}, runs=20, rounds=5, warmup=3)
        dense_macs = tfs.summary(dense, print_fn=None).flops
        for key, model in variants.items():
            rows.append({"network": name, "method": key,
                         "macs_ratio": tfs.summary(model, print_fn=None).flops / dense_macs,
                         "bytes": len(files[key]), "arena": reports[key].tflm.get("arena_bytes"),
                         "invoke_ms": times[key] * 1e3,
                         "speedup": times["dense"] / times[key], "smaller": len(files["dense"]) / len(files[key])})
            print(rows[-1], flush=True)
    return rows


def vit_table(rows):
    lines = ["| method | accuracy % (mean ± std) | sparsity | attention sparsity | MACs / dense "
             "| LiteRT float time / dense | int8 bytes |", "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        acc = np.array([r["accuracy"] for r in rs]) * 100
        lines.append(f"| {method} | {acc.mean():.2f} ± {acc.std():.2f} | {np.mean([r['sparsity'] for r in rs]):.3f} "
                     f"| {np.mean([r['attention_sparsity'] for r in rs]):.3f} | {np.mean([r['macs_ratio'] for r in rs]):.3f} "
                     f"| {np.median([r['litert_float_time_ratio'] for r in rs]):.2f} "
                     f"| {int(np.mean([r['int8_bytes'] for r in rs])):,} |")
    return lines


def mlperf_table(rows):
    lines = ["| network | method | MACs / dense | TFLM int8 bytes | arena | invoke ms | speed-up | smaller |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['method']} | {r['macs_ratio']:.3f} | {r['bytes']:,} | {r['arena']:,} "
              f"| {r['invoke_ms']:.2f} | {r['speedup']:.2f}x | {r['smaller']:.2f}x |" for r in rows]
    return lines


def main():
    p = parser(__doc__)
    p.add_argument("--vit", action="store_true")
    p.add_argument("--mlperf", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--lrs", type=lambda s: [float(v) for v in s.split(",")], default=[3e-3, 1e-3])
    a = p.parse_args()
    if a.mlperf:
        rows = mlperf_rows(a)
        lines = mlperf_table(rows)
        print("\n".join(lines))
        write_results(RESULTS / "any_model_mlperf.json", {"args": vars(a), "rows": rows, "table": lines})
    if a.vit:
        rows = vit_rows(a)
        lines = vit_table(rows)
        print("\n".join(lines))
        write_results(RESULTS / "any_model_vit.json", {"args": vars(a), "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
