"""What each deployment target can run: the exporter's one capability table.

Everything target-specific that `convert` and `inspect` decide lives here:
which ops a runtime has, which quantization it needs, whether it can read
sparse tensors, and the EdgeTPU's per-op constraints. Sources:

- **EdgeTPU**: the "Supported operations" table of
  https://coral.ai/docs/edgetpu/models-intro (Edge TPU compiler 16), with its
  "known limitations" column (the part up to ResizeBilinear cross-checked
  against Axis' copy of the same table for the ARTPEC-7's Edge TPU), plus the
  general rules on that page: full 8-bit quantization, static tensor sizes,
  tensors of at most 3 dimensions unless the outer ones are 1, and the
  compiler maps ops only until the first unsupported one; everything after it
  runs on the CPU. About 8 MB of on-chip SRAM caches parameters; more streams
  from host memory. When `edgetpu_compiler` is installed, its log is the
  authority and `convert` includes it.
- **TFLM**: the builtin ops the tflite-micro Python interpreter registers
  (`python/tflite_micro/python_ops_resolver.cc`; the same kernels a firmware
  build gets from `MicroMutableOpResolver`), plus the TFLM_DECODE custom op
  used by LUT compression. There is no DENSIFY kernel, so sparse tensors make
  the model fail to load.
- **LiteRT**: every builtin op. The measured caveats (DESIGN.md): int8
  kernels behind a DENSIFY op fail to allocate under the default XNNPack
  delegate; float FULLY_CONNECTED kernels pruned in 1x4 blocks run on
  XNNPack's sparse kernels; int8 ones store sparse in 1x16 blocks.
"""

import dataclasses

# --------------------------------------------------------------------------
# EdgeTPU: op -> the "known limitations" text from Coral's table. The checks
# below implement each limitation that can be decided from the .tflite alone.
EDGETPU_OPS = {
    "ADD": "",
    "AVERAGE_POOL_2D": "No fused activation function.",
    "CONCATENATION": (
        "No fused activation function. If any input is a compile-time constant tensor, there "
        "must be only 2 inputs, and this constant tensor must be all zeroes (effectively, a "
        "zero-padding op)."
    ),
    "CONV_2D": "Must use the same dilation in x and y dimensions.",
    "DEPTHWISE_CONV_2D": "Must use the same dilation in x and y dimensions.",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": (
        "Only the default format is supported for fully-connected weights. Output tensor is "
        "one-dimensional."
    ),
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "Unidirectional LSTM only.",
    "MAXIMUM": "",
    "MAX_POOL_2D": "No fused activation function.",
    "MEAN": "No reduction in batch dimension. If a z-reduction, the z-dimension must be multiple of 4.",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "No packing in batch dimension.",
    "PAD": "No padding in batch dimension.",
    "PRELU": "Alpha must be 1-dimensional (only the innermost dimension can be >1 size).",
    "QUANTIZE": "",
    "REDUCE_MAX": "Cannot operate on the batch dimension.",
    "REDUCE_MIN": "Cannot operate on the batch dimension.",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "Certain reshapes might not be mapped for large tensor sizes.",
    "RESIZE_BILINEAR": (
        "Input/output is a 3-dimensional tensor. Depending on input/output size, this operation "
        "might not be mapped to the Edge TPU to avoid loss in precision."
    ),
    "RESIZE_NEAREST_NEIGHBOR": (
        "Input/output is a 3-dimensional tensor. Depending on input/output size, this operation "
        "might not be mapped to the Edge TPU to avoid loss in precision."
    ),
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "Supports only 1-D input tensor with a max of 16,000 elements.",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "No splitting in batch dimension.",
    "SQUARED_DIFFERENCE": "",
    "SQUEEZE": (
        "Supported only when input tensor dimensions that have leading 1s (that is, no relayout "
        "needed). For example input tensor with [y][x][z] = 1,1,10 or 1,5,10 is ok. But "
        "[y][x][z] = 5,1,10 is not supported."
    ),
    "STRIDED_SLICE": (
        "Supported only when all strides are equal to 1 (that is, effectively a Stride op), and "
        "with ellipsis-axis-mask == 0, and new-axis-max == 0."
    ),
    "SUB": "",
    "SUM": "Cannot operate on the batch dimension.",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}

EDGETPU_PARAMETER_CACHE_BYTES = 8 * 1024 * 1024

