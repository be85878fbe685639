"""What the commands show besides their tables: progress on stderr while they run, and PNG plots.

Progress goes to stderr so that stdout holds only the table, which can then be piped or saved.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm


def progress(total: int, desc: str, unit: str = "it") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def pyplot():
    """matplotlib's pyplot on the Agg backend: commands run on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """One cluster of bars per group, one bar per series, each bar labelled with its value."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
