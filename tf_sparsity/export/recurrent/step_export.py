"""`convert` for the step form: state precision chosen by measurement, verification per sequence."""


import os

import numpy as np

from tf_sparsity.export import runtimes
from tf_sparsity.export.errors import ExportError, VerificationError

from tf_sparsity.export import lut
from tf_sparsity.export.result import fill_report
from tf_sparsity.export import inputs as input_stage
from tf_sparsity.export import prepare as prepare_stage
from tf_sparsity.export import verify as verify_stage
from tf_sparsity.export.outputs import write_outputs
from tf_sparsity.export.atomic import atomic_write
from tf_sparsity.export.c_array import write_c_array
from tf_sparsity.export.recurrent.plan import (_MAX_CALIBRATION_STEPS, STEP_HEADS, head_state,
                                              recurrent_layers, step_function, step_plan)
from tf_sparsity.export.recurrent.sequences import RecurrentExportResult, _agreement, run_sequence, sequence_header
from tf_sparsity.export.recurrent.step_model import _calibration_steps, _rollout, build_step


# --------------------------------------------------------------------------
# convert(..., recurrent="step")

# Factorized low-rank cells compute each summed gate as one product of the concatenated
# projections (`projection="joint"`, tf_sparsity.layers.low_rank): fewer tflite-micro nodes,
# tensors and op data per step than two products and an add (docs/benchmarks.md, issue 14).
JOINT_PROJECTION = True

