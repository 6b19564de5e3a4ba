"""Figure-6-style plot: x = fraction of history absorbed, y = the task's metric, one line per method."""

from __future__ import annotations

from pathlib import Path

from tapper.atomic import atomic_write

STYLE = {
    "static": dict(color="#7f7f7f", marker="o", linestyle="--"),
    "online-emb": dict(color="#1f77b4", marker="s"),
    "online-full": dict(color="#d62728", marker="^"),
    "full-retrain": dict(color="#2ca02c", marker="D", linestyle=":"),
}
LABELS = {"static": "Static", "online-emb": "Online-Emb", "online-full": "Online-Full", "full-retrain": "Full-Retrain"}


def plot_trajectories(report: dict, path: str | Path, title: str | None = None) -> Path:
    """Write the plot of a `trajectories.json` report as PNG (Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [100 * f for f in report["fractions"]]
    for method, ys in report["methods"].items():
        ax.plot(xs, ys, label=LABELS.get(method, method), linewidth=1.6, markersize=4, **STYLE.get(method, {}))
    ax.set_xlabel("history absorbed (%)")
    ax.set_ylabel(report["metric"])
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{report.get('task', '')} online adaptation".strip(), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
