"""The rows and table of `tfs.summary`: plain data, importing nothing from the package.

Layers that describe themselves (low-rank RNN cells) build a `LayerReport`
without importing the code that computes summaries.
"""

import dataclasses


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
