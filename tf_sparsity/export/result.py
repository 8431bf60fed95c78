"""What `convert` returns: the model bytes, where they went, and a report."""

import dataclasses
import json

from tf_sparsity.export.atomic import atomic_write


@dataclasses.dataclass
class ExportReport:
    """Everything `convert` decided and measured.

    - `ops`: op name -> count; `tensors`: constant tensors (name, shape,
      dtype, bytes); `size_bytes`: the .tflite size.
    - `sparse_tensors`: weights stored sparse, with their block layout and
      whether the kernel reads them directly (`native`) or through DENSIFY.
    - `densified`: weights the converter encoded sparse that were stored
      dense instead, and why.
    - `verification`: runtime, samples and error numbers (float: max abs
      diff; int8: prediction agreement and error in output quantization
      steps); `tflm`: arena bytes and the TFLM-vs-reference error;
      `compression`: LUT candidates / bytes saved; `preflight`: the target
      verdict (EdgeTPU op mapping, first CPU fallback); `compiler_log`.
    - `recurrent`: for models with recurrent layers, the export form
      ("step", "loop", "fused", "unroll"), why, file and arena bytes; for
      step models also the states, their quantization and its effect, and
      the per-sequence agreement with Keras.
    - `folded`: int8 only, units constant on `representative_data` that
      were folded into their consumers' bias before converting (group,
      unit, constant, consumers, action; `tfs.surgery.fold_constant_units`).
    - `warnings`: things the user should act on; `notes`: what was done.
    """

    target: str
    quantize: str | None
    sparse: object
    size_bytes: int = 0
    ops: dict = dataclasses.field(default_factory=dict)
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    tensors: list = dataclasses.field(default_factory=list)
    sparse_tensors: list = dataclasses.field(default_factory=list)
    densified: list = dataclasses.field(default_factory=list)
    verification: dict = dataclasses.field(default_factory=dict)
    tflm: dict = dataclasses.field(default_factory=dict)
    compression: dict = dataclasses.field(default_factory=dict)
    preflight: object = None
    compiler_log: str | None = None
    recurrent: dict = dataclasses.field(default_factory=dict)
    folded: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["preflight"] = self.preflight.to_dict() if self.preflight is not None else None
        return out

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def __str__(self):
        q = self.quantize or "float32"
        lines = [f"Export to {self.target} ({q}, sparse={self.sparse!r}): {self.size_bytes:,} bytes"]
        lines.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])))
        for label, items in (("input", self.inputs), ("output", self.outputs)):
            for t in items:
                lines.append(f"  {label:6} {t['name']}: {t['dtype']}{t['shape']}")
        if self.sparse_tensors:
            lines.append("  sparse weights:")
            for s in self.sparse_tensors:
                how = "read sparse by " + s["consumer"] if s["native"] else "expanded by DENSIFY at load (smaller file, no speed-up)"
                lines.append(f"    {s['name']} {s['dtype']}{s['shape']}: {s['layout']}, {s['stored_bytes']:,} of "
                             f"{s['dense_bytes']:,} bytes; {how}")
        else:
            lines.append("  all weights stored dense")
        for d in self.densified:
            lines.append(f"  stored dense: {d['name']} ({d['dtype']}, {d['layout']}): {d['reason']}")
        if self.verification:
            lines.append("  verification: " + _kv(self.verification))
        if self.tflm:
            lines.append("  tflite-micro: " + _kv(self.tflm))
        if self.compression.get("method") or self.compression.get("candidates"):
            lines.append("  compression: " + _kv({k: v for k, v in self.compression.items() if k != "candidates"}))
            for c in self.compression.get("candidates", []):
                lines.append(f"    {c['name']}: {c['distinct_values']} distinct values/"
                             f"{'channel' if c['axis'] is not None else 'tensor'} -> {c['bits']}-bit LUT, "
                             f"~{c['bytes'] - c['estimated_bytes']:,} bytes saved")
        if self.recurrent:
            lines.append("  recurrent: " + _kv({k: v for k, v in self.recurrent.items()
                                                 if k not in ("states", "layers", "state_quantization", "state_dtype_choice",
                                                              "per_sequence_agreement")}))
            for s in self.recurrent.get("states", []):
                q = f", scale {s['scale']:.4g} zero point {s['zero_point']}" if "scale" in s else ""
                lines.append(f"    state {s['input']}: layer '{s['layer']}' [{s['index']}], {s['size']} values, "
                             f"{s['dtype']}{q}")
            if self.recurrent.get("state_dtype_choice"):
                lines.append(f"    state dtype: {self.recurrent['state_dtype_choice']['chosen']} "
                             f"({self.recurrent['state_dtype_choice']['reason']})")
            if self.recurrent.get("state_quantization"):
                lines.append("    state quantization: " + _kv({k: v for k, v in self.recurrent["state_quantization"].items()
                                                               if k != "states"}))
            if self.recurrent.get("per_sequence_agreement"):
                agreement = self.recurrent["per_sequence_agreement"]
                lines.append("    per sequence: tflm vs keras " + _kv(agreement["tflm_vs_keras"]) + "; vs LiteRT "
                             f"reference max {agreement['tflm_vs_litert_reference_max_steps']:g} steps")
        for f in self.folded:
            lines.append(f"  constant unit {f['group']}[{f['unit']}] = {f['constant']:.4g} -> "
                         f"{', '.join(f['consumers'])}: {f['action']}" + (f" ({f['reason']})" if "reason" in f else ""))
        if self.preflight is not None:
            lines += ["  preflight " + line if i == 0 else "  " + line
                      for i, line in enumerate(str(self.preflight).splitlines())]
        if self.compiler_log:
            lines.append("  edgetpu_compiler log:")
            lines += ["    " + line for line in self.compiler_log.strip().splitlines()]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _kv(d):
    parts = []
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


@dataclasses.dataclass
class ExportResult:
    """The exported model: `.tflite` bytes, `.path` (or None), `.report`.

    `.c_files` holds the (.cc, .h) pair written for TFLM, `.compiled` the
    EdgeTPU compiler's output when the compiler ran. `str(result)` prints
    the report.
    """

    tflite: bytes
    path: str | None
    target: str
    quantize: str | None
    report: ExportReport
    c_files: tuple = ()
    compiled: bytes | None = None

    def save(self, path):
        """Write the .tflite bytes to `path` atomically; returns the path."""
        return atomic_write(path, self.tflite)

    def inspect(self):
        """`tfs.export.inspect` of this model."""
        from tf_sparsity.export.inspection import inspect

        return inspect(self.tflite)

    def __str__(self):
        head = f"{self.path}\n" if self.path else ""
        return head + str(self.report)

    def __repr__(self):
        return (f"<ExportResult target={self.target!r} quantize={self.quantize!r} "
                f"{len(self.tflite):,} bytes path={self.path!r}>")


def fill_report(report, info):
    """Copy what `inspect` found (size, ops, tensors, I/O) into `report`."""
    report.size_bytes = info.size
    report.ops = dict(info.op_counts)
    io = lambda t: {"name": t.name, "shape": list(t.shape_signature), "dtype": t.dtype,  # noqa: E731
                    "quantization": t.quantization}
    report.inputs = [io(t) for t in info.inputs]
    report.outputs = [io(t) for t in info.outputs]
    report.tensors = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.bytes}
                      for t in info.tensors if t.constant]
    report.sparse_tensors = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, **t.sparsity.to_dict()}
        for t in info.sparse_tensors]
