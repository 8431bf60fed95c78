"""Where the TFLM arena of the demo's low-rank GRU(32) step model goes, and what the step-graph choices change.

    .venv/bin/python benchmarks/rnn_arena.py --out benchmarks/results/rnn_arena.json

Trains `demo_lowrank_gru32` exactly as `benchmarks/rnn_export.py` does (MNIST-1D
10k, 40 steps, seed 0, 20 epochs, TargetSparsity(0.75)), then exports the int8
step form (`target="tflm"`) with each combination of: the head split off into
its own model (`convert(..., step_head="separate")`; default "joined"), per-channel vs per-tensor int8
weights (`convert(..., weight_quantization=...)`) and state inputs retargeted to the new
state's quantization instead of a requantizing QUANTIZE per step
(`step_model.RETARGET_STATES`). Per variant: file bytes, smallest working
TFLM arena (step + head interpreters), the ops, tflite-micro accuracy over
the whole test set, and tflite-micro's own allocation record
(`print_allocations`: eval tensors, persistent tensors, op data, node
structs) on this 64-bit host.
"""

import json

from common import parser, write_results  # noqa: E402  (first: quiet TensorFlow)

import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.export.recurrent import step_model  # noqa: E402

import rnn_export  # noqa: E402

VARIANTS = [  # (split head, per-channel weights, retarget states)
    (False, True, False), (False, True, True), (True, True, True), (False, False, True), (True, False, True)]


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="demo_lowrank_gru32", choices=sorted(rnn_export.MODELS))
    p.add_argument("--out", default=str(rnn_export.HERE / "results" / "rnn_arena.json"))
    a = p.parse_args(argv)
    data = tfs.datasets.mnist1d(num_samples=10000)
    model, row = rnn_export.train(a.model, data, a)
    (x, _), (x_test, y_test) = data
    out = {"args": vars(a), "train": row, "variants": []}
    default = step_model.RETARGET_STATES
    try:
        for split, per_channel, retarget in VARIANTS:
            step_model.RETARGET_STATES = retarget
            r = tfs.export.convert(model, target="tflm", representative_data=x[:100], recurrent="step",
                                   step_head="separate" if split else "joined",
                                   weight_quantization="per_channel" if per_channel else "per_tensor")
            accuracy = float(np.mean(np.argmax(r.run_sequence(x_test, runtime="tflm"), -1) == y_test))
            v = {"split_head": split, "per_channel": per_channel, "retarget_states": retarget,
                 "file_bytes": r.report.recurrent["file_bytes"], "arena_bytes": r.report.tflm["arena_bytes"],
                 "step_arena_bytes": r.report.tflm.get("step_arena_bytes", r.report.tflm["arena_bytes"]),
                 "head_arena_bytes": r.report.tflm.get("head_arena_bytes"),
                 "step_ops": dict(r.inspect().op_counts), "state_dtype": r.report.recurrent["state_dtype"],
                 "tflm_accuracy": accuracy, "allocations": rnn_export.allocations(r.tflite),
                 "head_allocations": rnn_export.allocations(r.head) if r.head else None}
            out["variants"].append(v)
            print(json.dumps({k: v[k] for k in v if "alloc" not in k}), flush=True)
    finally:
        step_model.RETARGET_STATES = default
    out["markdown"] = markdown(out)
    write_results(a.out, out)
    print(out["markdown"])


def markdown(out):
    lines = [f"float Keras accuracy {100 * out['train']['float_accuracy']:.2f}%, ranks {out['train'].get('ranks')}", "",
             "| head | int8 weights | state inputs | states | .tflite bytes | TFLM arena bytes (step + head) | step ops | "
             "TFLM acc % |", "|---|---|---|---|---|---|---|---|"]
    for v in out["variants"]:
        arena = f"{v['arena_bytes']:,}" + (f" ({v['step_arena_bytes']:,} + {v['head_arena_bytes']:,})"
                                           if v["head_arena_bytes"] else "")
        lines.append(f"| {'own model, once' if v['split_head'] else 'every step'} | "
                     f"{'per channel' if v['per_channel'] else 'per tensor'} | "
                     f"{'retargeted' if v['retarget_states'] else 'QUANTIZE per step'} | {v['state_dtype']} | "
                     f"{v['file_bytes']:,} | {arena} | {sum(v['step_ops'].values())} | {100 * v['tflm_accuracy']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