# --------------------------------------------------------------------------
# TFLM: builtins registered by tflite-micro's PythonOpsResolver (alphabetical).
TFLM_BUILTIN_OPS = frozenset({
    "ABS", "ADD", "ADD_N", "ARG_MAX", "ARG_MIN", "ASSIGN_VARIABLE", "AVERAGE_POOL_2D",
    "BATCH_MATMUL", "BATCH_TO_SPACE_ND", "BROADCAST_ARGS", "BROADCAST_TO", "CALL_ONCE", "CAST",
    "CEIL", "CONCATENATION", "CONV_2D", "COS", "CUMSUM", "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D",
    "DEQUANTIZE", "DIV", "ELU", "EMBEDDING_LOOKUP", "EQUAL", "EXP", "EXPAND_DIMS", "FILL",
    "FLOOR", "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED", "GATHER", "GATHER_ND", "GREATER",
    "GREATER_EQUAL", "HARD_SWISH", "IF", "L2_NORMALIZATION", "L2_POOL_2D", "LEAKY_RELU", "LESS",
    "LESS_EQUAL", "LOG", "LOG_SOFTMAX", "LOGICAL_AND", "LOGICAL_NOT", "LOGICAL_OR", "LOGISTIC",
    "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG", "NOT_EQUAL", "PACK",
    "PAD", "PADV2", "PRELU", "QUANTIZE", "READ_VARIABLE", "REDUCE_MAX", "RELU", "RELU6",
    "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "ROUND", "RSQRT", "SELECT_V2",
    "SHAPE", "SIN", "SLICE", "SOFTMAX", "SPACE_TO_BATCH_ND", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V",
    "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "SVDF",
    "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "UNIDIRECTIONAL_SEQUENCE_LSTM", "UNPACK",
    "VAR_HANDLE", "WHILE", "ZEROS_LIKE",
})
TFLM_CUSTOM_OPS = frozenset({"TFLM_DECODE", "TFLite_Detection_PostProcess", "ethos-u"})


@dataclasses.dataclass(frozen=True)
class Target:
    """One deployment target's capabilities (an entry of `TARGETS`)."""

    name: str
    runtime: str
    quantize: tuple  # accepted `quantize` values; the first is the default
    sparse: bool  # can the runtime read sparse (DENSIFY / sparse FC) tensors
    ops: frozenset | None  # builtin ops it can run; None = every builtin
    custom_ops: frozenset  # custom op names it registers
    static_shapes: bool  # needs every shape fixed (batch 1, fixed lengths)
    notes: str = ""

    def supports_op(self, name, custom=False):
        if custom:
            return name in self.custom_ops
        return self.ops is None or name in self.ops


# The capability table: one row per target.
TARGETS = {target.name: target for target in (
    Target(name="litert", runtime="LiteRT (ai_edge_litert) with the default XNNPack delegate",
           quantize=(None, "dynamic", "float16", "int8"), sparse=True, static_shapes=False, ops=None,
           custom_ops=frozenset({"TFLite_Detection_PostProcess"}),
           notes="1x4-block-sparse float FULLY_CONNECTED runs faster; int8 stores 1x16 blocks sparse"),
    Target(name="edgetpu", runtime="Coral Edge TPU (edgetpu_compiler + libedgetpu)", quantize=("int8",),
           sparse=False, static_shapes=True, ops=frozenset(EDGETPU_OPS), custom_ops=frozenset({"edgetpu-custom-op"}),
           notes="full int8; ops after the first unsupported one run on the CPU"),
    Target(name="tflm", runtime="TensorFlow Lite for Microcontrollers (tflite-micro)", quantize=("int8",),
           sparse=False, static_shapes=True, ops=TFLM_BUILTIN_OPS, custom_ops=TFLM_CUSTOM_OPS,
           notes="full int8; dense weights; LUT compression for few-valued weights"),
)}

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")
# int8 FULLY_CONNECTED weights: one scale per output channel (the converter's default) or one per tensor
# (tflite-micro then keeps one output multiplier per op instead of 8 bytes per output channel of op data).
WEIGHT_QUANTIZATION = ("per_channel", "per_tensor")

# Block layouts the LiteRT converter encodes natively (no DENSIFY), per weight
# dtype, as (rows, cols) of the TFLite FULLY_CONNECTED weight [out, in].
NATIVE_SPARSE_BLOCKS = {"float32": (1, 4), "float16": (1, 4), "int8": (1, 16)}


def get_target(name):
    """The `Target` called `name`, or a ValueError listing the known ones."""
    if name not in TARGETS:
        raise ValueError(f"`target` must be one of {sorted(TARGETS)}; received {name!r}.")
    return TARGETS[name]


# --------------------------------------------------------------------------
# EdgeTPU per-op limitation checks. Each takes (op, model) — an OpInfo and the
# ModelInfo it belongs to (see inspection.py) — and returns the reason the op
# would not map, or None.

_NO_ACTIVATION = 0  # ActivationFunctionType.NONE


def _fused_activation(op, model):
    act = getattr(op.options, "fusedActivationFunction", _NO_ACTIVATION)
    if act not in (None, _NO_ACTIVATION):
        return "has a fused activation function"
    return None


def _every(*checks):
    """One check made of several: the first reason any of them gives."""
    return lambda op, model: next((reason for check in checks if (reason := check(op, model))), None)


def _constant_concatenation_input(op, model):
    constants = [i for i in op.inputs if model.tensors[i].constant]
    if constants:
        if len(op.inputs) != 2:
            return "has a constant input but more than 2 inputs"
        for i in constants:
            value, quant = model.constant(i), model.tensors[i].quantization
            zero = quant["zero_point"] if quant and quant["axis"] is None else 0
            if value is not None and (value != zero).any():
                return "has a constant input that is not all zeroes"
    return None


