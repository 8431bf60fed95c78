"""What sparsity buys on each export target: .tflite bytes, LiteRT speed, TFLM arena.

    python benchmarks/export_targets.py --out benchmarks/results/export_targets.json

A Dense-heavy MLP (`tfs.zoo.mnist1d_mlp(hidden=(1024, 2048, 2048))`, 6.4M
weights) and the MNIST-1D CNN (`tfs.zoo.mnist1d_cnn()`), each at 0%, 90%
random (1x1), 90% 1x4-block and 90% 1x16-block sparsity (blocks along the
input axis of every Dense/Conv1D kernel: Keras layout [in, out]). Each is
exported with `tfs.export.convert` as float, float-sparse (sparse="auto"
and, where it differs, sparse=True), int8 and int8-sparse for LiteRT, and
as int8 for TFLM. LiteRT invoke time is single-threaded with the default
XNNPack delegate: the median over `--rounds` x `--runs` invokes, rounds
interleaved across variants so drift on this shared 2-core machine hits
all of them alike; ratios are to the dense model of the same precision in
the same run. TFLM rows: the smallest arena in which tflite-micro loads and
runs the model, and its (host, Python-driven) invoke time. Weights are the
random initialization pruned once: bytes and speed do not depend on the
values (the verification numbers are in the JSON).
"""

import json
import os
import pathlib
import platform
import statistics
import sys
import time

from common import HERE, parser, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.export import runtimes  # noqa: E402

PATTERNS = ("dense", "random", "block1x4", "block1x16")