def convert_step(model, spec, quantize, representative_data, path, verify, *, input_shape, c_files,
                 calibration_steps, verify_samples, batch_size, compress, report, reason, step_head="joined",
                 per_channel=True):
    """The step-form branch of `tfs.export.convert` (arguments as there)."""
    from tf_sparsity.export.inspection import inspect

    target = spec.name
    check_step_head(step_head)
    if batch_size != 1:
        raise ValueError(f"recurrent='step' exports batch 1 (one sequence at a time); received batch_size={batch_size!r}.")
    prepared = prepare_stage.prepare(model, unroll=False, notes=report.notes,
                                     projection="joint" if JOINT_PROJECTION else None)
    plan = step_plan(prepared)
    sequences = _sequences(model, plan, input_shape, representative_data, calibration_steps, verify_samples)
    if plan.steps is None:
        plan.steps = sequences.shape[1] if sequences is not None else None
    if plan.steps is None:
        raise ValueError(
            "recurrent='step': the sequence length is unknown (model input (None, None, "
            f"{plan.features})); pass input_shape=(steps, {plan.features}) or representative_data of shape "
            f"(n, steps, {plan.features}). The step model runs any length; the length is needed to verify it "
            "and for the C loop.")
    if quantize == "int8" and sequences is None:
        raise ValueError(
            f"quantize='int8'{'' if target == 'litert' else f' (required by target {target!r})'} needs "
            f"`representative_data`: about 100 typical sequences, an array of shape (n, {plan.steps}, "
            f"{plan.features}) such as x_train[:100]. Every time step of them calibrates the int8 ranges of the "
            "inputs, the states and the activations.")
    step = step_function(plan)
    plan.head_state = _head_state(plan, step_head)
    if step_head == "separate" and plan.head_state is None:
        report.notes.append("step_head='separate': the head stays in the step model (run every step): the last "
                            "recurrent layer " + ("returns sequences" if plan.sequence_output else
                                                  "outputs none of its states"))
    calibration = []
    if quantize == "int8":
        _, recorded = _rollout(step, plan, sequences[:calibration_steps], record=True)
        calibration = _calibration_steps(recorded, _MAX_CALIBRATION_STEPS)
    tflite, head, meta = build_step(prepared, plan, quantize, calibration, per_channel=per_channel)
    choice = None
    if quantize == "int8":
        tflite, head, meta, choice = _choose_state_dtype(prepared, plan, calibration, sequences, (tflite, head, meta),
                                                         target, model, per_channel)
        if choice["chosen"] == "int16":
            report.notes.append("int16 activations and states (16x8: int8 weights): " + choice["reason"])
    info = inspect(tflite)
    meta["op_names"] = sorted(info.op_counts)
    verdict = info.verdict(target)
    if head is not None:
        head_info = inspect(head)
        meta["head"]["op_names"] = sorted(head_info.op_counts)
        head_verdict = head_info.verdict(target)
        if target != "edgetpu" and not head_verdict.ok:
            verify_stage.raise_unsupported(head_verdict, spec)
        if target == "edgetpu" and head_verdict.first_fallback is not None:
            report.warnings.append(f"EdgeTPU (head model): {head_verdict.first_fallback} — this op and everything "
                                   "after it run on the CPU")
    if target == "edgetpu":
        report.preflight = verdict
        if verdict.first_fallback is not None:
            report.warnings.append(f"EdgeTPU: {verdict.first_fallback} — this op and everything after it "
                                   "run on the CPU")
    elif not verdict.ok:
        verify_stage.raise_unsupported(verdict, spec)
    report.warnings += [w for w in verdict.warnings if target != "edgetpu" or "maps ops only" not in w]
    rec = {"form": "step", "reason": reason, "state_dtype": meta["states"][0]["dtype"] if meta["states"] else None,
           "state_dtype_choice": choice, "steps": plan.steps, "features": plan.features,
           "weight_quantization": "per_channel" if per_channel else "per_tensor",
           "states": meta["states"], "sequence_output": plan.sequence_output,
           "layers": [l.name for l in plan.chain]}
    if meta.get("head"):
        rec["head"] = {k: v for k, v in meta["head"].items() if k != "op_names"}
    report.recurrent = rec
    report.notes.append(f"exported one time step (recurrent='step'): {len(plan.states)} state(s) carried by the "
                        "caller; weights stored once; run whole sequences with result.run_sequence(x)")
    if head is not None:
        report.notes.append(f"the head ({', '.join(l.name for l in plan.chain[_after_last_rnn(plan):])}) is a "
                            f"separate model run once per sequence on the final state {plan.head_state} "
                            f"(result.head, <stem>_head.tflite: {len(head):,} bytes)")
    if verify:
        samples = sequences[:verify_samples] if sequences is not None else _random_sequences(plan, verify_samples)
        if sequences is None:
            report.notes.append(f"verified on {len(samples)} random normal sequences (no representative_data)")
        expected = _keras_sequences(model, samples)
        litert = run_sequence(tflite, samples, runtime="litert", raw=True, head=head)
        report.verification = {"runtime": "ai_edge_litert (default XNNPack delegate), per sequence",
                               **_agreement(litert, expected, meta)}
        verify_stage.warn_on_mismatch(report)
        if quantize == "int8":
            rec["state_quantization"] = _state_effect(step, plan, samples, meta, expected)
        if target == "tflm":
            tflite = _verify_tflm_step(tflite, samples, expected, meta, compress, report, head)
            info = inspect(tflite)
    elif compress is not None:
        tflite, _ = lut.lut_compress(tflite, report)
        info = inspect(tflite)
    if target == "edgetpu":
        report.notes.append("edgetpu_compiler is not on PATH: preflight only" if not runtimes.edgetpu_compiler()
                            else "edgetpu_compiler not run for step models")
    if target == "tflm" and "candidates" not in report.compression:
        report.compression.update(lut.lut_candidates(tflite))
    fill_report(report, info)
    rec["file_bytes"] = len(tflite) + (len(head) if head is not None else 0)
    rec["arena_bytes"] = report.tflm.get("arena_bytes")
    if head is not None:
        rec.update(step_file_bytes=len(tflite), head_file_bytes=len(head),
                   step_arena_bytes=report.tflm.get("step_arena_bytes"),
                   head_arena_bytes=report.tflm.get("head_arena_bytes"))
    root = os.path.splitext(os.fspath(path))[0] if path is not None else ""
    written, c_paths = write_outputs(tflite, path, c_files, spec, report, extra={
        "_sequence.h": sequence_header(meta, os.path.basename(root)).encode()},
        arena_bytes=report.tflm.get("step_arena_bytes"))
    if head is not None and written is not None:
        atomic_write(root + "_head.tflite", head)
        if c_paths:
            c_paths = tuple(c_paths) + tuple(write_c_array(head, root + "_head.tflite",
                                                            arena_bytes=report.tflm.get("head_arena_bytes")))
    return RecurrentExportResult(tflite=tflite, path=written, target=target, quantize=quantize, report=report,
                                 c_files=tuple(c_paths), head=head)


def check_step_head(step_head):
    """One clear error for a bad `step_head` (`convert`'s argument)."""
    if step_head not in STEP_HEADS:
        raise ValueError(f"`step_head` must be one of {STEP_HEADS} (where the step form puts the layers after the "
                         f"last recurrent layer: in the step model, or a second model run once per sequence); "
                         f"received {step_head!r}.")


def _head_state(plan, step_head):
    """The state the separate head model reads, or None: the head stays in the step model.

    "separate": the last recurrent layer's output state (None when it returns
    sequences or its output is no state). "joined": None, except when nothing
    follows the last recurrent layer: then the output *is* that state and
    the step model outputs it once (no head model in either case).
    """
    if step_head == "separate" or _after_last_rnn(plan) == len(plan.chain):
        return head_state(plan)
    return None


