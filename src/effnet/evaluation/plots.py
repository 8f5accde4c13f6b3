"""The evaluation figures (matplotlib, Agg): confusion matrices, reliability diagram, training curves,
image grids. Each function returns a Figure; `save_figure` writes it as PNG and closes it.

Confusion matrices must stay readable up to 100 classes (CIFAR-100): the figure grows with the number
of classes so every tick label gets its own row of the same height as its font, cell values are only
printed when they fit, and beyond `CLUSTER_ABOVE` classes the classes are reordered by hierarchical
clustering of their confusions, so classes mistaken for one another sit next to each other and the
errors form visible blocks near the diagonal instead of scattered dots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

CLUSTER_ABOVE = 20
ANNOTATE_UP_TO = 25
DPI = 110


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(figure)
    return path


def class_order(matrix: np.ndarray) -> np.ndarray:
    """Natural order for a few classes; above CLUSTER_ABOVE, the leaf order of an average-linkage
    clustering of the symmetrised, row-normalised confusion (classes confused together are close)."""
    n = len(matrix)
    if n <= CLUSTER_ABOVE:
        return np.arange(n)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    rates = row_normalise(matrix)
    np.fill_diagonal(rates, 0.0)
    similarity = (rates + rates.T) / 2
    distance = 1.0 - similarity / max(similarity.max(), 1e-12)
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def row_normalise(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], normalise: bool, order: np.ndarray | None = None
) -> Figure:
    """Counts (`normalise=False`) or the fraction of each true class (rows sum to 1)."""
    n = len(class_names)
    order = np.arange(n) if order is None else np.asarray(order)
    values = (row_normalise(matrix) if normalise else np.asarray(matrix))[np.ix_(order, order)]
    names = [class_names[i] for i in order]
    # One tick label per cell: the cell must be taller than the font (1 pt = 1/72 inch).
    font = float(np.clip(260 / n, 7, 11))
    side = max(6.0, n * font * 1.6 / 72 + 2.5)
    figure, axes = plt.subplots(figsize=(side + 1.5, side))
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalise else max(values.max(), 1))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02, label="fraction of true class" if normalise else "images")
    axes.set_xticks(range(n), names, rotation=90, fontsize=font)
    axes.set_yticks(range(n), names, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    title = "Confusion matrix, row-normalised" if normalise else "Confusion matrix, counts"
    axes.set_title(title + (" (classes ordered by clustering)" if n > CLUSTER_ABOVE else ""))
    if n <= ANNOTATE_UP_TO:
        threshold = values.max() / 2
        for (row, col), value in np.ndenumerate(values):
            if value == 0:
                continue
            text = f"{value:.2f}" if normalise else f"{int(value)}"
            colour = "white" if value > threshold else "black"
            axes.text(col, row, text, ha="center", va="center", fontsize=font * 0.8, color=colour)
    return figure


def plot_reliability(bins: list[dict], ece: float) -> Figure:
    """Accuracy per confidence bin (bars) against the bin's mean confidence (red line): a calibrated
    model's bars reach their red lines and follow the diagonal. The share of samples per bin below."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    lower = np.array([b["lower"] for b in bins])
    width = bins[0]["upper"] - bins[0]["lower"]
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    counts = np.array([b["count"] for b in bins])
    top.bar(lower, accuracy, width=width, align="edge", color="#4C78A8", edgecolor="white", label="accuracy")
    filled = counts > 0
    top.hlines(
        confidence[filled],
        lower[filled],
        lower[filled] + width,
        colors="#E45756",
        linewidth=2.5,
        label="mean confidence in bin",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability diagram (ECE {100 * ece:.2f}%)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lower, counts / max(counts.sum(), 1), width=width, align="edge", color="#72B7B2", edgecolor="white")
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    return figure


def plot_curves(rows: list[dict]) -> Figure:
    """Loss and accuracy, train against validation, and the learning rate, per epoch (metrics.csv)."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    epochs = [row["epoch"] for row in rows]
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            series = [(e, row.get(f"{split}_{key}")) for e, row in zip(epochs, rows, strict=True)]
            series = [(e, v) for e, v in series if v is not None]
            if series:
                ax.plot(*zip(*series, strict=True), style, label=f"{split}", markersize=4)
        ax.set_title(label.capitalize())
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epochs, [row.get("lr") for row in rows], "-o", color="#54A24B", markersize=4)
    axes[2].set_title("Learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[2].grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    columns: int = 4,
    title: str | None = None,
    title_colours: Sequence[str] | None = None,
) -> Figure:
    """uint8 HxWx3 images in a grid with a caption over each (tiny images are shown with square pixels)."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    # Each caption line needs about 0.2 in of its own, or two-line captions reach into the row above.
    caption_lines = max((t.count("\n") + 1 for t in titles), default=1)
    row_height = 2.6 + 0.2 * caption_lines
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, row_height * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(images):
            continue
        image = images[index]
        ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 64 else "antialiased")
        colour = title_colours[index] if title_colours else "black"
        ax.set_title(titles[index], fontsize=8.5, color=colour)
    if title:
        figure.suptitle(title, fontsize=12)
    figure.tight_layout(h_pad=1.0)
    return figure
