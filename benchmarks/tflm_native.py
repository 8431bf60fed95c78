"""The step form's generated C++ loop built against real tflite-micro: 64-bit host vs 32-bit (i386, ARM) arenas.

    TFLM_SRC=/work/tflm-src .venv/bin/python benchmarks/tflm_native.py --keras model.keras \\
        --out benchmarks/results/tflm_native.json

Builds tflite-micro's library (its sources under `--tflm-src`, reference
kernels, third-party headers from `--third-party`, default the Makefile's
`tensorflow/lite/micro/tools/make/downloads`) for each of `--arches`:
`native` (this 64-bit host's g++), `i386` (`g++ -m32`, gcc-multilib) and
`arm` (`arm-linux-gnueabihf-g++`, 32-bit ARM with the AAPCS layout of a
Cortex-M, run under `qemu-arm`). Exports the model (`--keras`, or trained as
`benchmarks/rnn_export.py` does) with `tfs.export.convert(target="tflm",
recurrent="step", c_files=True)` for each `--variants` entry, compiles the
files the export wrote (`<stem>.cc/.h` and the `<stem>_sequence.h` loop,
whose `<stem>_add_ops` registers the ops) into a small harness and runs it
over the test sequences. Per variant and architecture: the outputs (compared
byte for byte with the tflite_micro Python wheel's), `arena_used_bytes()`
after one sequence in a generous arena, the smallest arena in which
`AllocateTensors` and a whole sequence succeed (bisection in the harness),
each with the plain `MicroAllocator` (what firmware uses) and with the
`RecordingMicroAllocator` (what the Python wheel uses), its itemized record
and the struct sizes. The Python wheel's numbers are the package's own
(`report.tflm["arena_bytes"]`: smallest working arena, recording allocator;
`print_allocations`' total).
"""

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

from common import parser, write_results  # noqa: E402  (first: quiet TensorFlow)

import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
import tf_sparsity.export  # noqa: E402,F401
from tf_sparsity.export.c_array import c_identifier  # noqa: E402
from tf_sparsity.export.recurrent.step_model import metadata  # noqa: E402

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

ARCHES = {  # name -> (compiler command, runner prefix)
    "native": (["g++"], []),
    "i386": (["g++", "-m32", "-isystem", "/usr/include/x86_64-linux-gnu"], []),  # asm/ headers (multilib)
    "arm": (["arm-linux-gnueabihf-g++", "-static"], ["qemu-arm", "-L", "/usr/arm-linux-gnueabihf"]),
}
# The directories of tflite-micro's `make list_library_sources` (minus signal/), test files excluded.
LIBRARY_DIRS = [
    "tensorflow/compiler/mlir/lite/core/api", "tensorflow/compiler/mlir/lite/schema", "tensorflow/lite/core/api",
    "tensorflow/lite/core/c", "tensorflow/lite/kernels", "tensorflow/lite/kernels/internal",
    "tensorflow/lite/kernels/internal/reference", "tensorflow/lite/micro", "tensorflow/lite/micro/arena_allocator",
    "tensorflow/lite/micro/kernels", "tensorflow/lite/micro/memory_planner", "tensorflow/lite/micro/tflite_bridge"]
FLAGS = ["-std=c++17", "-fno-rtti", "-fno-exceptions", "-fno-threadsafe-statics", "-ffunction-sections",
         "-fdata-sections", "-DTF_LITE_STATIC_MEMORY", "-DTF_LITE_DISABLE_X86_NEON", "-DTF_LITE_USE_CTIME", "-w"]
# Export variants: name -> (convert() keyword arguments, step_export module settings). "joint":
# factorized cells' summed gates as one product (step_export.JOINT_PROJECTION); "int8_forced": int8
# states even where the exporter's rule (int8 must keep every calibration prediction) picks int16.
VARIANTS = {
    "per_channel_separate": ({"weight_quantization": "per_channel"}, {"JOINT_PROJECTION": False}),
    "per_tensor_separate": ({"weight_quantization": "per_tensor"}, {"JOINT_PROJECTION": False}),
    "per_channel_joint": ({"weight_quantization": "per_channel"}, {"JOINT_PROJECTION": True}),
    "default": ({}, {}),
    "per_tensor_joint_int8_forced": ({"weight_quantization": "per_tensor"},
                                     {"JOINT_PROJECTION": True, "_INT8_AGREEMENT": 0.0}),
}

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <new>
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/micro/recording_micro_interpreter.h"
#include "@STEM@.h"
#include "@STEM@_sequence.h"

