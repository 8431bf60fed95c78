"""`inspect`: what is inside any .tflite file, and can each target run it.

Works on files the package did not write (EdgeTPU-compiled models, models
with custom or Flex ops, several subgraphs): it only reads the flatbuffer.
"""

import collections
import dataclasses
import os

import numpy as np

from tf_sparsity.export import flatbuffer, targets
from tf_sparsity.export.result import ExportResult


@dataclasses.dataclass
class SparseInfo:
    """How a sparse tensor is stored.

    `block` is the block shape per dim of the dense tensor (`(1, 4)` for the
    1x4 blocks of a FULLY_CONNECTED weight `[out, in]`; all ones means plain
    CSR). `consumer` is the op reading it: DENSIFY means it is expanded to a
    dense copy at load time (smaller file, no speed-up); anything else reads
    the sparse encoding directly.
    """

    block: tuple
    stored_values: int
    index_bytes: int
    dense_bytes: int
    consumer: str

    @property
    def layout(self):
        if all(b == 1 for b in self.block):
            return "CSR (random)"
        return "x".join(str(b) for b in self.block) + " blocks"

    value_bytes: int = 0

    @property
    def stored_bytes(self):
        return self.value_bytes + self.index_bytes

    @property
    def native(self):
        """True when the consuming kernel reads the sparse form (no DENSIFY)."""
        return self.consumer in flatbuffer.SPARSE_KERNELS

    def to_dict(self):
        return {"block": list(self.block), "layout": self.layout, "stored_values": self.stored_values,
                "stored_bytes": self.stored_bytes, "dense_bytes": self.dense_bytes,
                "consumer": self.consumer, "native": self.native}


@dataclasses.dataclass
class TensorInfo:
    """One tensor: shape, dtype, bytes in the file, quantization, sparsity."""

    index: int
    subgraph: int
    name: str
    shape: tuple
    shape_signature: tuple
    dtype: str
    constant: bool
    bytes: int  # bytes stored in the file (0 for activations)
    quantization: dict | None = dataclasses.field(repr=False)
    sparsity: SparseInfo | None = None

    @property
    def dynamic(self):
        return any(d < 0 for d in self.shape_signature)

    @property
    def dense_bytes(self):
        itemsize = np.dtype(flatbuffer._NUMPY_DTYPES.get(self.dtype, np.uint8)).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize if self.shape else itemsize

    def to_dict(self):
        return {"index": self.index, "subgraph": self.subgraph, "name": self.name, "shape": list(self.shape),
                "shape_signature": list(self.shape_signature), "dtype": self.dtype, "constant": self.constant,
                "bytes": self.bytes, "quantization": self.quantization,
                "sparsity": self.sparsity.to_dict() if self.sparsity else None}


@dataclasses.dataclass
class OpInfo:
    index: int
    subgraph: int
    name: str
    custom: bool
    inputs: list
    outputs: list
    options: object = dataclasses.field(repr=False, default=None)

    def to_dict(self):
        return {"index": self.index, "subgraph": self.subgraph, "name": self.name, "custom": self.custom,
                "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclasses.dataclass
class Problem:
    """Why one op (or the whole model) cannot run as-is on a target."""

    message: str
    op: str | None = None
    op_index: int | None = None
    subgraph: int = 0

    def __str__(self):
        where = f"op #{self.op_index} {self.op}: " if self.op is not None else ""
        return where + self.message

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Verdict:
    """Can `target` run the model? `problems` say why not, `warnings` what to watch.

    For the EdgeTPU, `first_fallback` is the op at which the compiler stops
    mapping to the TPU (it and everything after it run on the CPU), and
    `tpu_ops` / `cpu_ops` count the split.
    """

    target: str
    problems: list
    warnings: list
    first_fallback: Problem | None = None
    tpu_ops: int | None = None
    cpu_ops: int | None = None
    parameter_bytes: int | None = None

    @property
    def ok(self):
        return not self.problems

    def __str__(self):
        lines = [f"{self.target}: {'OK' if self.ok else 'NO'}"]
        if self.tpu_ops is not None:
            lines[0] += f" ({self.tpu_ops} ops on the Edge TPU, {self.cpu_ops} on the CPU)"
        if self.first_fallback is not None:
            lines.append(f"  first CPU fallback: {self.first_fallback}")
        lines += [f"  - {p}" for p in self.problems if p is not self.first_fallback]
        lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self):
        return {"target": self.target, "ok": self.ok, "problems": [p.to_dict() for p in self.problems],
                "warnings": list(self.warnings),
                "first_fallback": self.first_fallback.to_dict() if self.first_fallback else None,
                "tpu_ops": self.tpu_ops, "cpu_ops": self.cpu_ops, "parameter_bytes": self.parameter_bytes}


