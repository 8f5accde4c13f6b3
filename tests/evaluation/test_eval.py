"""`effnet eval`: eval.json's numbers re-derived independently (scikit-learn, plain loops) from the raw
predictions it saved, and every figure a real, non-blank PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import assert_png_not_blank
from sklearn import metrics as skm

from effnet.cli import main
from effnet.evaluation.metrics import classification_metrics


def reference_ece(probabilities: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE written out the textbook way: a loop over (lo, hi] confidence bins."""
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:], strict=True):
        members = (confidence > lo) & (confidence <= hi)
        if members.any():
            gap = abs((predicted[members] == targets[members]).mean() - confidence[members].mean())
            total += members.mean() * gap
    return total


def assert_matches_sklearn(result: dict, logits: np.ndarray, targets: np.ndarray) -> None:
    num_classes = logits.shape[1]
    labels = list(range(num_classes))
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    predicted = probabilities.argmax(1)
    assert result["num_samples"] == len(targets)
    assert result["top1"] == pytest.approx(skm.accuracy_score(targets, predicted), abs=1e-12)
    top5 = skm.top_k_accuracy_score(targets, logits, k=min(5, num_classes), labels=labels)
    assert result["top5"] == pytest.approx(top5, abs=1e-12)
    assert result["loss"] == pytest.approx(skm.log_loss(targets, probabilities, labels=labels), rel=1e-6)
    assert result["ece"] == pytest.approx(reference_ece(probabilities, targets), abs=1e-9)
    assert result["confusion_matrix"] == skm.confusion_matrix(targets, predicted, labels=labels).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        targets, predicted, labels=labels, zero_division=0
    )
    for row, p, r, f, s in zip(result["per_class"], precision, recall, f1, support, strict=True):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p, r, f, s), abs=1e-12)
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            targets, predicted, labels=labels, average=average, zero_division=0
        )
        assert result[average] == pytest.approx({"precision": p, "recall": r, "f1": f}, abs=1e-12)


def test_metrics_match_sklearn_with_classes_never_predicted() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 7, size=300)
    logits = rng.normal(size=(300, 7)) * 2
    logits[np.arange(300), targets] += rng.normal(1.0, 1.5, size=300)  # better than chance, not perfect
    logits[:, 6] -= 20  # class 6 is never predicted: precision 0 by convention
    result = classification_metrics(logits, targets, [f"c{i}" for i in range(7)])
    assert 0.2 < result["top1"] < 0.95
    assert result["per_class"][6]["precision"] == 0.0
    assert_matches_sklearn(result, logits, targets)


def test_eval_cli_on_a_trained_run(tiny_run, tmp_path, capsys) -> None:
    output = tmp_path / "eval"
    assert main(["eval", str(tiny_run), "--output", str(output), "--backend", "torch"]) == 0
    result = json.loads((output / "eval.json").read_text())
    saved = np.load(output / "predictions.npz")
    assert result["split"] == "test" and result["data"].startswith("digits")
    assert len(saved["targets"]) == result["num_samples"] > 100
    assert_matches_sklearn(result, saved["logits"].astype(np.float64), saved["targets"])
    # The run's own test accuracy (measured by the training loop) is what eval finds again.
    results = json.loads((tiny_run / "results.json").read_text())
    assert result["top1"] == pytest.approx(results["test_acc"], abs=1.5 / result["num_samples"])

    losses = [row["loss"] for row in result["top_losses"]]
    assert losses == sorted(losses, reverse=True) and all(r["true"] != r["predicted"] for r in result["top_losses"])
    wrong = saved["logits"].argmax(1) != saved["targets"]
    assert len(result["top_losses"]) == min(16, int(wrong.sum()))

    assert set(result["figures"]) == {"confusion_counts", "confusion_normalised", "reliability", "top_losses", "curves"}
    for name in result["figures"].values():
        assert_png_not_blank(output / name)
    assert "top-1" in capsys.readouterr().out


def test_eval_tta_and_other_resolution(tiny_run, tmp_path) -> None:
    output = tmp_path / "eval-tta"
    arguments = ["--data", "digits", "--data-dir", str(tmp_path), "--output", str(output), "--backend", "torch"]
    assert main(["eval", str(tiny_run / "best.pt"), *arguments, "--tta", "--img-size", "40", "--split", "val"]) == 0
    result = json.loads((output / "eval.json").read_text())
    assert (result["tta"], result["img_size"], result["split"]) == (True, 40, "val")
    saved = np.load(output / "predictions.npz")
    assert_matches_sklearn(result, saved["logits"].astype(np.float64), saved["targets"])
