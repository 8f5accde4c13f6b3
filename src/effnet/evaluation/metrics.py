"""Classification metrics from raw logits: accuracy, per-class precision/recall/F1, loss, calibration.

Everything is computed from one (N, C) logits array and the N true labels, in numpy, so the numbers in
eval.json can be re-derived by anyone from the saved predictions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def per_sample_loss(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy of each sample (natural log), the quantity fastai's "top losses" sorts by."""
    return -log_softmax(logits.astype(np.float64))[np.arange(len(targets)), targets]


def top_k_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where undefined (no predictions / no samples),
    scikit-learn's `zero_division=0` convention."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves (the
    reliability diagram): ECE = sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 goes to bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(accuracy - mean_confidence)
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return {"ece": float(ece), "bins": rows}


def classification_metrics(logits: np.ndarray, targets: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """All of eval.json's numbers for one split."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    num_classes = logits.shape[1]
    probabilities = softmax(logits)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(targets, predicted, num_classes)
    scores = per_class_scores(matrix)
    support = scores["support"]
    weights = support / support.sum()
    reliability = calibration(probabilities.max(axis=1), predicted == targets)
    return {
        "num_samples": int(len(targets)),
        "num_classes": int(num_classes),
        "top1": float((predicted == targets).mean()),
        "top5": top_k_accuracy(logits, targets, 5),
        "loss": float(per_sample_loss(logits, targets).mean()),
        "ece": reliability["ece"],
        "macro": {key: float(scores[key].mean()) for key in ("precision", "recall", "f1")},
        "weighted": {key: float((scores[key] * weights).sum()) for key in ("precision", "recall", "f1")},
        "per_class": [
            {
                "class": name,
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        ],
        "reliability": reliability["bins"],
        "confusion_matrix": matrix.tolist(),
    }
