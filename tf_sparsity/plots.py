"""PNG plots for reports (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def layer_sparsity_bars(reports, path, title="Per-layer sparsity"):
    """Grouped bars of per-layer sparsity; `reports` maps a label to a `Summary`."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(reports)
    names = [r.name for r in next(iter(reports.values())).layers if r.prunable]
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        rows = {r.name: r for r in reports[label].layers}
        values = [rows[n].sparsity * 100 if n in rows else 0 for n in names]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_sparsity(points, path, dense_accuracy=None):
    """`points` maps a method name to a list of (sparsity, accuracy)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in points.items():
        values = sorted(values)
        ax.plot([v[0] * 100 for v in values], [v[1] * 100 for v in values], "o-", label=method)
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy * 100, color="gray", ls="--", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def threshold_dynamics(history, path, title="STR thresholds and sparsity over training"):
    """The paper's Figure-1 view from a `SparsityMonitor` history."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, values in history.items():
        if key.startswith("threshold/"):
            ax1.plot(range(1, len(values) + 1), values, label=key.split("/", 1)[1])
        if key.startswith("sparsity/"):
            ax2.plot(range(1, len(values) + 1), [v * 100 for v in values], label=key.split("/", 1)[1])
    if "sparsity" in history:
        ax2.plot(range(1, len(history["sparsity"]) + 1), [v * 100 for v in history["sparsity"]],
                 "k--", label="overall")
    ax1.set(xlabel="epoch", ylabel="threshold g(s)", yscale="log")
    ax2.set(xlabel="epoch", ylabel="sparsity (%)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learned_ranks(report, path, title="Learned ranks of low-rank layers"):
    """Bars of learned vs maximum rank per matrix, from a `Summary` with `rank` rows."""
    labels, learned, maximum = [], [], []
    for row in report.layers:
        if not row.rank:
            continue
        for i, part in enumerate(row.rank.split(",")):
            r, m = (int(v) for v in part.strip().split("/"))
            labels.append(f"{row.name}[{i}]")
            learned.append(r)
            maximum.append(m)
    fig, ax = plt.subplots(figsize=(max(4, len(labels) * 1.2), 3.5))
    ax.bar(labels, maximum, color="lightgray", label="max rank")
    ax.bar(labels, learned, label="learned rank")
    ax.set_ylabel("rank")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
