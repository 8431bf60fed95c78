"""Read, decode and rewrite .tflite flatbuffers (TensorFlow's generated schema).

The one place that touches the TFLite schema's object API: parsing with a
clear error for non-TFLite input, names of ops and dtypes, reading constant
buffers (including >2 GB models' out-of-band buffers), decoding sparse
tensors, and the one rewrite the exporter needs — replacing DENSIFY ops by
dense constants — written back with 16-byte-aligned buffers (the Python
flatbuffers builder ignores the schema's `force_align`).
"""

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from tf_sparsity.export.errors import InvalidModelError

FILE_IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_DTYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_NUMPY_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8,
    "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64, "bool": np.bool_,
}


def read(data):
    """Parse .tflite bytes into a `schema.ModelT`; any failure -> InvalidModelError."""
    data = bytes(data)
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        head = data[4:8] if len(data) >= 8 else data
        raise InvalidModelError(
            f"not a TFLite model: expected the flatbuffer identifier {FILE_IDENTIFIER!r} at "
            f"bytes 4-8, found {head!r} ({len(data)} bytes). Pass a .tflite file written by "
            "the TFLite converter."
        )
    try:
        root = schema.Model.GetRootAs(data, 0)
        # Garbage behind a valid identifier can claim billions of entries;
        # every table entry takes >= 4 bytes, so bound the lengths first.
        limit = len(data) // 4
        lengths = [root.OperatorCodesLength(), root.SubgraphsLength(), root.BuffersLength(),
                   root.MetadataLength(), root.SignatureDefsLength()]
        for i in range(root.SubgraphsLength()):
            sub = root.Subgraphs(i)
            lengths += [sub.TensorsLength(), sub.OperatorsLength(), sub.InputsLength(), sub.OutputsLength()]
        if max(lengths) > limit:
            raise ValueError("table lengths exceed the file size")
        model = schema.ModelT.InitFromObj(root)
        if not model.subgraphs or model.operatorCodes is None and any(s.operators for s in model.subgraphs):
            raise ValueError("no subgraphs")
        for sub in model.subgraphs:
            for op in sub.operators or []:
                model.operatorCodes[op.opcodeIndex]
                for i in list(op.inputs if op.inputs is not None else []) + list(op.outputs if op.outputs is not None else []):
                    if i >= 0:
                        sub.tensors[i]
            for t in sub.tensors or []:
                if t.buffer >= len(model.buffers or []):
                    raise ValueError(f"tensor buffer {t.buffer} out of range")
                buf = model.buffers[t.buffer]
                if buf.offset > 1 and buf.offset + buf.size > len(data):
                    raise ValueError("buffer extends past the end of the file")
    except InvalidModelError:
        raise
    except Exception as error:  # the generated parser raises whatever struct/index error it hits
        raise InvalidModelError(
            f"not a readable TFLite model ({len(data)} bytes; the flatbuffer is truncated or "
            f"corrupt: {type(error).__name__}: {error})."
        ) from None
    return model


def op_name(model, op):
    """`(name, is_custom)` of an operator: builtin name, or the custom op's code."""
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        custom = code.customCode
        return (custom.decode() if isinstance(custom, bytes) else str(custom)), True
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}"), False


def dtype_name(tensor_type):
    return _DTYPE_NAMES.get(tensor_type, f"type{tensor_type}")


def numpy_dtype(tensor_type):
    return _NUMPY_DTYPES.get(dtype_name(tensor_type))


def buffer_bytes(model, index, data=None):
    """The raw bytes of buffer `index` (b"" when empty)."""
    buf = model.buffers[index]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, np.uint8).tobytes()
    if buf.offset > 1 and data is not None:  # >2 GB models keep buffers after the flatbuffer
        return bytes(data[buf.offset:buf.offset + buf.size])
    return b""


def _vector(sparse_index_vector):
    if sparse_index_vector is None:
        return np.zeros(0, np.int64)
    return np.asarray(sparse_index_vector.values, np.int64)


