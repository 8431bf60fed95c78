"""Recurrent models for devices: export the weights once and carry the state.

`convert(model, target, recurrent=...)` picks one of these forms for models
with recurrent layers (Keras `GRU`, `LSTM`, `SimpleRNN`, `RNN(cell)` with
the package's low-rank / FastGRNN / factorized cells):

- **step** (the default for `tflm` and `edgetpu`): the model of *one* time
  step. Inputs `x` `[1, features]` and every state `[1, units]`; outputs
  every new state. The head (the layers after the last recurrent layer) is
  in the step model, output 0, run at every step (`step_head="joined"`,
  the default: one interpreter, ~1 KB less TFLM arena than two), or with
  `step_head="separate"` a second model (`result.head`) run once per
  sequence on the final state (it stays in the step model when the last
  recurrent layer returns sequences). Nothing after the last recurrent
  layer: the output is its state. Weights are stored once, factorized cells keep their
  factors (U and V, not U·V), file and arena do not grow with the
  sequence. The firmware (or `result.run_sequence`) loops over the time
  steps and copies each new state back to its input. int8 states leave the
  model with exactly the quantization of the state inputs (the state input
  takes the new state's parameters where its readers allow, else a
  requantizing QUANTIZE op is appended), so that copy is a `memcpy`. The C
  files come with `<stem>_sequence.h`, the documented C++ loop.
- **loop**: one `WHILE` graph with shared weights (Keras 3's own conversion);
  float only: full-int8 conversion of the loop crashes the TF 2.21 converter,
  and ai-edge-quantizer 0.10 does not calibrate the loop body.
- **fused**: an LSTM as one `UNIDIRECTIONAL_SEQUENCE_LSTM` op, rebuilt with
  `tf_keras` in a child process (the `baseline` extra).
- **unroll**: the sequence unrolled into plain ops over a static length
  (grows with the sequence; always available where the ops are).

Everything here reads Keras layers through public attributes (`cell`,
`state_size`, `return_sequences`, ...). One module per part: `plan` (which
layers, the step plan, choosing the form), `step_model` (building the one-step
model), `sequences` (running and timing sequences, the C++ loop header),
`step_export` and `fused` (the two forms `convert` hands over).

>>> import keras, numpy as np, tf_sparsity as tfs
>>> m = keras.Sequential([keras.Input((20, 1)), keras.layers.GRU(8), keras.layers.Dense(3)])
>>> x = np.random.default_rng(0).normal(size=(32, 20, 1)).astype("float32")
>>> r = tfs.export.convert(m, target="tflm", representative_data=x)   # recurrent="auto" -> "step"
>>> r.report.recurrent["form"], r.inspect().op_counts.get("WHILE", 0)
('step', 0)
>>> r.run_sequence(x[:4]).shape          # on tflite-micro, state carried between invokes
(4, 3)
"""

from tf_sparsity.export.recurrent.fused import baseline_python, convert_fused
from tf_sparsity.export.recurrent.plan import (FORMS, METADATA_NAME, STEP_HEADS, StepFormError, recurrent_layers,
                                              resolve, step_plan)
from tf_sparsity.export.recurrent.sequences import RecurrentExportResult, run_sequence, sequence_header, time_sequence
from tf_sparsity.export.recurrent.step_export import check_step_head, convert_step
from tf_sparsity.export.recurrent.step_model import describe, metadata

__all__ = [
    "FORMS", "METADATA_NAME", "RecurrentExportResult", "STEP_HEADS", "StepFormError", "baseline_python",
    "check_step_head", "convert_form",
    "convert_fused", "convert_step", "describe", "metadata", "recurrent_layers", "resolve", "run_sequence",
    "sequence_header", "step_plan", "time_sequence",
]


def convert_form(form, model, spec, quantize, representative_data, path, verify, step_head="joined",
                 per_channel=True, **kwargs):
    """`convert`'s call-out for the forms this module builds ("step", "fused"); `step_head` is the step form's."""
    if form == "step":
        return convert_step(model, spec, quantize, representative_data, path, verify, step_head=step_head,
                            per_channel=per_channel, **kwargs)
    if step_head != "joined":
        kwargs["report"].notes.append(f"step_head={step_head!r} ignored: it applies to the step form only")
    if not per_channel:
        kwargs["report"].notes.append("weight_quantization='per_tensor' ignored: the fused form is converted "
                                      "by tf_keras in a child process with the converter's defaults")
    return convert_fused(model, spec, quantize, representative_data, path, verify, **kwargs)
