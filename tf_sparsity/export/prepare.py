"""Stage 1 of `convert`: check the model and make it convertible.

Strip tf_sparsity wrappers and low-rank STR cells (pruned weights become exact
zeros, ranks become factors) and unroll recurrent layers for integer targets;
for int8, fold the units whose tensors are constant on the calibration data
(`fold_constant`).
"""

import keras
import numpy as np

from tf_sparsity import _compat, prunable, surgery
from tf_sparsity.export import targets
from tf_sparsity.protocols import StrippableCell

__all__ = ["check_model", "check_quantize", "check_weight_quantization", "fold_constant", "prepare"]


def check_quantize(quantize, spec):
    if quantize not in targets.QUANTIZE_MODES:
        raise ValueError(f"`quantize` must be one of None, 'dynamic', 'float16', 'int8'; received {quantize!r}.")
    if quantize is None:
        return spec.quantize[0]
    if quantize not in spec.quantize:
        raise ValueError(
            f"target '{spec.name}' needs full-integer models: quantize='int8' (with "
            f"representative_data), not {quantize!r}. {spec.runtime} runs int8 kernels only"
            + (" on the TPU" if spec.name == "edgetpu" else "") + ".")
    return quantize


def check_weight_quantization(weight_quantization, quantize, notes):
    """One clear error for a bad `weight_quantization`; a note when it has no effect."""
    if weight_quantization is not None and weight_quantization not in targets.WEIGHT_QUANTIZATION:
        raise ValueError(
            f"`weight_quantization` must be None or one of {targets.WEIGHT_QUANTIZATION} (int8 FULLY_CONNECTED "
            f"weights with one scale per output channel, or one per tensor); received {weight_quantization!r}.")
    if weight_quantization == "per_tensor" and quantize not in ("int8", "dynamic"):
        notes.append(f"weight_quantization={weight_quantization!r} ignored: quantize={quantize!r} keeps "
                     "float weights")


def check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a Keras 3 `keras.Model`; received {type(model).__module__}."
            f"{type(model).__name__}. (Convert a .tflite? Use tfs.export.inspect.)")
    if not model.built:
        raise ValueError("`model` must be built: give it an `Input` or call it once on data.")


def prepare(model, unroll, notes, projection=None):
    """Strip tf_sparsity wrappers and low-rank STR cells; unroll RNN layers for integer targets.

    `projection`: put every factorized low-rank cell in this form (see
    `tf_sparsity.layers.low_rank.FactorizedGRUCell`; the step form passes
    "joint"). Unrolled cells take "conv" regardless.
    """
    rebuildable = isinstance(model, _compat.REBUILDABLE_MODELS)
    wrapped = surgery.wrappers(model)
    # Low-rank STR cells (tf_sparsity.layers.low_rank) strip to rank-r factors.
    low_rank = [l for l in prunable.iter_layers(model)
                if prunable.protocol_owner(l, StrippableCell) not in (None, l)]
    if wrapped or low_rank:
        model = surgery.strip(model)
    if wrapped:
        notes.append(f"stripped {len(wrapped)} tf_sparsity wrapper(s): pruned weights are exact zeros")
    if low_rank:
        notes.append(f"stripped {len(low_rank)} low-rank STR recurrent layer(s) to their rank-r factors")
    if unroll and rebuildable:

        rnns = [l for l in prunable.iter_layers(model) if _needs_unroll(l)]
        if rnns:
            def replace(layer):
                if not _needs_unroll(layer):
                    return None
                config = layer.get_config()
                if isinstance(layer, keras.layers.Bidirectional):
                    rnn_configs = [config["layer"]["config"]]
                    if config.get("backward_layer"):
                        rnn_configs.append(config["backward_layer"]["config"])
                else:
                    rnn_configs = [config]
                for rnn_config in rnn_configs:
                    rnn_config["unroll"] = True
                    _conv_projection(rnn_config)

                with _compat.unsafe_deserialization():
                    return layer.__class__.from_config(config)

            model = surgery.map_layers(model, replace)
            notes.append("unrolled recurrent layer(s) " + ", ".join(f"'{l.name}'" for l in rnns)
                         + " over the static sequence length: integer kernels have no loop support "
                           "(full-int8 conversion of the WHILE loop fails)")
    elif projection is not None and rebuildable:
        model = _with_projection(model, projection)
    return model


def _with_projection(model, projection):
    """`model` with its factorized cells' `projection` set (same weights); unchanged when there are none."""
    def factorized(layer):
        cell = getattr(layer, "cell", None) if isinstance(layer, keras.layers.RNN) else None
        return cell is not None and "projection" in cell.get_config() and cell.projection != projection

    if not any(factorized(l) for l in prunable.iter_layers(model)):
        return model

    def replace(layer):
        if not factorized(layer):
            return None
        config = layer.get_config()
        config["cell"]["config"]["projection"] = projection
        with _compat.unsafe_deserialization():
            return layer.__class__.from_config(config)

    return surgery.map_layers(model, replace)


def _conv_projection(rnn_config):
    """Put a factorized low-rank cell in its int8 export form (`projection="conv"`).

    Its projections become 1x1 CONV_2D ops: tflite-micro's and LiteRT's
    reference int8 kernels agree bit for bit on CONV_2D but round
    FULLY_CONNECTED differently, which an unrolled recurrence compounds
    (see `tf_sparsity.layers.low_rank.FactorizedGRUCell`). Same weights.
    """
    cell = rnn_config.get("cell")
    if isinstance(cell, dict) and "projection" in cell.get("config", {}):
        cell["config"]["projection"] = "conv"


def _needs_unroll(layer):
    if isinstance(layer, keras.layers.Bidirectional):
        return not layer.forward_layer.unroll
    return isinstance(layer, keras.layers.RNN) and not layer.unroll


def fold_constant(model, calibration, report):
    """`model` with the channel-group units constant on `calibration` folded (int8 stage 1b).

    Only units whose consumers read a tensor constant as a whole
    (`fold_constant_units(..., whole_tensors=True)`): their calibrated int8
    range is a point, so the int8 model holds that constant anyway, and the
    zero scale it gets makes XNNPack refuse the model. What was folded goes
    to `report.folded` and a note. Models the channel analysis cannot rebuild
    (subclassed) are converted as they are: if a range collapses there,
    LiteRT's load error names the tensors (`runtimes.litert_interpreter`).
    """
    if not calibration or not isinstance(model, _compat.REBUILDABLE_MODELS) or surgery.wrappers(model):
        return model
    x = [np.concatenate([sample[i] for sample in calibration]) for i in range(len(calibration[0]))]
    folded, entries = surgery.fold_constant_units(model, x, whole_tensors=True)
    report.folded = entries
    done = [e for e in entries if e["action"] != "not folded"]
    if done:
        report.notes.append(
            f"folded {len(done)} unit(s) constant on representative_data into their consumers' bias ("
            + ", ".join(f"{e['group']}[{e['unit']}]={e['constant']:.3g}" for e in done[:6])
            + (", ..." if len(done) > 6 else "") + "): their int8 range was a point (fold_constant_units=False "
            "keeps them)")
    stuck = [e for e in entries if e["action"] == "not folded" or not e.get("varies", True)]
    if stuck:
        report.warnings.append(
            f"{len(stuck)} unit(s) are constant on representative_data but could not be folded ("
            + "; ".join(f"{e['group']}[{e['unit']}]: {e['reason']}" for e in stuck[:3])
            + "); their int8 range collapses, which XNNPack refuses")
    return folded