alignas(16) static uint8_t arena[1 << 20];
static float* xs;
static int n_seq, steps;

static const tflite::Model* model;
static tflite::MicroMutableOpResolver<@MACRO@_NUM_OPS> resolver;

template <typename Interpreter>
static bool run_all(Interpreter& interpreter, int n, FILE* out) {
  if (interpreter.AllocateTensors() != kTfLiteOk) return false;
  @OUT_CTYPE@ y[4096];
  for (int k = 0; k < n; ++k) {
    if (@FN@(interpreter, xs + (size_t)k * steps * @MACRO@_FEATURES, steps, y) != kTfLiteOk) return false;
    if (out) fwrite(y, 1, interpreter.output(0)->bytes, out);
  }
  return true;
}

static bool works(size_t size, bool recording) {
  memset(arena, 0x5a, size);
  if (recording) {
    tflite::RecordingMicroInterpreter interpreter(model, resolver, arena, size);
    return run_all(interpreter, 1, nullptr);
  }
  tflite::MicroInterpreter interpreter(model, resolver, arena, size);
  return run_all(interpreter, 1, nullptr);
}

static size_t smallest(size_t high, bool recording) {
  size_t low = 1024;  // below this the allocator's own structs do not fit (a failure would crash)
  while (high - low > 1) {
    size_t mid = (low + high) / 2;
    if (works(mid, recording)) high = mid; else low = mid;
  }
  return high;
}

