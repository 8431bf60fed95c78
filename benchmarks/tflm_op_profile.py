"""Where the int8 tflite-micro invoke time of a dense vs a pruned model goes, op by op.

    python benchmarks/tflm_op_profile.py --dense-dir benchmarks/results/dense_models --seed 0
    python benchmarks/tflm_op_profile.py --untrained           # widths only (L1 uniform widths do not depend on weights)
    python benchmarks/tflm_op_profile.py --whole --seeds 0 1 2 --runs 5 --rounds 200   # whole invokes, 3 seeds

tflite-micro's Python interpreter has no op profiler, so the time of op k is
measured as the difference of two invokes: the model cut after op k (the first
k ops, op k's output as the model output) minus the model cut after op k-1.
Every prefix of every model is timed in interleaved rounds (`--rounds`, each
`--runs` invokes, median), so machine drift hits all alike; a single
difference is noisy (a few µs), sums over op types are not.

Models: the dense `tfs.zoo.mnist1d_mobilenet` (trained, from `--dense-dir`
as `benchmarks/structured.py --groups --dense-dir` saved it, or untrained
with `--untrained`) and its `--methods` ("l1-norm (uniform|global)",
"greedy (reconstruction)", "greedy (reconstruction, global)", and "channel-STR
(groups, MACs target)", trained from scratch for `--epochs` as in structured.py)
pruned at `--budgets` of the dense MACs (no fine-tuning: the invoke time does not depend on the weights' values).
Per op type: time in the dense model, in each pruned model, and the ratio,
next to the MACs ratio of that op type.
"""

import pathlib

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.export import flatbuffer, runtimes  # noqa: E402
from export_targets import time_interleaved, tflm_invoker  # noqa: E402


def prefixes(tflite):
    """[(op type, .tflite of the first k+1 ops with op k's first output as the output)] for every op k."""
    names = [flatbuffer.op_name(flatbuffer.read(tflite), op)[0]
             for op in flatbuffer.read(tflite).subgraphs[0].operators]
    out = []
    for k, name in enumerate(names):
        model = flatbuffer.read(tflite)
        sub = model.subgraphs[0]
        sub.operators = sub.operators[:k + 1]
        sub.outputs = np.array([int(sub.operators[-1].outputs[0])], dtype=np.int32)
        model.signatureDefs = []
        out.append((name, flatbuffer.write(model)))
    return out


def op_macs(tflite):
    """MACs of each op of the main subgraph (conv, depthwise, fully connected; 0 for the rest)."""
    model = flatbuffer.read(tflite)
    sub = model.subgraphs[0]
    shape = lambda i: [int(d) for d in sub.tensors[i].shape]  # noqa: E731
    macs = []
    for op in sub.operators:
        name = flatbuffer.op_name(model, op)[0]
        out = int(np.prod(shape(op.outputs[0])))
        if name == "CONV_2D":
            k = shape(op.inputs[1])  # [out, kh, kw, in]
            macs.append(out * k[1] * k[2] * k[3])
        elif name == "DEPTHWISE_CONV_2D":
            k = shape(op.inputs[1])  # [1, kh, kw, out]
            macs.append(out * k[1] * k[2])
        elif name == "FULLY_CONNECTED":
            macs.append(out * shape(op.inputs[1])[1])
        else:
            macs.append(0)
    return macs


def profile(tflites, runs, rounds):
    """{model: [(op type, seconds, MACs)]} from prefix differences, timings interleaved over all prefixes."""
    cut = {name: prefixes(t) for name, t in tflites.items()}
    invokers = {(name, k): tflm_invoker(t) for name, ps in cut.items() for k, (_, t) in enumerate(ps)}
    invokers.update({(name, "full"): tflm_invoker(t) for name, t in tflites.items()})
    with runtimes.captured_stderr():
        times = time_interleaved(invokers, runs, rounds, warmup=5)
    out = {}
    for name, ps in cut.items():
        macs = op_macs(tflites[name])
        prev, rows = 0.0, []
        for k, (op, _) in enumerate(ps):
            rows.append((op, times[(name, k)] - prev, macs[k]))
            prev = times[(name, k)]
        out[name] = {"ops": rows, "full": times[(name, "full")]}
    return out


def by_type(ops):
    table = {}
    for op, seconds, macs in ops:
        t = table.setdefault(op, [0, 0.0, 0])
        t[0] += 1
        t[1] += seconds
        t[2] += macs
    return table