def decode_sparse(values, sparsity, shape):
    """Dense numpy array of a TFLite sparse tensor.

    `values` are the stored values (1-D), `sparsity` a `SparsityParametersT`,
    `shape` the dense shape. TFLite stores the tensor as a tree, one level per
    entry of `traversalOrder` (the original dims, then one inner dim per
    blocked dim): DENSE levels enumerate every index, SPARSE_CSR levels list
    the present ones (segments + indices). Walking the levels vectorized gives
    each stored value's coordinates.
    """
    shape = [int(s) for s in shape]
    n = len(shape)
    order = [int(d) for d in sparsity.traversalOrder]
    block_map = [int(d) for d in (sparsity.blockMap if sparsity.blockMap is not None else [])]
    levels = sparsity.dimMetadata
    pos = np.zeros(1, np.int64)
    coords = np.zeros((1, len(order)), np.int64)
    for level, dim in enumerate(order):
        meta = levels[level]
        if meta.format == schema.DimensionType.DENSE:
            size = int(meta.denseSize)
            child = np.tile(np.arange(size, dtype=np.int64), len(pos))
            new_pos = (pos[:, None] * size + np.arange(size)).ravel()
            coords = np.repeat(coords, size, axis=0)
        else:
            segments, indices = _vector(meta.arraySegments), _vector(meta.arrayIndices)
            starts, ends = segments[pos], segments[pos + 1]
            counts = ends - starts
            total = int(counts.sum())
            offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            new_pos = offsets + np.arange(total)
            child = indices[new_pos]
            coords = np.repeat(coords, counts, axis=0)
        coords[:, dim] = child
        pos = new_pos
    full = coords[:, :n].copy()
    for j, original in enumerate(block_map):
        block = int(levels[order.index(n + j)].denseSize)
        full[:, original] = full[:, original] * block + coords[:, n + j]
    # Blocks may overhang a dim that is not a multiple of the block size.
    inside = np.all(full < np.asarray(shape), axis=1)
    dense = np.zeros(shape, dtype=values.dtype)
    dense[tuple(full[inside].T)] = values[pos[inside]]
    return dense


def block_shape(sparsity, rank):
    """Per original dim, the block size (1 where the dim is not blocked)."""
    shape = [1] * rank
    order = [int(d) for d in sparsity.traversalOrder]
    for j, original in enumerate(sparsity.blockMap if sparsity.blockMap is not None else []):
        shape[int(original)] = int(sparsity.dimMetadata[order.index(rank + j)].denseSize)
    return tuple(shape)


def sparse_index_bytes(sparsity):
    """Bytes the sparse index arrays (segments + indices) take in the file."""
    total = 0
    for meta in sparsity.dimMetadata:
        for kind, vec in ((meta.arraySegmentsType, meta.arraySegments), (meta.arrayIndicesType, meta.arrayIndices)):
            if vec is not None:
                width = {schema.SparseIndexVector.Int32Vector: 4, schema.SparseIndexVector.Uint16Vector: 2,
                         schema.SparseIndexVector.Uint8Vector: 1}.get(kind, 4)
                total += width * len(vec.values)
    return total


class _AlignedBuffer(schema.BufferT):
    """A BufferT whose data vector is written 16-byte aligned (as the converter does)."""

    def Pack(self, builder):
        data = None
        if self.data is not None and len(self.data):
            payload = np.asarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            builder.vectorNumElems = len(payload)
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)


def write(model):
    """Serialize a `schema.ModelT` to .tflite bytes with aligned buffers."""
    size = sum(len(b.data) for b in model.buffers if b.data is not None)
    for buf in model.buffers:
        buf.__class__ = _AlignedBuffer
    builder = flatbuffers.Builder(size + 65536)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    for buf in model.buffers:
        buf.__class__ = schema.BufferT
    return bytes(builder.Output())


# Ops whose kernels read sparse weights directly (the converter's sparse
# FULLY_CONNECTED). Any other op handed a sparse constant (e.g. the
# DEQUANTIZE of a float16 model) reads its packed values as if dense.
SPARSE_KERNELS = frozenset({"FULLY_CONNECTED"})


