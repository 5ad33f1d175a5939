"""Plots of the benchmarks' curves (matplotlib, written as PNG beside their JSON)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(path: str | Path, title: str, x_label: str,
                panels: list[tuple[str, dict[str, tuple[list, list]]]], *,
                log_x: bool = True) -> Path:
    """One row of panels sharing an x axis; each panel is (y label, {series: (xs, ys)})."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (y_label, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=name)
        if log_x:
            ax.set_xscale("log", base=2)
        xs_all = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(path: str | Path, title: str, groups: list[str],
              panels: list[tuple[str, list[float]]]) -> Path:
    """One row of bar panels over the same groups; each panel is (y label, one value per
    group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 1.4 * len(groups)) * len(panels),
                                                      4.5), squeeze=False)
    for ax, (y_label, values) in zip(axes[0], panels):
        bars = ax.bar(range(len(groups)), values, color=[f"C{i % 10}" for i in range(len(groups))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        ax.set_ylabel(y_label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