def _after_last_rnn(plan):
    import keras

    return 1 + max(i for i, l in enumerate(plan.chain) if isinstance(l, keras.layers.RNN))


# int8 states are kept when the int8 step model agrees with Keras on this share of the
# calibration sequences' predictions (classifiers) or within this fraction of the output
# scale (other heads); otherwise int16 activations and states (16x8) are tried and kept when
# they do better. All predictions: 98% of 64 sequences let an int8 LSTM(64) through that
# lost 4.7 points over the whole test set (docs/benchmarks.md, issue 14).
_INT8_AGREEMENT, _INT8_RELATIVE_ERROR, _CHOICE_SEQUENCES = 1.0, 0.05, 100


def _score(tflite, meta, check, want, head=None):
    got = run_sequence(tflite, check, runtime="reference", raw=True, head=head)
    result = _agreement(got, want, meta)
    if "argmax_agreement" in result:
        result["ok"] = result["argmax_agreement"] >= _INT8_AGREEMENT
        result["score"] = result["argmax_agreement"]
    else:
        relative = result["max_abs_diff"] / max(result["output_scale"], 1e-6)
        result["ok"], result["score"] = relative <= _INT8_RELATIVE_ERROR, -relative
    return result


def _choose_state_dtype(prepared, plan, calibration, sequences, built, target, model, per_channel=True):
    """int8 states, or int16 (16x8) where int8 loses predictions: measured on the calibration sequences.

    Run on LiteRT's reference kernels (the kernels tflite-micro ports). The
    EdgeTPU runs int8 only, so it keeps int8 (with a warning in the report
    when it loses predictions).
    """
    tflite, head, meta = built
    check = sequences[:_CHOICE_SEQUENCES]
    want = _keras_sequences(model, check)
    int8 = _score(tflite, meta, check, want, head)
    measured = {"int8": {k: v for k, v in int8.items() if k != "ok"}, "sequences": len(check)}
    if int8["ok"]:
        return (*built, {"chosen": "int8", "reason": "int8 keeps the predictions", "measured": measured})
    if target == "edgetpu":
        return (*built, {"chosen": "int8", "measured": measured,
                         "reason": "the EdgeTPU runs int8 only (int8 states lose predictions here)"})
    from tf_sparsity.export.inspection import inspect

    try:
        wide = build_step(prepared, plan, "int8", calibration, per_channel=per_channel, activations="int16")
        if not all(inspect(m).verdict(target).ok for m in wide[:2] if m is not None):
            raise ExportError("ops without int16 kernels on " + target)
        int16 = _score(wide[0], wide[2], check, want, wide[1])
    except (ExportError, VerificationError) as error:
        measured["int16"] = {"error": str(error)[:300]}
        return (*built, {"chosen": "int8", "measured": measured, "reason": f"int16 not possible: {error}"[:300]})
    measured["int16"] = {k: v for k, v in int16.items() if k != "ok"}
    if int16["score"] > int8["score"]:
        what = (f"int8 states agree with Keras on {int8['score']:.1%} of {len(check)} calibration sequences, "
                f"int16 on {int16['score']:.1%}" if "argmax_agreement" in int8 else
                "int8 states leave a larger output error than int16")
        return (*wide, {"chosen": "int16", "reason": what, "measured": measured})
    return (*built, {"chosen": "int8", "reason": "int16 was not better", "measured": measured})


def _sequences(model, plan, input_shape, data, calibration_steps, verify_samples):
    """Representative sequences as one float array [n, T, F] (validated), or None."""

    if data is None:
        if input_shape is not None:
            shape = input_stage.given_shapes(input_shape, 1)[0]
            if len(shape) != 2 or shape[1] not in (None, plan.features) or (
                    plan.steps is not None and shape[0] not in (None, plan.steps)):
                raise ValueError(f"`input_shape` {tuple(shape)} does not fit the model's sequence input "
                                 f"({plan.steps}, {plan.features}) (batch dimension excluded).")
            plan.steps = plan.steps or shape[0]
        return None
    spec = {"name": "x", "shape": [1, plan.steps, plan.features], "dtype": "float32"}
    arrays = input_stage.samples(data, [spec], limit=max(calibration_steps, verify_samples))
    if not arrays:
        return None
    return np.concatenate([a[0] for a in arrays]).astype(np.float32)


def _keras_sequences(model, samples):
    """Keras outputs of whole sequences from the zero state (stateful layers: one by one, state restored)."""
    stateful = [l for l in recurrent_layers(model) if getattr(l, "stateful", False)]
    if not stateful:
        return np.asarray(model(samples, training=False))
    saved = [[np.asarray(v) for v in (l.states or [])] for l in stateful]
    try:
        outs = []
        for k in range(len(samples)):
            for layer in stateful:
                layer.reset_state()
            outs.append(np.asarray(model(samples[k:k + 1], training=False))[0])
        return np.stack(outs)
    finally:
        for layer, values in zip(stateful, saved):
            for variable, value in zip(layer.states or [], values):
                variable.assign(value)


