"""PNG plots for ``heteroserve bench`` and ``heteroserve bench serve`` (matplotlib, imported
only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path


def plot_distributions(path: str | Path, title: str, panels: dict[str, list[float]]) -> Path:
    """Write a PNG with one empirical CDF per entry of ``panels`` (x-axis label -> values;
    empty entries are drawn as "no data") to ``path``; returns the path. Raises
    ``RuntimeError`` when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (label, values) in zip(axes.flat, panels.items()):
        ordered = sorted(values)
        if ordered:
            ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction <= x")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
