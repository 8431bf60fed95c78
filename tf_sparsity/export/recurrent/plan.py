"""Which layers the step form understands, the plan of a step model, and choosing the form."""


import dataclasses

import numpy as np

from tf_sparsity.export.errors import ExportError

from tf_sparsity import _compat

FORMS = ("auto", "step", "loop", "fused", "unroll")
# Where the step form puts the head (the layers after the last recurrent layer):
# "joined" in the step model, run every step (one interpreter: the smaller TFLM
# arena, measured ~1 KB less), or "separate", a second model run once per sequence.
STEP_HEADS = ("joined", "separate")
METADATA_NAME = "tf_sparsity.recurrent"
# Calibration samples (one time step each) for the int8 step model.
_MAX_CALIBRATION_STEPS = 800


# --------------------------------------------------------------------------
# Which layers the step form understands.

class StepFormError(ExportError):
    """The model cannot be exported as a single time step (the message says why and what works)."""


def _per_step_types():
    import keras

    L = keras.layers
    return (L.Dense, L.Activation, L.Dropout, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax, L.LayerNormalization,
            L.BatchNormalization, L.Identity, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
            L.SpatialDropout1D)


def _is_per_step(layer):
    """Whether `layer` treats every time step alone (so it can run on `[1, features]`)."""
    import keras

    if isinstance(layer, keras.layers.TimeDistributed):
        return _is_per_step(layer.layer)
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization)):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return all(a in (-1, 2) for a in axis)
    if isinstance(layer, keras.layers.Softmax):
        return layer.axis in (-1, 2)
    return isinstance(layer, _per_step_types())


def recurrent_layers(model):
    """Every recurrent layer of `model` (RNN subclasses and Bidirectional wrappers), in order."""
    import keras

    from tf_sparsity import prunable

    return [l for l in prunable.iter_layers(model)
            if isinstance(l, (keras.layers.RNN, keras.layers.Bidirectional))]


def _state_sizes(layer):
    """The cell's state sizes as a list of ints, or StepFormError for an unsupported cell."""
    cell = layer.cell
    size = getattr(cell, "state_size", None)
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    flat = []
    for s in sizes:
        if isinstance(s, (list, tuple)) and len(s) == 1:
            s = s[0]
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise StepFormError(
                f"recurrent='step' does not support layer '{layer.name}': its cell "
                f"{type(cell).__name__} has state_size {size!r}; expected an int or a list of ints "
                "(vector states, as GRU/LSTM/SimpleRNN/FastGRNN cells). Use recurrent='unroll'.")
        flat.append(int(s))
    return flat


@dataclasses.dataclass
class StepPlan:
    """How a model becomes one time step: the chain of layers and the states."""

    chain: list
    steps: int | None
    features: int
    states: list              # [{"layer", "index", "size"}]
    sequence_output: bool     # the last RNN returns sequences: one output per step
    input_dtype: str = "float32"
    head_state: int | None = None  # set by the exporter: the state the separate head model reads


