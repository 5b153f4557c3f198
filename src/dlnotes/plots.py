"""Plots written into the run directory: training curves and a grid of held-out samples.

matplotlib is imported inside the functions, with the file-only Agg backend, so nothing needs a screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """One panel per metric name: losses in one panel, every other metric in its own."""
    plt = _pyplot()
    x_key = "step" if any("step" in row for row in history) else "epoch"
    names = sorted({k for row in history for k, v in row.items()
                    if k not in ("epoch", "step") and isinstance(v, (int, float))})
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


def plot_image_grid(images: np.ndarray, true: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...],
                    path: Path, count: int = 32, columns: int = 8) -> None:
    """Held-out images titled `predicted (true)`, wrong ones in red: look at what the model does.
    Shows up to half the grid of mistakes, then the first correct ones."""
    plt = _pyplot()
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