class Graph:
    """One subgraph: its tensors and ops, plus constant lookup for checks."""

    def __init__(self, index, tensors, ops, inputs, outputs, constant):
        self.index = index
        self.tensors = tensors
        self.ops = ops
        self.inputs = inputs
        self.outputs = outputs
        self._constant = constant

    def constant(self, tensor_index):
        """The (dense) value of a constant tensor as numpy, or None."""
        return self._constant(self.index, tensor_index)


class ModelInfo:
    """Result of `inspect`: ops, tensors, sparse tensors, quantization, verdicts.

    `str(info)` is a readable report; `info.to_dict()` the same as data.
    """

    def __init__(self, data, model, source=None):
        self.source = source
        self.size = len(data)
        self.version = model.version
        description = model.description
        self.description = description.decode(errors="replace") if isinstance(description, bytes) else description
        self._model = model
        self._data = data
        self._cache = {}
        self.graphs = [self._graph(s, sub) for s, sub in enumerate(model.subgraphs)]
        self._verdicts = {}

    # ---- parsing -------------------------------------------------------
    def _graph(self, s, sub):
        model = self._model
        tensors = []
        consumers = collections.defaultdict(list)
        ops = []
        for k, op in enumerate(sub.operators or []):
            name, custom = flatbuffer.op_name(model, op)
            inputs = [int(i) for i in (op.inputs if op.inputs is not None else [])]
            outputs = [int(i) for i in (op.outputs if op.outputs is not None else [])]
            ops.append(OpInfo(k, s, name, custom, inputs, outputs, op.builtinOptions))
            for i in inputs:
                consumers[i].append(name)
        for i, t in enumerate(sub.tensors or []):
            raw_size = len(flatbuffer.buffer_bytes(model, t.buffer, self._data)) if t.buffer else 0
            shape = tuple(int(d) for d in (t.shape if t.shape is not None else []))
            signature = tuple(int(d) for d in t.shapeSignature) if t.shapeSignature is not None else shape
            dtype = flatbuffer.dtype_name(t.type)
            sparse = None
            if t.sparsity is not None:
                itemsize = np.dtype(flatbuffer._NUMPY_DTYPES.get(dtype, np.uint8)).itemsize
                dense_shape = shape
                blocks = flatbuffer.block_shape(t.sparsity, len(dense_shape))
                index_bytes = flatbuffer.sparse_index_bytes(t.sparsity)
                sparse = SparseInfo(
                    block=blocks, stored_values=raw_size // itemsize, index_bytes=index_bytes,
                    dense_bytes=int(np.prod(dense_shape, dtype=np.int64)) * itemsize,
                    consumer=(consumers.get(i) or ["(unused)"])[0], value_bytes=raw_size)
            tensors.append(TensorInfo(
                index=i, subgraph=s, name=_text(t.name), shape=shape, shape_signature=signature,
                dtype=dtype, constant=raw_size > 0, bytes=raw_size,
                quantization=_quantization(t.quantization), sparsity=sparse))
        inputs = [int(i) for i in (sub.inputs if sub.inputs is not None else [])]
        outputs = [int(i) for i in (sub.outputs if sub.outputs is not None else [])]
        return Graph(s, tensors, ops, inputs, outputs, self._constant)

    def _constant(self, s, i):
        key = (s, i)
        if key not in self._cache:
            t = self._model.subgraphs[s].tensors[i]
            raw = flatbuffer.buffer_bytes(self._model, t.buffer, self._data) if t.buffer else b""
            dtype = flatbuffer.numpy_dtype(t.type)
            if not raw or dtype is None:
                value = None
            else:
                value = np.frombuffer(raw, dtype=dtype)
                if t.sparsity is not None:
                    value = flatbuffer.decode_sparse(value, t.sparsity, t.shape)
                elif t.shape is not None and value.size == int(np.prod(t.shape, dtype=np.int64)):
                    value = value.reshape([int(d) for d in t.shape])
            self._cache[key] = value
        return self._cache[key]

    # ---- views ----------------------------------------------------------
    @property
    def ops(self):
        """Every op, main subgraph first (execution order within each)."""
        return [op for g in self.graphs for op in g.ops]

    @property
    def tensors(self):
        return [t for g in self.graphs for t in g.tensors]

    @property
    def inputs(self):
        g = self.graphs[0]
        return [g.tensors[i] for i in g.inputs]

    @property
    def outputs(self):
        g = self.graphs[0]
        return [g.tensors[i] for i in g.outputs]

    @property
    def op_counts(self):
        return collections.Counter(op.name for op in self.ops)

    @property
    def sparse_tensors(self):
        return [t for t in self.tensors if t.sparsity is not None]

    @property
    def recurrent(self):
        """The recurrent export form ("step", "loop", "fused"; dict) or None (see export/recurrent.py)."""
        from tf_sparsity.export import recurrent

        return recurrent.describe(self)

    @property
    def parameter_bytes(self):
        """Bytes of all constant tensors (weights, biases, shape constants)."""
        return sum(t.bytes for t in self.tensors if t.constant)

    def verdict(self, target):
        """The `Verdict` for one target: a `Target` or its name ('litert', 'edgetpu', 'tflm')."""
        spec = target if isinstance(target, targets.Target) else targets.get_target(target)
        if spec.name not in self._verdicts:
            self._verdicts[spec.name] = check(self, spec)
        return self._verdicts[spec.name]

    @property
    def verdicts(self):
        return {name: self.verdict(name) for name in targets.TARGETS}

    def to_dict(self):
        return {
            "source": self.source, "size": self.size, "version": self.version,
            "subgraphs": len(self.graphs), "op_counts": dict(self.op_counts),
            "ops": [op.to_dict() for op in self.ops],
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "tensors": [t.to_dict() for t in self.tensors],
            "sparse_tensors": [t.name for t in self.sparse_tensors],
            "parameter_bytes": self.parameter_bytes, "recurrent": self.recurrent,
            "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
        }

    def __str__(self):
        lines = [f"TFLite model{' ' + self.source if self.source else ''}: {self.size:,} bytes, "
                 f"{len(self.ops)} ops in {len(self.graphs)} subgraph(s), "
                 f"{self.parameter_bytes:,} bytes of constants"]
        for label, tensors in (("input", self.inputs), ("output", self.outputs)):
            for t in tensors:
                lines.append(f"  {label:6} {t.name}: {t.dtype}{list(t.shape_signature)}{_quant_text(t)}")
        lines.append("  ops: " + ", ".join(f"{n} x{c}" for n, c in self.op_counts.most_common()))
        form = self.recurrent
        if form:
            states = form.get("states", [])
            lines.append(f"  recurrent form: {form['form']}" + (
                f" (one time step of {form.get('steps')}; {len(states)} state(s) carried: "
                + ", ".join(f"input {s['input']} -> output {s['output']}" for s in states) + ")"
                if form["form"] == "step" else ""))
        if self.sparse_tensors:
            lines.append("  sparse tensors:")
            for t in self.sparse_tensors:
                s = t.sparsity
                lines.append(f"    {t.name} {t.dtype}{list(t.shape)}: {s.layout}, {s.stored_bytes:,} of "
                             f"{s.dense_bytes:,} dense bytes, read by {s.consumer}"
                             + ("" if s.native else " (expanded at load: no speed-up)"
                                if s.consumer == "DENSIFY" else " (a kernel that cannot read it sparse!)"))
        big = sorted((t for t in self.tensors if t.constant), key=lambda t: -t.bytes)[:5]
        if big:
            lines.append("  largest constants: " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)} {t.bytes:,} B" for t in big))
        lines.append("  targets:")
        for verdict in self.verdicts.values():
            lines += ["    " + line for line in str(verdict).splitlines()]
        return "\n".join(lines)

    def __repr__(self):
        return f"<ModelInfo {self.size} bytes, {len(self.ops)} ops>"


