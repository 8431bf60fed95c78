"""One table that answers everything: per-layer params, sparsity, FLOPs, bytes."""

import dataclasses
import math
import re

import keras
import numpy as np
from keras import ops

from tf_sparsity import prunable
from tf_sparsity.layers.kernel_wrapper import KernelWrapper


@dataclasses.dataclass
class LayerReport:
    """One row of `tfs.summary`. FLOPs count multiply-accumulates."""

    name: str
    type: str
    params: int
    prunable: int  # entries in prunable kernels
    nonzeros: int  # nonzero entries in prunable kernels (effective values)
    threshold: float | None
    flops: int | None  # dense MACs of the prunable kernels per example
    effective_flops: int | None  # MACs counting only nonzero weights
    bytes: int  # storage of all the layer's weights, dense
    rank: str | None = None  # learned ranks of low-rank layers, e.g. "4/16, 3/16"

    @property
    def sparsity(self):
        return 1.0 - self.nonzeros / self.prunable if self.prunable else 0.0

    @property
    def collapsed(self):
        """True when every prunable weight is zero (layer collapse)."""
        return self.prunable > 0 and self.nonzeros == 0


@dataclasses.dataclass
class Summary:
    """What `tfs.summary` returns: rows plus totals; `str()` is the table."""

    model_name: str
    layers: list

    def _total(self, field):
        values = [getattr(r, field) for r in self.layers if r.prunable]
        if not values or any(v is None for v in values):
            return None
        return sum(values)

    @property
    def params(self):
        return sum(r.params for r in self.layers)

    @property
    def prunable(self):
        return sum(r.prunable for r in self.layers)

    @property
    def nonzeros(self):
        return sum(r.nonzeros for r in self.layers)

    @property
    def sparsity(self):
        """Fraction of zeros over all prunable kernels."""
        return 1.0 - self.nonzeros / self.prunable if self.prunable else 0.0

    @property
    def flops(self):
        return self._total("flops")

    @property
    def effective_flops(self):
        return self._total("effective_flops")

    @property
    def bytes(self):
        return sum(r.bytes for r in self.layers)

    @property
    def collapsed(self):
        """Names of layers whose prunable kernels are entirely zero."""
        return [r.name for r in self.layers if r.collapsed]

    def to_dict(self):
        return {
            "model": self.model_name,
            "layers": [dict(dataclasses.asdict(r), sparsity=r.sparsity) for r in self.layers],
            "params": self.params,
            "prunable": self.prunable,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "flops": self.flops,
            "effective_flops": self.effective_flops,
            "bytes": self.bytes,
            "collapsed": self.collapsed,
        }

    def __str__(self):
        header = ("layer", "type", "params", "nonzero", "sparsity", "threshold", "MACs", "MACs nz", "bytes")
        with_rank = any(r.rank for r in self.layers)
        if with_rank:
            header = header + ("rank",)
        rows = [header]
        for r in self.layers:
            rows.append((
                r.name, r.type, f"{r.params:,}",
                f"{r.nonzeros:,}" if r.prunable else "-",
                f"{r.sparsity:.1%}" + (" COLLAPSED" if r.collapsed else "") if r.prunable else "-",
                f"{r.threshold:.3g}" if r.threshold is not None else "-",
                _fmt_int(r.flops), _fmt_int(r.effective_flops), f"{r.bytes:,}",
            ) + ((r.rank or "-",) if with_rank else ()))
        rows.append((
            "total", "", f"{self.params:,}", f"{self.nonzeros:,}", f"{self.sparsity:.1%}", "",
            _fmt_int(self.flops), _fmt_int(self.effective_flops), f"{self.bytes:,}",
        ) + (("",) if with_rank else ()))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        line = "  ".join("-" * w for w in widths)
        out = [f"Sparsity summary: {self.model_name}", line]
        for i, row in enumerate(rows):
            out.append("  ".join(
                str(c).ljust(w) if j < 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))
            ))
            if i == 0 or i == len(rows) - 2:
                out.append(line)
        return "\n".join(out)


def _fmt_int(value):
    return "-" if value is None else f"{value:,}"


