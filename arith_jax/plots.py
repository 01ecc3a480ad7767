"""Accuracy figures in the style of the paper's heatmaps (spec section 6.4).

Uses matplotlib's object API with the Agg canvas instead of pyplot, so plotting works headless and
never touches the global backend or figure state of the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_ANNOTATE_MAX = 30  # larger grids get unreadable cell labels


def plot_accuracy_grid(
    acc_AxB: np.ndarray,
    path: str | Path,
    train_len: int,
    title: str = "",
    row_label: str = "length of operand 1",
    col_label: str = "length of operand 2",
) -> Path:
    """Save acc_AxB (fractions in 0..1; row i is operand-1 length i+1, column j operand-2 length j+1;
    NaN = not evaluated) as a YlGnBu heatmap in percent, with the training region [1..train_len]^2
    outlined in red."""
    acc = 100.0 * np.asarray(acc_AxB, dtype=float)
    if acc.ndim != 2:
        raise ValueError(f"accuracy grid must be 2-D, got shape {acc.shape}")
    rows, cols = acc.shape
    fig = Figure(figsize=(_inches(cols) + 2.5, _inches(rows) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(acc), cmap="YlGnBu", vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.add_patch(Rectangle((-0.5, -0.5), train_len, train_len, fill=False, edgecolor="red", linewidth=2))
    _length_ticks(ax.set_xticks, ax.set_xticklabels, cols)
    _length_ticks(ax.set_yticks, ax.set_yticklabels, rows)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title)
    if rows <= _ANNOTATE_MAX and cols <= _ANNOTATE_MAX:
        for (i, j), value in np.ndenumerate(acc):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 60 else "black")
    return _save(fig, path)


def plot_length_sweep(lengths: Sequence[int], accs: Sequence[float], path: str | Path, train_len: int,
                      title: str = "") -> Path:
    """Save exact-match accuracy (fractions) against equal operand length, with the longest
    training length marked, for sweeps beyond the grid (e.g. 101..160 digits)."""
    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(list(lengths), 100.0 * np.asarray(accs, dtype=float), marker="o")
    ax.axvline(train_len, color="red", linestyle="--", label=f"longest trained ({train_len})")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("length of both operands")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _inches(n_cells: int) -> float:
    """Grow with the grid so annotations fit, but cap it so a 100x100 grid stays a sane image."""
    return min(max(4.0, 0.28 * n_cells), 9.0)


def _length_ticks(set_ticks, set_labels, n: int) -> None:
    """Label lengths from 1; on big grids only 1 and multiples of 10."""
    shown = [k for k in range(1, n + 1) if n <= _ANNOTATE_MAX or k == 1 or k % 10 == 0]
    set_ticks([k - 1 for k in shown])
    set_labels([str(k) for k in shown])


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