def inspect(model):
    """Analyze a .tflite model: ops, tensors, sparse tensors, quantization, verdicts.

    `model` is a path or the model's bytes. Works on any TFLite file, not only
    the ones `convert` writes. Raises `ValueError` (`InvalidModelError`) for
    anything that is not a readable TFLite flatbuffer.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> info = tfs.export.inspect(tfs.export.convert(m, verify=False).tflite)
    >>> info.op_counts["FULLY_CONNECTED"], info.verdict("litert").ok
    (1, True)
    >>> tfs.export.inspect(b"not a model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tf_sparsity.export.errors.InvalidModelError: not a TFLite model: ...
    """
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"`model`: no such .tflite file: {source}")
        with open(source, "rb") as f:
            data = f.read()
    elif isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    elif isinstance(model, ExportResult):
        data = model.tflite
    else:
        raise TypeError(f"`model` must be a path or .tflite bytes; received {type(model).__name__}.")
    return ModelInfo(data, flatbuffer.read(data), source=source)


# --------------------------------------------------------------------------
# Per-target checks.

_INT8 = {"int8", "uint8"}


def check(info, spec):
    """Check every op and tensor of `info` against the `Target` `spec`."""
    target = spec.name
    if target == "edgetpu":
        return _check_edgetpu(info, spec)
    problems, warnings = [], []
    for g in info.graphs:
        for op in g.ops:
            problem = _unsupported(op, spec)
            if problem:
                problems.append(problem)
                continue
            for i in op.inputs:
                t = g.tensors[i] if i >= 0 else None
                if t is not None and t.sparsity is not None and op.name not in ("DENSIFY",) + tuple(
                        flatbuffer.SPARSE_KERNELS):
                    problems.append(Problem(
                        f"reads sparse tensor '{t.name}' but has no sparse kernel: it would read the "
                        "packed values as dense (wrong outputs); re-export with sparse='auto'",
                        op.name, op.index, g.index))
            if op.name == "FULLY_CONNECTED" and len(op.inputs) > 1 and op.inputs[1] >= 0:
                w, a = g.tensors[op.inputs[1]], g.tensors[op.inputs[0]]
                if w.sparsity is not None and w.dtype in _INT8 and a.dtype == "float32":
                    problems.append(Problem(
                        "dynamic-range FULLY_CONNECTED (float input, int8 weights) with sparse weights: "
                        "LiteRT computes wrong outputs from it (measured); re-export with "
                        "sparse='auto'", op.name, op.index, g.index))
            if op.name == "DENSIFY" and not op.custom:
                dtype = g.tensors[op.outputs[0]].dtype
                if not spec.sparse:
                    problems.append(Problem(
                        f"{spec.name} has no DENSIFY kernel, so sparse weights cannot load; re-export "
                        "dense (sparse=False) and shrink the model with structured pruning or LUT "
                        "compression instead", op.name, op.index, g.index))
                elif dtype not in ("float32", "float16"):
                    problems.append(Problem(
                        f"densifies {dtype} weights, which fail to allocate under LiteRT's default "
                        "XNNPack delegate; re-export with sparse='auto' (stores them dense) or prune "
                        "in 1x16 blocks so the int8 kernel reads them sparse", op.name, op.index, g.index))
    if not spec.sparse:
        for t in info.sparse_tensors:
            if t.sparsity.native:
                problems.append(Problem(f"tensor '{t.name}' is stored sparse; {spec.name} reads dense tensors only"))
    if spec.static_shapes:
        for t in info.inputs + info.outputs:
            if t.dynamic:
                # TFLM ignores the signature and allocates the stored shape.
                warnings.append(f"tensor '{t.name}' has a dynamic shape {list(t.shape_signature)}; "
                                f"{spec.name} uses the stored shape {list(t.shape)} (export with batch_size=1)")
    if target == "tflm":
        floats = sorted({op.name for g in info.graphs for op in g.ops
                         if any(g.tensors[i].dtype == "float32" for i in op.outputs if i >= 0)})
        if floats:
            warnings.append("float32 ops (" + ", ".join(floats) + ") run on TFLM's slow reference "
                            "kernels and need 4x the memory; export with quantize='int8'")
    return Verdict(target, problems, warnings)