def step_plan(model, steps=None):
    """Check that `model` can run one time step at a time -> `StepPlan`, else StepFormError.

    Supported: one sequence input `[batch, steps, features]`, a chain of
    layers: per-step layers (Dense, Activation, Dropout, normalization over
    features, TimeDistributed of those), recurrent layers (`keras.layers.RNN`
    subclasses whose cell has vector states), then any head after the last
    recurrent layer. A last recurrent layer with `return_sequences=True`
    followed by per-step layers gives one output per step (documented
    behaviour: `run_sequence` returns `[n, steps, ...]`).

    Args:
        model: a built Keras model (already stripped).
        steps: the sequence length to record when the input's is unknown.
    """
    import keras

    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise StepFormError(f"recurrent='step' needs a model with one sequence input; this one has "
                            f"{len(inputs)}. Use recurrent='unroll'.")
    shape = tuple(inputs[0].shape)
    if len(shape) != 3:
        raise StepFormError(f"recurrent='step' needs a sequence input [batch, steps, features]; the model "
                            f"input has shape {shape}. Use recurrent='unroll'.")
    if shape[2] is None:
        raise StepFormError("recurrent='step': the model input's feature dimension is unknown "
                            f"({shape}); build the model with keras.Input((steps, features)).")
    if not isinstance(model, _compat.REBUILDABLE_MODELS):
        raise StepFormError("recurrent='step' needs a Sequential or functional model (a subclassed model "
                            "hides its layer graph). Use recurrent='unroll'.")
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    previous = inputs[0]
    sequential = isinstance(model, keras.Sequential)  # a chain by construction
    for layer in layers:
        try:
            ok = sequential or layer.input is previous
        except (AttributeError, ValueError):
            ok = False
        if not ok:
            raise StepFormError(f"recurrent='step' needs a chain of layers (each fed by the one before); layer "
                                f"'{layer.name}' is not. Use recurrent='unroll'.")
        previous = layer.output
    rnn_positions = [i for i, l in enumerate(layers) if isinstance(l, (keras.layers.RNN, keras.layers.Bidirectional))]
    if not rnn_positions:
        raise StepFormError("recurrent='step': the model has no recurrent layer.")
    last = rnn_positions[-1]
    states = []
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Bidirectional):
            raise StepFormError(
                f"recurrent='step' cannot export Bidirectional layer '{layer.name}': its backward half needs "
                "the whole sequence before the first output. Use recurrent='unroll' (or 'loop' in float).")
        if isinstance(layer, keras.layers.RNN):
            if layer.go_backwards:
                raise StepFormError(f"recurrent='step' cannot export layer '{layer.name}' with go_backwards=True "
                                    "(it reads the sequence from its end). Use recurrent='unroll'.")
            if layer.return_state:
                raise StepFormError(f"recurrent='step': layer '{layer.name}' has return_state=True; the step "
                                    "model already outputs every state. Build the model without return_state.")
            if i < last and not layer.return_sequences:
                raise StepFormError(f"recurrent='step': layer '{layer.name}' feeds another recurrent layer "
                                    "but has return_sequences=False.")
            if getattr(layer, "supports_masking", False) and getattr(layer.input, "_keras_mask", None) is not None:
                raise StepFormError(f"recurrent='step': layer '{layer.name}' receives a mask; masked "
                                    "sequences are not supported. Use recurrent='unroll'.")
            for k, size in enumerate(_state_sizes(layer)):
                states.append({"layer": layer.name, "index": k, "size": size})
            continue
        if i < last and not _is_per_step(layer):
            raise StepFormError(
                f"recurrent='step': layer '{layer.name}' ({type(layer).__name__}) before the recurrent layer "
                "mixes time steps; the step form needs per-step layers there (Dense, Activation, Dropout, "
                "normalization over features). Use recurrent='unroll'.")
        if i > last and layers[last].return_sequences and not _is_per_step(layer):
            raise StepFormError(
                f"recurrent='step': layer '{layer.name}' ({type(layer).__name__}) reads the whole output "
                f"sequence of '{layers[last].name}' (return_sequences=True); the step form gives one output per "
                "step and needs per-step layers after it. Use recurrent='unroll', or return_sequences=False.")
    return StepPlan(chain=layers, steps=shape[1] if shape[1] is not None else steps, features=int(shape[2]),
                    states=states, sequence_output=bool(layers[last].return_sequences),
                    input_dtype=str(inputs[0].dtype))


def _last_rnn(plan):
    import keras

    return max(i for i, l in enumerate(plan.chain) if isinstance(l, keras.layers.RNN))


def _per_step(layer, x):
    import keras

    if isinstance(layer, keras.layers.TimeDistributed):
        return layer.layer(x, training=False)
    return layer(x, training=False)


def step_function(plan, part="all"):
    """The plan's chain for one time step, or a part of it.

    `part="all"`: `fn(x_t, *states) -> [output, *new_states]` (the head runs
    every step); `"step"`: `fn(x_t, *states) -> new_states` (the chain up to
    the last recurrent layer); `"head"`: `fn(h) -> [output]` (the layers
    after it, on the state `plan.head_state`).
    """
    import keras

    last = _last_rnn(plan)
    if part == "head":
        return lambda h: [_chain(plan.chain[last + 1:], h)]

    def step(x, *states):
        k = 0
        new_states = []
        for layer in plan.chain[:last + 1] if part == "step" else plan.chain:
            if isinstance(layer, keras.layers.RNN):
                n = len(_state_sizes(layer))
                x, state = layer.cell(x, list(states[k:k + n]), training=False)
                new_states += keras.tree.flatten(state)
                k += n
            else:
                x = _per_step(layer, x)
        return new_states if part == "step" else [x] + new_states

    return step


def _chain(layers, x):
    for layer in layers:
        x = _per_step(layer, x)
    return x