def densify(data, keep=lambda dtype, block, shape, consumer: False):
    """Store sparse weights dense; returns (bytes, replaced).

    Covers both encodings the converter emits: a sparse constant behind a
    DENSIFY op (the op is removed and its output becomes the dense constant)
    and a sparse constant read directly by a kernel (its sparsity
    parameters are dropped). `keep(dtype, block_shape, dense_shape,
    consumer)` says which may stay sparse (`consumer` is the op reading the
    tensor: "DENSIFY" or the kernel). A sparse tensor with no stored value
    (an all-zero weight) is always stored dense: its buffer is empty, and the
    runtimes read a constant with an empty buffer as a tensor without data
    (measured, LiteRT 2.3: "Input tensor ... lacks data"). `replaced` lists
    `(tensor_name, dtype, block_shape, dense_shape, consumer, stored values)`.
    Unused tensors, buffers and op codes are dropped afterwards.
    """
    model = read(data)
    replaced = []

    def stored(tensor):
        return len(buffer_bytes(model, tensor.buffer, data)) // np.dtype(numpy_dtype(tensor.type)).itemsize

    def dense_buffer(tensor, shape):
        values = np.frombuffer(buffer_bytes(model, tensor.buffer, data), dtype=numpy_dtype(tensor.type))
        dense = decode_sparse(values, tensor.sparsity, shape)
        new = schema.BufferT()
        new.data = np.frombuffer(dense.astype(dense.dtype.newbyteorder("<")).tobytes(), np.uint8)
        model.buffers.append(new)
        return len(model.buffers) - 1

    for sub in model.subgraphs:
        kept_ops = []
        densify_inputs = set()
        for op in sub.operators or []:
            name, custom = op_name(model, op)
            if name != "DENSIFY" or custom:
                kept_ops.append(op)
                continue
            src, dst = sub.tensors[op.inputs[0]], sub.tensors[op.outputs[0]]
            densify_inputs.add(op.inputs[0])
            dtype, shape = dtype_name(src.type), tuple(int(d) for d in dst.shape)
            blocks = block_shape(src.sparsity, len(shape))
            count = stored(src)
            if count and keep(dtype, blocks, shape, "DENSIFY"):
                kept_ops.append(op)
                continue
            dst.buffer = dense_buffer(src, shape)
            if dst.quantization is None or dst.quantization.scale is None:
                dst.quantization = src.quantization
            replaced.append((_name(dst), dtype, blocks, shape, "DENSIFY", count))
        sub.operators = kept_ops
        consumers = {}
        for op in sub.operators:
            for i in op.inputs if op.inputs is not None else []:
                consumers.setdefault(i, op_name(model, op)[0])
        for i, tensor in enumerate(sub.tensors or []):
            if tensor.sparsity is None or i in densify_inputs:
                continue
            dtype, shape = dtype_name(tensor.type), tuple(int(d) for d in tensor.shape)
            blocks = block_shape(tensor.sparsity, len(shape))
            consumer = consumers.get(i, "")
            count = stored(tensor)
            if count and keep(dtype, blocks, shape, consumer):
                continue
            tensor.buffer = dense_buffer(tensor, shape)
            tensor.sparsity = None
            replaced.append((_name(tensor), dtype, blocks, shape, consumer, count))
    if not replaced:
        return bytes(data), replaced
    _drop_unused(model)
    return write(model), replaced


def align_with_dense(data, donor, copy=()):
    """Make a partly densified model agree with a dense conversion `donor`.

    Both models come from the same Keras model (same op sequence); tensors
    and ops are matched by position, not by name, since the converter names
    them differently per run. Two fixes:

    - constants named in `copy` take the donor's values and quantization
      (the sparse encoding lost some of them);
    - every op that reads no sparse tensor any more takes the donor's op
      version: a kernel that read sparse weights carries the "sparse" op
      version (FULLY_CONNECTED v8), which XNNPack does not take even after
      the weights are dense (measured: int8 MLP 222 us -> 1452 us).

    Returns the new bytes, or None when the two graphs do not line up.
    """
    model, other = read(data), read(donor)
    if len(model.subgraphs) != len(other.subgraphs):
        return None
    copy, done = set(copy), set()
    codes = {}
    for sub, sub_b in zip(model.subgraphs, other.subgraphs):
        # DENSIFY ops kept on purpose (float, sparse=True) have no dense twin.
        ops_a = [o for o in sub.operators or [] if op_name(model, o) != ("DENSIFY", False)]
        ops_b = sub_b.operators or []
        if [op_name(model, o) for o in ops_a] != [op_name(other, o) for o in ops_b]:
            return None
        for op_a, op_b in zip(ops_a, ops_b):
            inputs = list(zip(op_a.inputs if op_a.inputs is not None else [], op_b.inputs if op_b.inputs is not None else []))
            for ia, ib in inputs:
                if ia < 0 or ib < 0 or _name(sub.tensors[ia]) not in copy:
                    continue
                ta, tb = sub.tensors[ia], sub_b.tensors[ib]
                if list(ta.shape) != list(tb.shape) or ta.type != tb.type or tb.sparsity is not None:
                    return None
                new = schema.BufferT()
                new.data = np.frombuffer(buffer_bytes(other, tb.buffer, donor), np.uint8)
                model.buffers.append(new)
                ta.buffer = len(model.buffers) - 1
                ta.quantization = tb.quantization
                ta.sparsity = None
                done.add(_name(ta))
            if any(ia >= 0 and sub.tensors[ia].sparsity is not None for ia, _ in inputs):
                continue
            code_a, code_b = model.operatorCodes[op_a.opcodeIndex], other.operatorCodes[op_b.opcodeIndex]
            if code_a.version == code_b.version:
                continue
            key = (op_a.opcodeIndex, code_b.version)
            if key not in codes:
                clone = schema.OperatorCodeT()
                clone.__dict__.update(code_a.__dict__)
                clone.version = code_b.version
                model.operatorCodes.append(clone)
                codes[key] = len(model.operatorCodes) - 1
            op_a.opcodeIndex = codes[key]
    if done != copy:
        return None
    _drop_unused(model)
    return write(model)