def _unsupported(op, spec):
    if op.custom and op.name.startswith("Flex"):
        return Problem(f"is a TensorFlow (Flex / Select TF) op; {spec.name} runs builtin ops only. "
                       "Replace the layer that produces it with builtin-supported ops",
                       op.name, op.index, op.subgraph)
    if not spec.supports_op(op.name, op.custom):
        kind = "custom op" if op.custom else "op"
        return Problem(f"{kind} not supported by {spec.runtime}; replace the layer that produces it "
                       "or pick another target", op.name, op.index, op.subgraph)
    return None


def _check_edgetpu(info, spec):
    problems, warnings = [], []
    first = None
    tpu_ops = cpu_ops = 0
    tpu_param_bytes = 0
    for g in info.graphs:
        if g.index > 0:
            problems.append(Problem(f"subgraph {g.index} (control flow) cannot be compiled for the Edge TPU; "
                                    "unroll RNNs / remove loops"))
            cpu_ops += len(g.ops)
            continue
        for op in g.ops:
            reason = _edgetpu_op_problem(op, g, spec)
            if reason is None and first is None:
                tpu_ops += 1
                tpu_param_bytes += sum(g.tensors[i].bytes for i in op.inputs if i >= 0 and g.tensors[i].constant)
                continue
            cpu_ops += 1
            if reason is not None:
                problem = Problem(reason, op.name, op.index, g.index)
                problems.append(problem)
                if first is None:
                    first = problem
    for t in info.inputs + info.outputs:
        if t.dtype not in _INT8:
            problems.append(Problem(f"model {('input' if t in info.inputs else 'output')} '{t.name}' is "
                                    f"{t.dtype}; the Edge TPU needs int8/uint8 (export with quantize='int8')"))
        if t.dynamic:
            problems.append(Problem(f"tensor '{t.name}' has a dynamic shape {list(t.shape_signature)}; "
                                    "the Edge TPU needs static shapes (batch 1)"))
    if tpu_param_bytes > targets.EDGETPU_PARAMETER_CACHE_BYTES:
        warnings.append(f"{tpu_param_bytes:,} bytes of parameters exceed the ~8 MB on-chip cache; the rest "
                        "streams from host memory every inference (slower). Prune structurally to shrink it")
    if first is not None and first.op_index is not None:
        warnings.append(f"the compiler maps ops only up to op #{first.op_index} {first.op}; it and the "
                        f"{cpu_ops - 1} ops after it run on the CPU")
    return Verdict("edgetpu", problems, warnings, first_fallback=first, tpu_ops=tpu_ops,
                   cpu_ops=cpu_ops, parameter_bytes=tpu_param_bytes)