def pruned_files(a, seed, x):
    """The dense model of `seed` and its `--methods` at `--budgets`: ({name: model}, {name: int8 .tflite}, refused)."""
    keras.utils.set_random_seed(seed)
    if a.untrained:
        dense = getattr(tfs.zoo, a.net)(weight_decay=5e-4)
    else:
        dense = keras.models.load_model(pathlib.Path(a.dense_dir) / f"{a.net}_s{seed}_e{a.epochs}.keras")
    models = {"dense": dense}
    for budget in a.budgets:
        for method in a.methods:
            allocation = "global" if "global" in method else "uniform"
            if method == "channel-STR (groups, MACs target)":  # trained from scratch as structured.py's row
                from structured_str import channel_str

                (x_all, y_all), _ = tfs.datasets.mnist1d(num_samples=4000)
                cut = len(x_all) - int(0.1 * len(x_all))
                keras.utils.set_random_seed(seed)
                sparse, _, _ = channel_str(a.net, None, True, (x_all[:cut], y_all[:cut]),
                                           (x_all[cut:], y_all[cut:]), a.epochs, flops=budget)
                models[f"{method} @{budget}"] = tfs.strip(sparse)
            elif method.startswith("greedy (reconstruction"):  # the same calls as structured.py's rows
                models[f"{method} @{budget}"] = tfs.greedy_prune(
                    dense, x[:512], objective="reconstruction", flops=budget, tolerance=0.0, batch_size=512,
                    verbose=0, seed=seed, allocation=allocation)
            else:
                models[f"{method} @{budget}"] = tfs.pruning.l1_norm_prune(dense, flops=budget,
                                                                          allocation=allocation)
    tflites, refused = {}, {}
    for k, m in models.items():
        try:
            tflites[k] = tfs.export.convert(m, target="tflm", representative_data=x[:256]).tflite
        except tfs.export.VerificationError as error:  # recorded; the timing needs only the file
            refused[k] = str(error)[:300]
            print(f"{k}: verification failed ({refused[k]}); timed unverified", flush=True)
            tflites[k] = tfs.export.convert(m, target="tflm", representative_data=x[:256], verify=False).tflite
    return models, tflites, refused


def whole_speedups(a, x):
    """`--whole`: only whole invokes, every seed's models interleaved finely (`--runs` per turn)."""
    files, macs = {}, {}
    for seed in a.seeds:
        models, tflites, _ = pruned_files(a, seed, x)
        dense_macs = tfs.summary(models["dense"], print_fn=None).flops
        for name, t in tflites.items():
            files[(seed, name)] = t
            macs[(seed, name)] = tfs.summary(models[name], print_fn=None).flops / dense_macs
    invokers = {key: tflm_invoker(t) for key, t in files.items()}
    with runtimes.captured_stderr():
        times = time_interleaved(invokers, a.runs, a.rounds, warmup=5)
    names = list(dict.fromkeys(name for _, name in files))
    lines = ["| model | MACs vs dense | TFLM int8 invoke µs per seed | speed-up per seed | speed-up (mean ± std) |",
             "|---|---|---|---|---|"]
    rows = {}
    for name in names:
        us = [times[(s, name)] * 1e6 for s in a.seeds]
        up = [times[(s, "dense")] / times[(s, name)] for s in a.seeds]
        rows[name] = {"us": us, "speedup": up, "macs": [macs[(s, name)] for s in a.seeds]}
        lines.append(f"| {name} | {np.mean(rows[name]['macs']):.3f} | {' / '.join(f'{u:.0f}' for u in us)} | "
                     f"{' / '.join(f'{u:.2f}' for u in up)} | {np.mean(up):.2f} ± {np.std(up):.2f}× |")
    print("\n".join(lines))
    write_results(HERE / "results" / a.out, {"args": vars(a), "whole": rows, "table": lines})


def main():
    p = parser(__doc__)
    p.add_argument("--dense-dir", default=str(HERE / "results" / "dense_models"))
    p.add_argument("--epochs", type=int, default=20, help="the dense models' epochs (their file name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--untrained", action="store_true")
    p.add_argument("--net", default="mnist1d_mobilenet")
    p.add_argument("--methods", nargs="+", default=["l1-norm (uniform)", "l1-norm (global)"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="tflm_op_profile.json")
    p.add_argument("--whole", action="store_true", help="whole invokes only, over --seeds (no per-op profile)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a = p.parse_args()
    (x, _), _ = tfs.datasets.mnist1d(num_samples=2000)
    if a.whole:
        return whole_speedups(a, x)
    models, tflites, refused = pruned_files(a, a.seed, x)
    result = profile(tflites, a.runs, a.rounds)
    dense = models["dense"]
    dense_types = by_type(result["dense"]["ops"])
    lines = ["| model | op type | ops | µs (dense µs) | time vs dense | MACs vs dense | share of the model's time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        types = by_type(r["ops"])
        total = sum(t[1] for t in types.values())
        for op, (count, seconds, macs) in sorted(types.items(), key=lambda kv: -dense_types.get(kv[0], [0, 0])[1]):
            d = dense_types.get(op, [0, float("nan"), 0])
            lines.append(f"| {name} | {op} | {count} | {seconds * 1e6:.1f} ({d[1] * 1e6:.1f}) | "
                         f"{seconds / d[1]:.2f} | {(macs / d[2]) if d[2] else float('nan'):.2f} | "
                         f"{seconds / total:.1%} |")
        lines.append(f"| {name} | **whole invoke** | {len(r['ops'])} | {r['full'] * 1e6:.1f} "
                     f"({result['dense']['full'] * 1e6:.1f}) | {r['full'] / result['dense']['full']:.2f} "
                     f"(speed-up {result['dense']['full'] / r['full']:.2f}×) | "
                     f"{tfs.summary(models[name], print_fn=None).flops / tfs.summary(dense, print_fn=None).flops:.2f} "
                     f"| sum of ops {total * 1e6:.1f} µs |")
    print("\n".join(lines))
    write_results(HERE / "results" / a.out, {"args": vars(a), "profile": {
        k: {"full_us": v["full"] * 1e6, "ops": [(op, s * 1e6, m) for op, s, m in v["ops"]]} for k, v in result.items()},
        "table": lines, "verification_failed": refused})


if __name__ == "__main__":
    main()
