"""Can ai-edge-quantizer turn the float WHILE-loop export of a Keras 3 GRU into an int8 model tflite-micro runs?

Runs in an environment with ai-edge-quantizer next to the same TensorFlow / LiteRT / tflite-micro:

    python -m venv /work/venv-aeq
    /work/venv-aeq/bin/pip install tensorflow==2.21.0 ai-edge-litert==2.3.0 keras==3.15.1 numpy==2.4.6 \\
        tflite_micro==0.dev20261023182759 ai-edge-quantizer==0.10.0
    /work/venv-aeq/bin/python benchmarks/loop_int8_aeq.py --out benchmarks/results/loop_int8_aeq.json

Model: `GRU(32) + Dense(10)` over 40 steps of 1 feature (untrained, seed 0),
`tfs.export.convert(target="litert", quantize=None, recurrent="loop")`, a
`serving_default` signature added for the quantizer. Per recipe: whether
calibration and quantization succeed (the error otherwise), the bytes, and
the max error vs Keras on 16 random sequences on LiteRT (reference kernels)
and on tflite-micro.
"""

import json

from common import parser, write_results  # noqa: E402  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.export import flatbuffer, runtimes  # noqa: E402

RECIPES = ("static_wi8_ai8", "static_wi8_ai16", "weight_only_wi8_afp32", "dynamic_wi8_afp32")


def with_signature(blob):
    from tensorflow.lite.python import schema_py_generated as schema

    model = flatbuffer.read(blob)
    sub = model.subgraphs[0]

    def entry(name, index):
        t = schema.TensorMapT()
        t.name, t.tensorIndex = name.encode(), int(index)
        return t

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = b"serving_default", 0
    sig.inputs = [entry(f"input_{k}", i) for k, i in enumerate(sub.inputs)]
    sig.outputs = [entry(f"output_{k}", i) for k, i in enumerate(sub.outputs)]
    model.signatureDefs = [sig]
    return flatbuffer.write(model)


def max_error(blob, x, want, runtime):
    try:
        outs = []
        with runtimes.captured_stderr():
            if runtime == "tflm":
                it = runtimes.tflm_interpreter(blob, runtimes.generous_arena(blob))
                for seq in x:
                    it.set_input(seq[None], 0)
                    it.invoke()
                    outs.append(np.array(it.get_output(0))[0])
            else:
                it = runtimes.litert_interpreter(blob, reference=True)
                i, o = it.get_input_details()[0], it.get_output_details()[0]
                for seq in x:
                    it.set_tensor(i["index"], seq[None])
                    it.invoke()
                    outs.append(it.get_tensor(o["index"])[0].copy())
        return float(np.max(np.abs(np.stack(outs) - want)))
    except RuntimeError as error:
        return f"{type(error).__name__}: {error}"


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--out", default="benchmarks/results/loop_int8_aeq.json")
    a = p.parse_args(argv)
    from ai_edge_quantizer import quantizer, recipe

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((40, 1)), keras.layers.GRU(32), keras.layers.Dense(10)])
    x = np.random.default_rng(0).normal(size=(64, 40, 1)).astype("float32")
    want = np.asarray(model(x[:16]))
    blob = with_signature(tfs.export.convert(model, target="litert", quantize=None, recurrent="loop").tflite)
    rows = [{"recipe": "float (no quantization)", "bytes": len(blob), "litert": max_error(blob, x[:16], want, "litert"),
             "tflm": max_error(blob, x[:16], want, "tflm"),
             "tflm_arena_bytes": runtimes.tflm_arena_bytes(blob, [x[:1]])}]
    for name in RECIPES:
        row = {"recipe": name}
        try:
            q = quantizer.Quantizer(blob)
            q.load_quantization_recipe(getattr(recipe, name)())
            calibration = (q.calibrate({"serving_default": [{"input_0": x[i:i + 1]} for i in range(len(x))]})
                           if q.need_calibration else None)
            out = bytes(q.quantize(calibration).quantized_model)
            row.update(bytes=len(out), ops=dict(tfs.export.inspect(out).op_counts),
                       litert=max_error(out, x[:16], want, "litert"), tflm=max_error(out, x[:16], want, "tflm"))
            if not isinstance(row["tflm"], str):
                row["tflm_arena_bytes"] = runtimes.tflm_arena_bytes(out, [x[:1]])
        except Exception as error:  # recorded: which step fails is the result
            row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(a.out, {"rows": rows, "output_max_abs": float(np.max(np.abs(want)))})


if __name__ == "__main__":
    main()
