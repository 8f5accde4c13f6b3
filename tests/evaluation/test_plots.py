"""Figures stay readable at 100 classes: no two tick labels overlap, and clustering puts classes that
are confused with each other next to each other."""

from __future__ import annotations

import numpy as np
from eval_helpers import assert_png_not_blank

from effnet.evaluation.plots import class_order, plot_confusion, plot_curves, plot_reliability, save_figure

# CIFAR-100-like names, some long, to stress the label layout.
NAMES = [f"{word}_{i}" for i, word in enumerate(["aquarium_fish", "maple_tree", "pickup_truck", "sweet_pepper"] * 25)]


def overlaps(boxes: list, axis: int) -> list[tuple[int, int]]:
    """Pairs of neighbouring label boxes that overlap along `axis` (0: x, 1: y)."""
    spans = sorted((box.get_points()[:, axis].tolist(), i) for i, box in enumerate(boxes))
    return [(a[1], b[1]) for a, b in zip(spans, spans[1:], strict=False) if a[0][1] > b[0][0] + 0.5]


def confused_pairs_matrix(n: int, seed: int = 0) -> np.ndarray:
    """Mostly correct; class i is confused with class (i + n/2) % n."""
    rng = np.random.default_rng(seed)
    matrix = np.diag(rng.integers(60, 90, size=n))
    for i in range(n):
        matrix[i, (i + n // 2) % n] += 25
        matrix[i, rng.integers(0, n)] += 1
    return matrix


def test_confusion_matrix_of_100_classes_has_no_overlapping_labels(tmp_path) -> None:
    matrix = confused_pairs_matrix(100)
    figure = plot_confusion(matrix, NAMES, normalise=True, order=class_order(matrix))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    x_boxes = [label.get_window_extent(renderer) for label in axes.get_xticklabels()]
    y_boxes = [label.get_window_extent(renderer) for label in axes.get_yticklabels()]
    assert len(x_boxes) == len(y_boxes) == 100
    assert overlaps(x_boxes, 0) == [] and overlaps(y_boxes, 1) == []
    assert min(label.get_fontsize() for label in axes.get_yticklabels()) >= 7
    assert_png_not_blank(save_figure(figure, tmp_path / "cm100.png"))


def test_clustering_puts_confused_classes_side_by_side() -> None:
    matrix = confused_pairs_matrix(60)
    order = list(class_order(matrix))
    assert sorted(order) == list(range(60))
    position = {cls: i for i, cls in enumerate(order)}
    adjacent = sum(abs(position[i] - position[(i + 30) % 60]) == 1 for i in range(60))
    assert adjacent >= 50  # in natural order none of the 60 pairs would be adjacent
    assert list(class_order(matrix[:10, :10])) == list(range(10))  # few classes: natural order


def test_curves_and_reliability_figures(tmp_path) -> None:
    rows = [
        {"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "train_acc": 1 - 0.5 / e, "val_acc": 1 - 0.6 / e,
         "lr": 0.1 / e} for e in range(1, 6)
    ]  # fmt: skip
    assert_png_not_blank(save_figure(plot_curves(rows), tmp_path / "curves.png"))
    bins = [{"lower": i / 10, "upper": (i + 1) / 10, "count": i, "accuracy": i / 12, "confidence": i / 10 + 0.05}
            for i in range(10)]  # fmt: skip
    assert_png_not_blank(save_figure(plot_reliability(bins, 0.05), tmp_path / "reliability.png"))