_concatenation = _every(_fused_activation, _constant_concatenation_input)


def _same_dilation(op, model):
    opts = op.options
    if opts is not None and getattr(opts, "dilationWFactor", 1) != getattr(opts, "dilationHFactor", 1):
        return "uses different dilations in x and y"
    return None


def _fully_connected(op, model):
    opts = op.options
    if opts is not None and getattr(opts, "weightsFormat", 0) != 0:
        return "uses a non-default (shuffled) weights format"
    if len(op.inputs) > 1 and op.inputs[1] >= 0 and model.tensors[op.inputs[1]].sparsity is not None:
        return "has sparse weights (only the default dense format maps)"
    out = model.tensors[op.outputs[0]].shape
    if len(out) > 1 and _prod(out[:-1]) != 1:
        return f"output {list(out)} is not one-dimensional (batch must be 1)"
    return None


def _axes(op, model, index=1):
    if len(op.inputs) <= index or op.inputs[index] < 0:
        return None
    value = model.constant(op.inputs[index])
    if value is None:
        return None
    rank = len(model.tensors[op.inputs[0]].shape)
    return sorted({int(a) % max(rank, 1) for a in value.ravel()}), rank


def _no_batch_axis(op, model, index=1):
    axes = _axes(op, model, index)
    if axes is None:
        return "reduction axes are not a compile-time constant"
    axes, rank = axes
    if rank > 1 and 0 in axes:
        return "operates on the batch dimension"
    return None


def _mean_depth(op, model):
    axes, rank = _axes(op, model)
    depth = model.tensors[op.inputs[0]].shape[-1] if rank else 1
    if rank >= 3 and (rank - 1) in axes and depth % 4:
        return f"reduces the z-dimension of size {depth}, not a multiple of 4"
    return None


_mean = _every(_no_batch_axis, _mean_depth)


def _pad(op, model):
    pads = model.constant(op.inputs[1]) if len(op.inputs) > 1 else None
    if pads is None:
        return "paddings are not a compile-time constant"
    if pads.shape[0] > 1 and pads[0].any():
        return "pads the batch dimension"
    return None


def _pack(op, model):
    if getattr(op.options, "axis", 0) == 0 and len(model.tensors[op.outputs[0]].shape) > 1:
        return "packs along the batch dimension"
    return None


def _split(op, model):
    return _no_batch_axis(op, model, index=0)


def _softmax(op, model):
    shape = model.tensors[op.inputs[0]].shape
    if len(shape) > 1 and _prod(shape[:-1]) != 1:
        return f"input {list(shape)} is not one-dimensional"
    if shape and shape[-1] > 16000:
        return f"input has {shape[-1]} elements (max 16,000)"
    return None


def _squeeze(op, model):
    shape = model.tensors[op.inputs[0]].shape
    dims = getattr(op.options, "squeezeDims", None)
    squeezed = [int(d) % len(shape) for d in dims] if dims is not None and len(dims) else [
        i for i, s in enumerate(shape) if s == 1]
    first_big = next((i for i, s in enumerate(shape) if s > 1), len(shape))
    if any(d > first_big for d in squeezed):
        return f"squeezes a dimension of {list(shape)} after a dimension larger than 1 (needs a relayout)"
    return None


def _strided_slice(op, model):
    strides = model.constant(op.inputs[3]) if len(op.inputs) > 3 else None
    if strides is None or (strides != 1).any():
        return "has strides other than 1"
    opts = op.options
    if getattr(opts, "ellipsisMask", 0) or getattr(opts, "newAxisMask", 0):
        return "uses an ellipsis or new-axis mask"
    return None


def _resize(op, model):
    for i in (op.inputs[0], op.outputs[0]):
        shape = model.tensors[i].shape
        if len(shape) > 3 and _prod(shape[:-3]) != 1:
            return f"tensor {list(shape)} is not 3-dimensional"
    return None


def _prelu(op, model):
    alpha = model.tensors[op.inputs[1]].shape
    if len(alpha) > 1 and _prod(alpha[:-1]) != 1:
        return f"alpha {list(alpha)} is not 1-dimensional"
    return None


EDGETPU_CHECKS = {
    "AVERAGE_POOL_2D": _fused_activation,
    "MAX_POOL_2D": _fused_activation,
    "CONCATENATION": _concatenation,
    "CONV_2D": _same_dilation,
    "DEPTHWISE_CONV_2D": _same_dilation,
    "FULLY_CONNECTED": _fully_connected,
    "MEAN": _mean,
    "SUM": _no_batch_axis,
    "REDUCE_MAX": _no_batch_axis,
    "REDUCE_MIN": _no_batch_axis,
    "PAD": _pad,
    "PACK": _pack,
    "SPLIT": _split,
    "SOFTMAX": _softmax,
    "SQUEEZE": _squeeze,
    "STRIDED_SLICE": _strided_slice,
    "RESIZE_BILINEAR": _resize,
    "RESIZE_NEAREST_NEIGHBOR": _resize,
    "PRELU": _prelu,
}


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out