def head_state(plan, seed=0):
    """Which state is the last recurrent layer's output (the head's input), or None.

    The head then runs once per sequence on that state instead of at every
    step. None when the last recurrent layer returns sequences (one output
    per step) or when its cell's output is none of its new states (checked
    numerically on random inputs; GRU, LSTM, SimpleRNN, FastGRNN and the
    low-rank cells output their state `h`).
    """
    import keras

    if plan.sequence_output:
        return None
    last = _last_rnn(plan)
    layer = plan.chain[last]
    first = sum(len(_state_sizes(l)) for l in plan.chain[:last] if isinstance(l, keras.layers.RNN))
    sizes = _state_sizes(layer)
    rng = np.random.default_rng(seed)
    width = int(layer.input.shape[-1]) if getattr(layer, "input", None) is not None else plan.features
    x = rng.normal(size=(2, width)).astype(np.float32)
    states = [rng.normal(size=(2, s)).astype(np.float32) for s in sizes]
    out, new = layer.cell(x, states, training=False)
    out = keras.ops.convert_to_numpy(out)
    for k, value in enumerate(keras.tree.flatten(new)):
        value = keras.ops.convert_to_numpy(value)
        if value.shape == out.shape and np.array_equal(value, out):
            return first + k
    return None


# --------------------------------------------------------------------------
# Choosing the form.

def resolve(model, target, quantize, recurrent):
    """The form `convert` uses: None (no recurrent layer) or one of FORMS[1:], plus why.

    Returns `(form, reason)`. Raises ValueError for a form the target or the
    precision cannot take, naming the forms that work.
    """
    if recurrent not in FORMS:
        raise ValueError(f"`recurrent` must be one of {FORMS}; received {recurrent!r}.")
    rnns = recurrent_layers(model)
    if not rnns:
        return None, None
    stateful = [l.name for l in rnns if getattr(l, "stateful", False)
                or getattr(getattr(l, "forward_layer", None), "stateful", False)]
    if recurrent == "auto":
        if target in ("tflm", "edgetpu"):
            try:
                step_plan(_strip_for_plan(model))
            except StepFormError as error:
                return "unroll", f"auto: step form not possible ({error}); unrolled"
            return "step", (f"auto: {target} runs int8 only and a microcontroller/TPU model should not grow with "
                            "the sequence: one time step, state carried by the caller")
        if stateful:
            return "step", "auto: stateful layer(s) " + ", ".join(stateful) + " carry state across calls"
        if quantize == "int8":
            return "unroll", ("auto: LiteRT int8 takes the whole sequence unrolled (int8 conversion of the WHILE "
                              "loop crashes the converter; pass recurrent='step' for the per-step model)")
        return "loop", "auto: LiteRT float runs Keras 3's WHILE loop (weights stored once)"
    if recurrent in ("loop", "unroll", "fused") and stateful:
        raise ValueError(
            f"recurrent={recurrent!r}: layer(s) {', '.join(stateful)} are stateful (they carry state across "
            "calls), which a whole-sequence model cannot do. Use recurrent='step': the state is an input and an "
            "output of the step model.")
    if recurrent == "loop" and quantize != "float32" and quantize is not None:
        working = "'step' or 'unroll'" + (" or 'fused' (LSTM)" if _all_lstm(rnns) else "")
        raise ValueError(
            f"recurrent='loop' is float only: full-{quantize} conversion of the WHILE loop crashes the TF 2.21 "
            "converter (segfault) and ai-edge-quantizer 0.10 does not calibrate the loop body (docs/export.md)"
            f"{', and target ' + repr(target) + ' needs int8' if target != 'litert' else ''}. "
            f"Use recurrent={working} for {quantize}, or quantize=None on target 'litert' for the loop.")
    if recurrent == "fused" and not _all_lstm(rnns):
        names = [l.name for l in rnns if not _is_plain_lstm(l)]
        raise ValueError(f"recurrent='fused' exists for LSTM layers only (UNIDIRECTIONAL_SEQUENCE_LSTM); "
                         f"layer(s) {', '.join(names)} are not keras.layers.LSTM. Use 'step' or 'unroll'.")
    if recurrent == "step":
        step_plan(_strip_for_plan(model))  # raises with the reason
    return recurrent, f"recurrent={recurrent!r} requested"


def _strip_for_plan(model):
    """Checks read the original model: stripping keeps the chain and flags."""
    return model


def _is_plain_lstm(layer):
    import keras

    return isinstance(layer, keras.layers.LSTM)


def _all_lstm(rnns):
    import keras

    inner = [l.forward_layer if isinstance(l, keras.layers.Bidirectional) else l for l in rnns]
    return all(_is_plain_lstm(l) for l in inner)