def _edgetpu_op_problem(op, g, spec):
    """Why the Edge TPU compiler would not map `op`, or None."""
    if op.custom or op.name not in targets.EDGETPU_OPS:
        return "not in the Edge TPU's supported-op table (Coral docs); it runs on the CPU"
    for i in op.inputs + op.outputs:
        if i < 0:
            continue
        t = g.tensors[i]
        if t.constant:
            if t.dtype not in _INT8 | {"int32"}:
                return f"constant '{t.name}' is {t.dtype}; the Edge TPU needs 8-bit weights (full int8)"
            if t.sparsity is not None:
                return f"constant '{t.name}' is stored sparse; the Edge TPU needs dense weights"
            continue
        if t.dtype not in _INT8:
            return f"works on {t.dtype} tensor '{t.name}'; the Edge TPU needs int8/uint8 (full int8)"
        if t.dynamic:
            return f"tensor '{t.name}' has a dynamic shape {list(t.shape_signature)}"
        if len(t.shape) > 3 and int(np.prod(t.shape[:-3])) != 1:
            return (f"tensor '{t.name}' {list(t.shape)} has more than 3 dimensions larger than 1 "
                    "(only the 3 innermost may be > 1)")
    check_fn = targets.EDGETPU_CHECKS.get(op.name)
    if check_fn is not None:
        reason = check_fn(op, g)
        if reason:
            return f"{reason} — Edge TPU limitation: {targets.EDGETPU_OPS[op.name]}"
    return None


def _text(value):
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _quantization(q):
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, np.float64)
    zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), np.int64)
    if scale.size == 1:
        return {"scale": float(scale[0]), "zero_point": int(zero[0]), "axis": None}
    return {"scale": scale.tolist(), "zero_point": zero.tolist(), "axis": int(q.quantizedDimension)}


def _quant_text(t):
    q = t.quantization
    if not q:
        return ""
    if q["axis"] is None:
        return f" (scale {q['scale']:.4g}, zero point {q['zero_point']})"
    return f" (per-channel along axis {q['axis']}, {len(q['scale'])} scales)"