int main(int argc, char** argv) {
  if (argc != 5) { fprintf(stderr, "usage: harness x.bin n steps out.bin\n"); return 2; }
  n_seq = atoi(argv[2]);
  steps = atoi(argv[3]);
  xs = (float*)malloc(sizeof(float) * (size_t)n_seq * steps * @MACRO@_FEATURES);
  FILE* f = fopen(argv[1], "rb");
  if (!f || fread(xs, sizeof(float), (size_t)n_seq * steps * @MACRO@_FEATURES, f) !=
      (size_t)n_seq * steps * @MACRO@_FEATURES) { fprintf(stderr, "bad input\n"); return 2; }
  fclose(f);
  model = tflite::GetModel(@SYMBOL@);
  if (@ADD_OPS@(resolver) != kTfLiteOk) { fprintf(stderr, "add ops failed\n"); return 3; }
  FILE* out = fopen(argv[4], "wb");
  size_t plain_used, recording_used;
  {
    tflite::MicroInterpreter interpreter(model, resolver, arena, sizeof(arena));
    if (!run_all(interpreter, n_seq, out)) { fprintf(stderr, "run failed\n"); return 4; }
    plain_used = interpreter.arena_used_bytes();
  }
  fclose(out);
  printf("{\"pointer_bytes\": %d, \"sizeof_eval_tensor\": %d, \"sizeof_node\": %d, \"sizeof_tensor\": %d,\n",
         (int)sizeof(void*), (int)sizeof(TfLiteEvalTensor), (int)sizeof(TfLiteNode), (int)sizeof(TfLiteTensor));
  printf(" \"sizeof_micro_allocator\": %d, \"sizeof_recording_micro_allocator\": %d,\n",
         (int)sizeof(tflite::MicroAllocator), (int)sizeof(tflite::RecordingMicroAllocator));
  {
    tflite::RecordingMicroInterpreter interpreter(model, resolver, arena, sizeof(arena));
    if (!run_all(interpreter, 1, nullptr)) { fprintf(stderr, "recording run failed\n"); return 4; }
    recording_used = interpreter.arena_used_bytes();
    const tflite::RecordingMicroAllocator& a = interpreter.GetMicroAllocator();
    static const char* names[] = {"eval_tensors", "persistent_tensors", "persistent_quantization",
                                  "persistent_buffers", "variable_buffers", "nodes_and_registrations", "op_data"};
    printf(" \"record\": {");
    for (int t = 0; t < 7; ++t) {
      tflite::RecordedAllocation r = a.GetRecordedAllocation((tflite::RecordedAllocationType)t);
      printf("%s\"%s\": [%d, %d]", t ? ", " : "", names[t], (int)r.used_bytes, (int)r.count);
    }
    printf("},\n \"record_total\": %d,\n", (int)a.GetSimpleMemoryAllocator()->GetUsedBytes());
  }
  printf(" \"arena_used_bytes\": %d, \"recording_arena_used_bytes\": %d,\n", (int)plain_used, (int)recording_used);
  size_t start = 2 * (recording_used + 64);
  printf(" \"smallest_arena\": %d, \"recording_smallest_arena\": %d}\n", (int)smallest(start, false),
         (int)smallest(start, true));
  return 0;
}
"""


_REGISTRATION = re.compile(r"TFLMRegistration\s*\*?\s+Register_([A-Z0-9_]+)\s*\(")


def library_sources(src, ops=None):
    """tflite-micro's library sources; with `ops` (builtin op names), only those ops' kernel files.

    A kernel file is left out when it defines `Register_<OP>()` for none of
    `ops`, and so is a helper file of such a kernel (`conv_common.cc`,
    `lstm_eval.cc`: a file defining no registration whose stem, minus
    `_common` / `_eval`, is part of the name of kernel files that all do).
    Compiling all ~120 kernels takes long on a shared machine and the linker
    would drop them anyway. Other files are shared code and always built.
    """
    files = []
    for d in LIBRARY_DIRS:
        candidates = [p for p in sorted((src / d).glob("*.c*")) if p.suffix in (".cc", ".c")
                      and "test" not in p.name and "generated_data" not in p.name]
        if ops is None or not d.endswith("micro/kernels"):
            files += candidates
            continue
        defined = {p: set(_REGISTRATION.findall(p.read_text(errors="replace"))) for p in candidates}
        for p in candidates:
            ties = defined[p]
            if not ties:
                stem = re.sub(r"(_eval)?(_common)?$", "", p.stem)
                ties = set().union(*[r for q, r in defined.items() if r and stem in q.stem])
            if not ties or ties & set(ops):
                files.append(p)
    return files


def includes(src, third_party):
    return [f"-I{src}", f"-I{third_party}", f"-I{third_party / 'gemmlowp'}",
            f"-I{third_party / 'flatbuffers' / 'include'}", f"-I{third_party / 'ruy'}"]


def build_library(arch, src, third_party, build, jobs, ops=None, opt="-O0"):
    """Object files of tflite-micro for `arch` (cached in `build/<arch><opt>/obj`) -> list of paths."""
    cxx = ARCHES[arch][0] + [opt]
    obj_dir = build / f"{arch}{opt}" / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    sources = library_sources(src, ops)

    def compile_one(path):
        obj = obj_dir / (str(path.relative_to(src)).replace("/", "__") + ".o")
        if not obj.exists():
            tmp = f"{obj}.{os.getpid()}.{threading.get_ident()}.tmp"  # concurrent builds may share the cache
            cmd = cxx + FLAGS + includes(src, third_party) + ["-c", str(path), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{arch}: {' '.join(cmd)}\n{done.stderr[-3000:]}")
            os.replace(tmp, obj)
        return obj

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, sources))


def export_variant(model, x_train, variant, directory, stem="step_model"):
    from tf_sparsity.export.recurrent import step_export

    kwargs, settings = variant
    directory.mkdir(parents=True, exist_ok=True)
    saved = {k: getattr(step_export, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(step_export, k, v)
        return tfs.export.convert(model, target="tflm", representative_data=x_train[:100], recurrent="step",
                                  path=directory / f"{stem}.tflite", c_files=True, **kwargs)
    finally:
        for k, v in saved.items():
            setattr(step_export, k, v)


def build_harness(arch, src, third_party, build, directory, stem, library, opt="-O0"):
    meta = metadata(open(directory / f"{stem}.tflite", "rb").read())
    if meta.get("head") and meta["head"]["model"]:
        raise ValueError("the harness runs step models with the head joined (step_head='joined')")
    ident = c_identifier(stem)
    out_ctype = {"int8": "int8_t", "int16": "int16_t"}.get(meta["output"].get("dtype"), "float")
    text = (HARNESS.replace("@STEM@", stem).replace("@MACRO@", f"G_{ident.upper()}")
            .replace("@FN@", f"{ident}_run_sequence").replace("@ADD_OPS@", f"{ident}_add_ops")
            .replace("@SYMBOL@", f"g_{ident}_model_data").replace("@OUT_CTYPE@", out_ctype))
    (directory / "harness.cc").write_text(text)
    exe = directory / f"harness_{arch}"
    cmd = (ARCHES[arch][0] + [opt] + FLAGS + includes(src, third_party) + [f"-I{directory}", str(directory / "harness.cc"),
           str(directory / f"{stem}.cc"), *map(str, library), "-Wl,--gc-sections", "-lm", "-o", str(exe)])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{arch}: harness build failed\n{done.stderr[-4000:]}")
    return exe, meta


def run_harness(arch, exe, x, directory):
    x_path, y_path = directory / "x.bin", directory / f"y_{arch}.bin"
    np.ascontiguousarray(x, np.float32).tofile(x_path)
    done = subprocess.run(ARCHES[arch][1] + [str(exe), str(x_path), str(len(x)), str(x.shape[1]), str(y_path)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{arch}: harness failed ({done.returncode})\n{done.stderr[-3000:]}")
    dtype = {"int8": np.int8, "int16": np.int16}.get(metadata(open(directory / "step_model.tflite", "rb").read())
                                                     ["output"].get("dtype"), np.float32)
    return json.loads(done.stdout), np.fromfile(y_path, dtype)


def measure(arch, src, third_party, build, directory, a, ops, x, y, python_raw, reference="python"):
    """Build and run the harness for `arch`; its record with the outputs compared to `python_raw`."""
    library = build_library(arch, src, third_party, build, a.jobs, ops, a.opt)
    exe, _ = build_harness(arch, src, third_party, build, directory, "step_model", library, a.opt)
    info, raw = run_harness(arch, exe, x, directory)
    raw = raw.reshape(len(x), -1)
    info["compared_with"] = reference
    info["outputs_equal_python"] = int(np.sum(np.all(raw == python_raw, -1)))
    info["max_abs_diff_vs_python"] = int(np.max(np.abs(raw.astype(int) - python_raw.astype(int))))
    info["tflm_accuracy"] = float(np.mean(np.argmax(raw, -1) == y))
    return info


def extend(a, src, third_party, build, y_test):
    """`--extend`: add architectures to an earlier run's results (its exported models, no new export)."""
    with open(a.out) as f:
        out = json.load(f)
    n = out["sequences"]
    x = x_test_from(build, out, n)
    for row in out["variants"]:
        directory = build / "models" / row["variant"]
        reference = directory / "y_python.bin"
        if not reference.exists():  # runs before y_python.bin existed: the native build matched it exactly
            reference = directory / "y_native.bin"
            assert row["arches"]["native"]["outputs_equal_python"] == n
        dtype = {"int8": np.int8, "int16": np.int16}.get(row.get("output_dtype"), np.int8)
        python_raw = np.fromfile(reference, dtype).reshape(n, -1)
        for arch in a.arches.split(","):
            row["arches"][arch] = measure(arch, src, third_party, build, directory, a, row["ops"], x, y_test[:n],
                                          python_raw, reference.name)
            print(row["variant"], arch, json.dumps({k: v for k, v in row["arches"][arch].items() if k != "record"}),
                  flush=True)
    out["markdown"] = markdown(out)
    write_results(a.out, out)
    print(out["markdown"])