def _spatial(shape, data_format):
    if shape is None:
        return None
    dims = shape[2:] if data_format == "channels_first" else shape[1:-1]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _shape(layer, attr):
    try:
        return tuple(getattr(layer, attr).shape)
    except (AttributeError, ValueError):  # not called in a graph (subclassed) or shared
        return None


def macs_per_weight(layer, in_shape, out_shape):
    """How many times each kernel entry of `layer` is used per example.

    Shapes include the batch axis; returns None when they are unknown.
    """
    if isinstance(layer, keras.layers.Embedding):
        return 0
    if out_shape is None:
        return None
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                          keras.layers.Conv3DTranspose)):
        return _spatial(in_shape, layer.data_format)
    if hasattr(layer, "data_format"):  # convolutions
        return _spatial(out_shape, layer.data_format)
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, output = layer.equation.split("->")
        kernel_letters = inputs.split(",")[1]
        out_letters = output.replace("...", "")
        # Each kernel entry is used once per output position along the
        # output axes the kernel does not index (batch excluded).
        dims = [d for letter, d in zip(out_letters[1:], out_shape[len(out_shape) - len(out_letters) + 1:])
                if letter not in kernel_letters]
    else:  # Dense acts on the last axis
        dims = out_shape[1:-1]
    return None if any(d is None for d in dims) else math.prod(dims)


def layer_report(layer):
    """The `LayerReport` of one layer (wrapped or plain).

    Layers may describe themselves by implementing `summary_row()` returning
    a `LayerReport` (low-rank RNN layers do, to report learned ranks).
    """
    if hasattr(layer, "summary_row"):
        return layer.summary_row()
    if isinstance(layer, keras.layers.RNN) and hasattr(layer.cell, "summary_row"):
        from tf_sparsity.layers.low_rank import rnn_summary_row  # low_rank imports this module

        return rnn_summary_row(layer)
    inner = layer.layer if isinstance(layer, KernelWrapper) else layer
    # A wrapper's own scalars (threshold logit, offset) are bookkeeping, not params.
    params = sum(int(np.prod(w.shape)) for w in inner.weights)
    nbytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in inner.weights)
    if isinstance(layer, KernelWrapper):
        kernels = [ops.convert_to_numpy(k) for k in layer.effective_kernels()]
    elif prunable.is_prunable(inner) and inner.built:
        kernels = [ops.convert_to_numpy(k) for k in prunable.prunable_kernels(inner)]
    else:
        kernels = []
    total = sum(k.size for k in kernels)
    nonzeros = sum(int(np.count_nonzero(k)) for k in kernels)
    flops = effective = None
    if kernels:
        # The wrapper, not its inner layer, is the node in the model graph.
        per_weight = macs_per_weight(inner, _shape(layer, "input"), _shape(layer, "output"))
        if per_weight is not None:
            flops = total * per_weight
            effective = nonzeros * per_weight
    return LayerReport(
        name=inner.name if isinstance(layer, KernelWrapper) else layer.name,
        type=type(inner).__name__,
        params=params,
        prunable=total,
        nonzeros=nonzeros,
        threshold=layer.threshold_value() if isinstance(layer, KernelWrapper) else None,
        flops=flops,
        effective_flops=effective,
        bytes=nbytes,
    )


def summary(model, print_fn=print):
    """Per-layer sparsity report of `model`; prints the table and returns it.

    Rows cover every layer with weights (nested models flattened); wrapped
    layers show their effective kernels and threshold. FLOPs are multiply-
    accumulates per example of the prunable kernels, dense and counting only
    nonzeros. Pass `print_fn=None` to only get the data.

    Example:

    >>> import keras, tf_sparsity as tfs
    >>> m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> report = tfs.summary(m, print_fn=None)
    >>> report.params, report.sparsity
    (36, 0.0)
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer; received {type(model).__name__}.")
    layers = prunable.iter_layers(model) if isinstance(model, keras.Model) else [model]
    rows = [layer_report(l) for l in layers if l.weights]
    report = Summary(model_name=model.name, layers=rows)
    if print_fn is not None:
        print_fn(str(report))
    return report


def sparsity(model):
    """Fraction of zeros over all prunable kernels of `model` (wrapped or plain).

    >>> import keras, tf_sparsity as tfs
    >>> tfs.sparsity(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]))
    0.0
    """
    return summary(model, print_fn=None).sparsity