def _random_sequences(plan, n):
    return np.random.default_rng(0).normal(size=(n, plan.steps, plan.features)).astype(np.float32)


def _state_effect(step, plan, samples, meta, expected):
    """What int8 states alone cost: the float step model with its states rounded to the int8 grid."""
    params = [(s["scale"], s["zero_point"], s["dtype"]) for s in meta["states"]]
    rounded, _ = _rollout(step, plan, samples, state_params=params)
    exact, _ = _rollout(step, plan, samples)
    diff = float(np.max(np.abs(rounded - exact)))
    info = lambda s: np.iinfo(np.dtype(s["dtype"]))  # noqa: E731
    entry = {"dtype": meta["states"][0]["dtype"] if meta["states"] else "int8",
             "states": [{"layer": s["layer"], "index": s["index"], "scale": s["scale"],
                         "zero_point": s["zero_point"],
                         "range": [(info(s).min - s["zero_point"]) * s["scale"],
                                   (info(s).max - s["zero_point"]) * s["scale"]]}
                        for s in meta["states"]],
             "float_step_vs_keras_max_abs_diff": float(np.max(np.abs(exact - np.asarray(expected).reshape(exact.shape)))),
             "quantized_states_only_max_abs_diff": diff, "samples": len(samples)}
    if exact.shape[-1] > 1:
        entry["quantized_states_only_argmax_agreement"] = float(np.mean(np.argmax(rounded, -1) == np.argmax(exact, -1)))
    return entry


def _verify_tflm_step(tflite, samples, expected, meta, compress, report, head):
    q = meta["input"]
    first = [runtimes.quantize(samples[0, :1], (q["scale"], q["zero_point"]), np.dtype(q["dtype"]))
             if q.get("scale") else samples[0, :1]]
    first += [np.full((1, s["size"]), s.get("zero_point", 0), s["dtype"]) for s in meta["states"]]
    arena = verify_stage.tflm_checked(runtimes.tflm_arena_bytes, tflite, first)
    head_arena = 0
    if head is not None:
        state = meta["states"][meta["head"]["state"]]
        head_arena = verify_stage.tflm_checked(runtimes.tflm_arena_bytes, head,
                                               [np.full((1, state["size"]), state.get("zero_point", 0), state["dtype"])])
    micro = run_sequence(tflite, samples, runtime="tflm", raw=True, head=head)
    reference = run_sequence(tflite, samples, runtime="reference", raw=True, head=head)
    vs_ref = np.abs(micro.astype(np.int64) - reference.astype(np.int64))
    vs_keras = _agreement(micro, expected, meta)
    report.tflm = {"runtime": "tflite-micro Python interpreter, one invoke per time step"
                   + (" (+ one head invoke per sequence)" if head is not None else ""),
                   "arena_bytes": arena + head_arena, "max_diff_vs_reference_steps": float(vs_ref.max()),
                   "samples": len(samples),
                   "max_error_vs_keras_steps": vs_keras.get("max_error_steps", vs_keras["max_abs_diff"])}
    if "argmax_agreement" in vs_keras:
        report.tflm["argmax_agreement_vs_keras"] = vs_keras["argmax_agreement"]
    if head is not None:  # two interpreters, two arenas: the total is what the firmware needs
        report.tflm.update(step_arena_bytes=arena, head_arena_bytes=head_arena)
    report.recurrent["per_sequence_agreement"] = {"tflm_vs_keras": vs_keras,
                                                  "tflm_vs_litert_reference_max_steps": float(vs_ref.max()),
                                                  "tflm_identical_to_reference": float(np.mean(
                                                      vs_ref.reshape(len(vs_ref), -1).max(1) == 0))}
    one_step = 1 if meta["output"].get("dtype") != "int16" else 256  # int16 steps are 256x finer
    if vs_ref.max() > one_step:
        report.warnings.append(f"tflite-micro differs from LiteRT's reference kernels by {vs_ref.max():g} "
                               "quantization steps after the whole sequence (single-op rounding differences "
                               "compound through the carried state)")
    if compress == "lut":
        tflite = verify_stage.lut_checked(
            tflite, report, arena, arena_of=lambda m: verify_stage.tflm_checked(runtimes.tflm_arena_bytes, m, first),
            same_outputs=lambda m: np.array_equal(run_sequence(m, samples, runtime="tflm", raw=True, head=head), micro))
    return tflite