def x_test_from(build, out, n):
    """The test sequences an earlier run fed its harness (x.bin of its first variant)."""
    directory = build / "models" / out["variants"][0]["variant"]
    features = metadata(open(directory / "step_model.tflite", "rb").read())["features"]
    return np.fromfile(directory / "x.bin", np.float32).reshape(n, -1, features)


def recorded_total(lines):
    """The "Arena allocation total N bytes" of tflite-micro's print_allocations lines."""
    for line in lines:
        match = re.search(r"Arena allocation total (\d+) bytes", line)
        if match:
            return int(match.group(1))
    return None


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--tflm-src", default=os.environ.get("TFLM_SRC"),
                   help="tflite-micro source tree (default: $TFLM_SRC)")
    p.add_argument("--third-party", default=None,
                   help="dir holding flatbuffers/, gemmlowp/, ruy/ (default: <src>/tensorflow/lite/micro/tools/make/downloads)")
    p.add_argument("--arches", default="native,i386,arm")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--build-dir", default="/tmp/tf_sparsity_tflm_build")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--opt", default="-O0", help="optimization flag (the arena does not depend on it; -O0 "
                                                 "compiles fastest)")
    p.add_argument("--keras", default=None, help="a saved .keras model (default: train --model as rnn_export.py)")
    p.add_argument("--model", default="demo_lowrank_gru32")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequences", type=int, default=0, help="test sequences to run (0: the whole test set)")
    p.add_argument("--out", default=str(HERE / "results" / "tflm_native.json"))
    p.add_argument("--extend", action="store_true",
                   help="add --arches to the results in --out: rebuild the harness for the models an earlier "
                        "run exported into --build-dir and compare with that run's outputs (no export)")
    a = p.parse_args(argv)
    if not a.tflm_src:
        p.error("pass --tflm-src or set TFLM_SRC (a tflite-micro source tree)")
    src = pathlib.Path(a.tflm_src).resolve()
    third_party = pathlib.Path(a.third_party or src / "tensorflow/lite/micro/tools/make/downloads").resolve()
    build = pathlib.Path(a.build_dir)
    data = tfs.datasets.mnist1d(num_samples=10000)
    (x_train, _), (x_test, y_test) = data
    if a.extend:
        return extend(a, src, third_party, build, y_test)
    if a.keras:
        import keras

        model, train = keras.models.load_model(a.keras), {"keras": a.keras}
    else:
        import rnn_export

        model, train = rnn_export.train(a.model, data, a)
    float_acc = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))
    x = x_test[:a.sequences] if a.sequences else x_test
    y = y_test[:len(x)]
    arches = a.arches.split(",")
    out = {"args": vars(a), "train": train, "float_accuracy": float_acc, "tflm_src": str(src), "variants": []}
    for name in a.variants.split(","):
        directory = build / "models" / name
        shutil.rmtree(directory, ignore_errors=True)
        r = export_variant(model, x_train, VARIANTS[name], directory)
        python_raw = np.asarray(r.run_sequence(x, runtime="tflm", raw=True)).reshape(len(x), -1)
        python_raw.tofile(directory / "y_python.bin")
        import rnn_export

        row = {"variant": name, "kwargs": VARIANTS[name][0], "settings": VARIANTS[name][1],
               "state_dtype": r.report.recurrent["state_dtype"], "output_dtype": str(python_raw.dtype),
               "weight_quantization": r.report.recurrent["weight_quantization"], "file_bytes": len(r.tflite),
               "python_smallest_arena": r.report.tflm["arena_bytes"],
               "python_record_total": recorded_total(rnn_export.allocations(r.tflite)),
               "tflm_accuracy_python": float(np.mean(np.argmax(python_raw, -1) == y)), "arches": {}}
        ops = sorted(r.inspect().op_counts)
        row["ops"] = ops
        for arch in arches:
            row["arches"][arch] = measure(arch, src, third_party, build, directory, a, ops, x, y, python_raw)
            print(name, arch, json.dumps({k: v for k, v in row["arches"][arch].items() if k != "record"}), flush=True)
        out["variants"].append(row)
    out["sequences"] = len(x)
    out["markdown"] = markdown(out)
    write_results(a.out, out)
    print(out["markdown"])


