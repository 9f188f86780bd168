"""Matplotlib figures of results: confusion matrix, misclassified images, training curves.

Figures are built with matplotlib's object API (no pyplot), so no backend is chosen or switched: importing
this module leaves a notebook's plotting as it was, and files are written on machines without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure


def confusion_figure(matrix: torch.Tensor, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts as a heat map, rows normalised to recall (colour), counts written in every cell (up to 30 classes)."""
    counts = matrix.detach().cpu().to(torch.int64)
    n = counts.shape[0]
    row_sums = counts.sum(dim=1, keepdim=True).clamp_min(1)
    recall = (counts.double() / row_sums).numpy()
    # Up to 30 classes every cell is big enough for its count; beyond (CIFAR-100) the colours carry it, and the
    # figure stops growing (a 100-class figure at 0.6 inch a class would be 7,500 pixels wide).
    side = max(4.5, min(0.6 * n + 2.5, 20.0))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of the true class")
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    correct = int(counts.diag().sum())
    ax.set_title(f"{title}\n{correct}/{total} correct ({correct / max(total, 1):.1%})")
    font = 9 if n <= 12 else 6
    if n > 30:
        ax.tick_params(labelsize=4)
        return fig
    for i in range(n):
        for j in range(n):
            value = int(counts[i, j])
            if value:
                colour = "white" if recall[i, j] > 0.5 else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=font)
    return fig


def misclassified_figure(
    images: torch.Tensor,
    true: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    title: str = "Most confident mistakes",
    columns: int = 8,
) -> Figure:
    """A grid of uint8 ``(N, 3, H, W)`` images, each titled with its true and predicted label."""
    count = images.shape[0]
    cols = max(1, min(columns, count))
    rows = max(1, -(-count // cols))
    fig = Figure(figsize=(1.9 * cols, 2.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(images[k].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(f"true: {true[k]}\npred: {predicted[k]} ({confidence[k]:.0%})", fontsize=8)
    if count == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title)
    return fig


def curves_figure(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, xlabel: str = "step") -> Figure:
    """One line per tag against its step (points when a series is short)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for tag, points in sorted(series.items()):
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        ax.plot(steps, values, label=tag, marker="o" if len(points) <= 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Write a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