def expose_op_outputs(data):
    """Every op output of the main subgraph made a model output -> (bytes, ops).

    For op-by-op comparisons between runtimes: the exposed tensors stay alive
    (the memory planner cannot reuse them) and both interpreters return them
    as outputs, the original outputs first. `ops` lists, in execution order,
    `(op name, output position)` of each op's first output.
    """
    model = read(data)
    sub = model.subgraphs[0]
    outputs = [int(i) for i in (sub.outputs if sub.outputs is not None else [])]
    ops = []
    for op in sub.operators or []:
        exposed = [int(i) for i in op.outputs if i >= 0]
        outputs += [i for i in exposed if i not in outputs]
        ops.append((op_name(model, op)[0], outputs.index(exposed[0]) if exposed else None))
    sub.outputs = np.array(outputs, dtype=np.int32)
    return write(model), ops


def _name(tensor):
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _drop_unused(model):
    """Remove tensors no op or signature uses, their buffers' data, and unused op codes."""
    used_buffers = set()
    for s_index, sub in enumerate(model.subgraphs):
        used = set(sub.inputs if sub.inputs is not None else []) | set(sub.outputs if sub.outputs is not None else [])
        for op in sub.operators or []:
            for field in (op.inputs, op.outputs, op.intermediates):
                used |= set(field if field is not None else [])
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == s_index:
                used |= {m.tensorIndex for m in list(sig.inputs or []) + list(sig.outputs or [])}
        used.discard(-1)
        order = sorted(used)
        remap = {old: new for new, old in enumerate(order)}
        remap[-1] = -1
        sub.tensors = [sub.tensors[i] for i in order]
        for op in sub.operators or []:
            op.inputs = [remap[i] for i in op.inputs] if op.inputs is not None else None
            op.outputs = [remap[i] for i in op.outputs] if op.outputs is not None else None
            if op.intermediates is not None:
                op.intermediates = [remap[i] for i in op.intermediates]
        sub.inputs = [remap[i] for i in sub.inputs] if sub.inputs is not None else None
        sub.outputs = [remap[i] for i in sub.outputs] if sub.outputs is not None else None
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == s_index:
                for m in list(sig.inputs or []) + list(sig.outputs or []):
                    m.tensorIndex = remap[m.tensorIndex]
        used_buffers |= {t.buffer for t in sub.tensors}
    # Keep buffer indices stable (metadata points at buffers too); just drop data.
    metadata_buffers = {m.buffer for m in model.metadata or []}
    for i, buf in enumerate(model.buffers):
        if i not in used_buffers and i not in metadata_buffers:
            buf.data = None
    used_codes = sorted({op.opcodeIndex for sub in model.subgraphs for op in sub.operators or []})
    code_map = {old: new for new, old in enumerate(used_codes)}
    model.operatorCodes = [model.operatorCodes[i] for i in used_codes]
    for sub in model.subgraphs:
        for op in sub.operators or []:
            op.opcodeIndex = code_map[op.opcodeIndex]