def markdown(out):
    arches = list(out["variants"][0]["arches"]) if out["variants"] else []
    lines = [f"float Keras accuracy {100 * out['float_accuracy']:.2f}%, {out['sequences']} test sequences", "",
             "| variant | int8 weights | states | .tflite bytes | Python wheel: smallest arena (recorded) | "
             + " | ".join(f"{arch}: arena_used_bytes / smallest arena (recording allocator: used / smallest)"
                          for arch in arches) + " | outputs = Python wheel | TFLM acc % |",
             "|---|---|---|---|---|" + "---|" * len(arches) + "---|---|"]
    for v in out["variants"]:
        cells = [f"{i['arena_used_bytes']:,} / {i['smallest_arena']:,} ({i['recording_arena_used_bytes']:,} / "
                 f"{i['recording_smallest_arena']:,})" for i in v["arches"].values()]
        equal = ", ".join(f"{arch} {i['outputs_equal_python']}/{out['sequences']}" for arch, i in v["arches"].items())
        lines.append(f"| {v['variant']} | {v['weight_quantization'].replace('_', ' ')} | {v['state_dtype']} | "
                     f"{v['file_bytes']:,} | {v['python_smallest_arena']:,} "
                     f"({v['python_record_total']:,}) | " + " | ".join(cells) + f" | {equal} | "
                     f"{100 * v['tflm_accuracy_python']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
