"""Plots written into the run directory: training curves and a grid of held-out samples.

matplotlib is imported inside the functions, with the file-only Agg backend, so nothing needs a screen.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from dlnotes.distributed import main_rank_only  # in a multi-process run, only rank 0 writes files


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@main_rank_only
def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """One panel per metric name: losses in one panel, every other metric in its own."""
    plt = pyplot()
    x_key = "step" if any("step" in row for row in history) else "epoch"
    names = sorted({k for row in history for k, v in row.items()
                    if k not in ("epoch", "step", "time_s") and isinstance(v, (int, float))})
    losses = [n for n in names if "loss" in n]
    panels = ([losses] if losses else []) + [[n] for n in names if n not in losses]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name in panel:
            points = [(row[x_key], row[name]) for row in history if name in row and x_key in row]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
        ax.set_xlabel(x_key)
        ax.set_title(", ".join(panel))
        ax.grid(alpha=0.3)
        if len(panel) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_learning_curves(x: list, lines: dict[str, list[float]], path: Path, xlabel: str,
                         levels: dict[str, float] | None = None, log_x: bool = False, title: str = "") -> None:
    """Test accuracy against the amount of training data: one line per method (NaN points and all-NaN lines
    are left out), and a dashed level for each method that does not depend on it (a prompt, a baseline)."""
    if not all(isinstance(v, numbers.Real) for v in x):  # strings become categories, which set_xscale erases
        raise TypeError(f"plot_learning_curves needs numbers on the x axis, not {x!r}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in lines.items():
        if not all(math.isnan(v) for v in values):
            ax.plot(x, values, marker="o", label=label)
    for i, (label, value) in enumerate((levels or {}).items()):
        ax.axhline(value, ls=("--", ":", "-.")[i % 3], color=f"C{len(lines) + i}", label=label)
    ax.set(xlabel=xlabel, ylabel="test accuracy", title=title, xscale="log" if log_x else "linear")
    if log_x:  # the measured sizes as the ticks, written plainly (not 3 x 10^1)
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_image_grid(images: np.ndarray, true: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...],
                    path: Path, count: int = 32, columns: int = 8) -> None:
    """Held-out images titled `predicted (true)`, wrong ones in red: look at what the model does.
    Shows up to half the grid of mistakes, then the first correct ones."""
    plt = pyplot()
    wrong = np.flatnonzero(true != predicted)[: count // 2]
    right = np.flatnonzero(true == predicted)[: count - len(wrong)]
    chosen = np.concatenate([wrong, right])
    images, true, predicted = images[chosen], true[chosen], predicted[chosen]
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p in zip(axes.flat, images, true, predicted):
        ax.imshow(image, cmap="gray")
        ax.set_title(f"{classes[p]}" + ("" if p == t else f" ({classes[t]})"), fontsize=8,
                     color="black" if p == t else "red")
    fig.suptitle("held-out samples: predicted (true when wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    """Counts of (true class, predicted class), with each row's share: the diagonal is what was right."""
    plt = pyplot()
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 1.1 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, f"{count}\n{shares[row, col]:.0%}", ha="center", va="center", fontsize=9,
                color="white" if shares[row, col] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_attention(examples: list[tuple[list[str], list[str], np.ndarray]], path: Path, title: str = "") -> None:
    """Attention heat maps, one panel per (source tokens, output tokens, weights (T_out, T_src)) example:
    row t shows where the decoder looked while it wrote output token t."""
    plt = pyplot()
    if not examples:
        return
    widths = [max(len(src), 4) for src, _, _ in examples]
    heights = [max(len(out), 4) for _, out, _ in examples]
    scale = 0.32
    fig, axes = plt.subplots(len(examples), 1, squeeze=False,
                             figsize=(max(widths) * scale + 2.5, sum(heights) * scale + 1.5 * len(examples)),
                             gridspec_kw={"height_ratios": heights})
    for ax, (source, output, weights) in zip(axes[:, 0], examples):
        ax.imshow(np.asarray(weights)[: len(output), : len(source)], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(source)), source, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(output)), output, fontsize=8)
        ax.set_xlabel("source", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_heatmap_grid(panels: list[list[np.ndarray]], tokens: list[str], path: Path, row_name: str = "row",
                      column_name: str = "column", title: str = "") -> None:
    """A grid of square (T, T) heat maps over the same T tokens, e.g. attention weights of every layer (grid row)
    and head (grid column): in each panel, row t shows where token t looks. Characters that no installed font
    has (Chinese without a CJK font) are drawn as boxes, without a warning per glyph."""
    import warnings

    plt = pyplot()
    rows, columns = len(panels), max(len(row) for row in panels)
    size = 1.0 + 0.09 * len(tokens)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    labels = [repr(t)[1:-1] if t.isspace() else t for t in tokens]
    for r, row in enumerate(panels):
        for c, weights in enumerate(row):
            ax = axes[r, c]
            ax.imshow(weights, cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(tokens)), labels, fontsize=4)
            ax.set_yticks(range(len(tokens)), labels, fontsize=4)
            ax.set_title(f"{row_name} {r + 1}, {column_name} {c + 1}", fontsize=7)
    fig.suptitle(title, fontsize=11)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave the top for the title
        fig.savefig(path, dpi=120)
    plt.close(fig)


@main_rank_only
def plot_forecasts(times: np.ndarray, series: np.ndarray, forecasts: dict[str, tuple[np.ndarray, np.ndarray]],
                   path: Path, title: str = "", split: float | None = None) -> None:
    """A series with each method's forecasts drawn over it: `forecasts[name] = (times (O, h), values (O, h))`,
    one line per forecast origin; a dashed line marks where the held-out part begins."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(times, series, color="black", linewidth=1.2, label="truth")
    for (name, (when, values)), color in zip(forecasts.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for i, (t, v) in enumerate(zip(np.atleast_2d(when), np.atleast_2d(values))):
            ax.plot(t, v, color=color, linewidth=1.2, label=name if i == 0 else None)
    if split is not None:
        ax.axvline(split, color="gray", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_digit_rows(images: np.ndarray, row_labels: list[str], path: Path, title: str = "") -> None:
    """A grid of small grey images (R, C, H, W), one labelled row each: samples per class, originals above
    reconstructions, a walk from one image to another."""
    plt = pyplot()
    rows, columns = images.shape[:2]
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.8 + 0.6, rows * 0.8 + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(columns):
            axes[r, c].imshow(images[r, c], cmap="gray")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@main_rank_only
def plot_codes_3d(codes: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], path: Path, title: str = "") -> None:
    """3-D codes (N, 3) as points coloured by class, seen from two angles: where the encoder puts each digit."""
    plt = pyplot()
    fig = plt.figure(figsize=(11, 5))
    for i, (elevation, azimuth) in enumerate([(25, 45), (25, 135)]):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        for c, name in enumerate(classes):
            points = codes[labels == c]
            ax.scatter(points[:, 0], points[:, 1], points[:, 2], s=4, color=plt.cm.tab10(c), label=name)
        ax.view_init(elevation, azimuth)
        ax.set(xlabel="z1", ylabel="z2", zlabel="z3")
    fig.axes[0].legend(markerscale=3, fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