def prune(model, pattern, sparsity, seed=0):
    """Zero `sparsity` of every Dense/Conv1D kernel in `pattern` (blocks along the input axis)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D)) or pattern == "dense":
            continue
        kernel = layer.kernel.numpy()
        if pattern == "random":
            mask = rng.random(kernel.shape) >= sparsity
        else:
            block = int(pattern.split("x")[1])
            n_in = kernel.shape[-2]
            shape = kernel.shape[:-2] + (-(-n_in // block), kernel.shape[-1])
            mask = np.repeat(rng.random(shape) >= sparsity, block, axis=-2)[..., :n_in, :]
        layer.kernel.assign(kernel * mask)
    return model


def variants(pattern):
    out = [("float", None, False), ("float-sparse", None, "auto"), ("int8", "int8", False),
           ("int8-sparse", "int8", "auto")]
    if pattern != "dense":
        out.insert(2, ("float-sparse=True", None, True))
    return out


def litert_invoker(tflite):
    it = runtimes.litert_interpreter(tflite, num_threads=1)
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    return it.invoke


def tflm_invoker(tflite):
    it = runtimes.tflm_interpreter(tflite, runtimes.generous_arena(tflite))
    d = it.get_input_details(0)
    it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
    return it.invoke


def time_interleaved(invokers, runs, rounds, warmup=10):
    """Median invoke seconds per key; rounds interleaved so machine drift hits all alike."""
    for fn in invokers.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in invokers}
    for _ in range(rounds):
        for key, fn in invokers.items():
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in times.items()}


def bench_model(name, build, x, a):
    rows = []
    exported, tflm_models = {}, {}
    for pattern in PATTERNS:
        keras.utils.set_random_seed(0)
        model = prune(build(), pattern, a.sparsity)
        sparsity = tfs.sparsity(model)
        for label, quantize, sparse in variants(pattern):
            t = time.time()
            r = tfs.export.convert(model, quantize=quantize, representative_data=x, sparse=sparse)
            key = (pattern, label)
            exported[key] = r.tflite
            rep = r.report
            rows.append({
                "model": name, "pattern": pattern, "sparsity": sparsity, "target": "litert", "variant": label,
                "bytes": len(r.tflite), "ops": rep.ops,
                "sparse_layouts": sorted({s["layout"] + (" (native)" if s["native"] else " (DENSIFY)")
                                          for s in rep.sparse_tensors}),
                "densified": len(rep.densified), "verification": rep.verification,
                "warnings": rep.warnings, "convert_seconds": time.time() - t,
            })
            print(f"{name} {pattern} {label}: {len(r.tflite):,} B {rows[-1]['sparse_layouts']}", flush=True)
        if pattern != "block1x16" or a.tflm_all:
            t = time.time()
            try:
                r = tfs.export.convert(model, target="tflm", representative_data=x)
                tflm, size = dict(r.report.tflm, runs=True), len(r.tflite)
                tflm_models[pattern] = r.tflite
            except (ValueError, RuntimeError) as error:
                tflm, size = {"runs": False, "error": str(error)}, None
            rows.append({"model": name, "pattern": pattern, "sparsity": sparsity, "target": "tflm",
                         "variant": "int8", "bytes": size, "tflm": tflm, "convert_seconds": time.time() - t})
            print(f"{name} {pattern} tflm: {tflm.get('arena_bytes')} B arena, runs={tflm['runs']}", flush=True)
    times = time_interleaved({k: litert_invoker(v) for k, v in exported.items()}, a.runs, a.rounds)
    with runtimes.captured_stderr():
        tflm_times = time_interleaved({k: tflm_invoker(v) for k, v in tflm_models.items()},
                                      a.tflm_runs, a.rounds, warmup=2)
    for row in rows:
        if row["target"] == "litert":
            row["invoke_seconds"] = times[(row["pattern"], row["variant"])]
        elif row["tflm"]["runs"]:
            row["tflm"]["invoke_seconds"] = tflm_times[row["pattern"]]
    for row in rows:
        precision = "int8" if row["variant"].startswith("int8") else "float"
        base = next(r for r in rows if r["pattern"] == "dense" and r["target"] == row["target"]
                    and r["variant"] == (precision if row["target"] == "litert" else "int8"))
        if row.get("bytes") and base.get("bytes"):
            row["size_ratio"] = base["bytes"] / row["bytes"]
        if row["target"] == "litert":
            row["speedup"] = base["invoke_seconds"] / row["invoke_seconds"]
    return rows


def table(rows):
    lines = ["| model | sparsity | variant | .tflite bytes | smaller than dense | LiteRT µs | speed-up | sparse storage |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["target"] != "litert":
            continue
        lines.append(f"| {r['model']} | {r['pattern']} | {r['variant']} | {r['bytes']:,} | {r['size_ratio']:.2f}× | "
                     f"{_us(r['invoke_seconds'])} | {r['speedup']:.2f}× | "
                     f"{', '.join(r['sparse_layouts']) or '—'} |")
    lines += ["", "| model | sparsity | TFLM .tflite bytes | arena bytes | TFLM invoke µs | runs | TFLM vs LiteRT ref (steps) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["target"] != "tflm":
            continue
        t = r["tflm"]
        if t["runs"]:
            lines.append(f"| {r['model']} | {r['pattern']} | {r['bytes']:,} | {t['arena_bytes']:,} | "
                         f"{_us(t['invoke_seconds'])} | yes | {t['max_diff_vs_reference_steps']:g} |")
        else:
            lines.append(f"| {r['model']} | {r['pattern']} | — | — | — | NO: {t['error'][:80]} | — |")
    return "\n".join(lines)


def _us(seconds):
    us = seconds * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def goals(rows):
    def find(model, pattern, variant, target="litert"):
        return next(r for r in rows if (r["model"], r["pattern"], r["variant"], r["target"]) == (model, pattern, variant, target))

    speed = find("mlp", "block1x4", "float-sparse")["speedup"]
    sizes = {p: find("mlp", p, "int8-sparse")["size_ratio"] for p in ("random", "block1x4", "block1x16")}
    tflm_ok = all(r["tflm"]["runs"] for r in rows if r["target"] == "tflm")
    return {
        "float FC 90% 1x4 block >= 5x faster than dense": {"value": speed, "met": speed >= 5},
        "int8 90% sparse >= 8x smaller than dense int8": {
            "value": sizes, "met_by": [p for p, v in sizes.items() if v >= 8]},
        "every tflm export runs in tflite-micro": {"met": tflm_ok},
    }


def main():
    p = parser(__doc__)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--runs", type=int, default=100, help="invokes per round per variant")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tflm-runs", type=int, default=10, help="TFLM invokes per round per model")
    p.add_argument("--tflm-all", action="store_true", help="also export the 1x16 models for TFLM")
    p.add_argument("--quick", action="store_true", help="small MLP, few runs (smoke test)")
    p.add_argument("--out", default=str(HERE / "results" / "export_targets.json"))
    a = p.parse_args()
    (x_train, _), _ = tfs.datasets.mnist1d()
    x = x_train[:100]
    hidden = (128, 256, 256) if a.quick else (1024, 2048, 2048)
    if a.quick:
        a.runs, a.rounds, a.tflm_runs = 20, 2, 3
    rows = bench_model("mlp", lambda: tfs.zoo.mnist1d_mlp(hidden=hidden), x, a)
    rows += bench_model("cnn", lambda: tfs.zoo.mnist1d_cnn(), x, a)
    result = {
        "command": " ".join(["python", "benchmarks/export_targets.py"] + sys.argv[1:]),
        "environment": {
            "python": platform.python_version(), "tensorflow": _version("tensorflow"),
            "keras": keras.__version__, "ai_edge_litert": _version("ai-edge-litert"),
            "tflite_micro": _version("tflite-micro"), "cpus": os.cpu_count(), "machine": platform.machine(),
        },
        "args": vars(a), "mlp_hidden": hidden, "goals": goals(rows), "rows": rows,
    }
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, result)
    print(table(rows))
    print(json.dumps(result["goals"], indent=1))


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
