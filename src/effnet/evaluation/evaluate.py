"""`evaluate` (metrics of a model on one split) and `run_eval` (what `effnet eval` writes: eval.json,
the raw predictions and the figures)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from effnet.data import (
    DataSplits,
    ImageSplit,
    TransformedDataset,
    build_transforms,
    flip_tta,
    load_data,
    make_loader,
)
from effnet.evaluation.metrics import classification_metrics, per_sample_loss, softmax
from effnet.evaluation.plots import (
    class_order,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    plot_reliability,
    save_figure,
)
from effnet.files import atomic_write_text
from effnet.inference import Engine, create_engine
from effnet.trained import Trained

log = logging.getLogger("effnet")

TOP_LOSSES = 16
FIGURES = {
    "confusion_counts": "confusion_counts.png",
    "confusion_normalised": "confusion_normalised.png",
    "reliability": "reliability.png",
    "top_losses": "top_losses.png",
    "curves": "curves.png",
}


def predict_split(
    engine: Engine,
    split: ImageSplit,
    preprocess: dict[str, Any],
    img_size: int | None = None,
    batch_size: int = 64,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of a split, in its order, through the model's eval transform.
    With `tta` the logits are the mean over the image and its horizontal mirror."""
    transform = build_transforms(preprocess, train=False, img_size=img_size)
    loader = make_loader(TransformedDataset(split, transform), batch_size, shuffle=False, seed=0)
    logits, targets = [], []
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=None):
        output = flip_tta(engine, images) if tta else engine(images)
        logits.append(output.float().numpy())
        targets.append(np.asarray(labels))
    return np.concatenate(logits), np.concatenate(targets)


def evaluate(
    model: torch.nn.Module,
    split: ImageSplit,
    class_names: list[str],
    img_size: int | None = None,
    tta: bool = False,
    backend: str = "torch",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Every metric of eval.json for `model` on `split` (see `classification_metrics`)."""
    engine = create_engine(model, backend, img_size=img_size)
    logits, targets = predict_split(engine, split, model.pretrained_cfg, img_size, batch_size, tta)
    return classification_metrics(logits, targets, class_names)


def load_run_data(trained: Trained, spec: str | None = None, data_dir: str | None = None) -> DataSplits:
    """The data of `spec`, or the run's own (its data spec, data_dir, val_split and seed, so the
    validation split is the one it was trained against)."""
    spec = spec or trained.data_spec
    if not spec:
        raise ValueError(f"{trained.source} records no data set: pass --data (a data set name, folder or archive)")
    config = trained.run_config
    return load_data(
        spec,
        data_dir=data_dir or config.get("data_dir"),  # None: the cache folder (effnet.paths)
        val_split=config.get("val_split", 0.1),
        seed=config.get("seed", trained.extra.get("seed", 0)),
        on_bad_image=config.get("on_bad_image", "fail"),
    )


def read_metrics_csv(path: str | Path) -> list[dict[str, float | None]]:
    """metrics.csv as one dict per epoch, numbers as floats and empty cells as None."""
    with open(path, newline="") as handle:
        return [
            {k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(handle)
        ]


def run_eval(
    trained: Trained,
    output: str | Path,
    data: DataSplits | str | None = None,
    split: str = "test",
    img_size: int | None = None,
    tta: bool = False,
    backend: str = "auto",
    batch_size: int = 64,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate on `split` ("test", or "val"; "test" falls back to "val" when the data have no test
    split), write eval.json, predictions.npz and the figures into `output`; return eval.json's content."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    splits = data if isinstance(data, DataSplits) else load_run_data(trained, data, data_dir)
    chosen = splits.test if split == "test" and splits.test is not None else splits.val
    name = "test" if chosen is splits.test and chosen is not None else "val"
    if chosen is None:
        raise ValueError(f"{splits.source} has neither a test nor a validation split to evaluate on")
    if name != split:
        log.info("no %s split in %s: evaluating on the %s split", split, splits.source, name)
    if len(splits.class_names) != len(trained.class_names):
        raise ValueError(
            f"the model has {len(trained.class_names)} classes but {splits.source} has {len(splits.class_names)}: "
            "evaluate on the data set it was trained on"
        )
    if list(splits.class_names) != list(trained.class_names):
        log.warning(
            "class names differ between the model (%s, ...) and %s (%s, ...): labels are matched by position",
            ", ".join(trained.class_names[:3]), splits.source, ", ".join(splits.class_names[:3]),
        )  # fmt: skip
    size = img_size or int(trained.preprocess["input_size"])
    engine = trained.engine(backend, size)
    logits, targets = predict_split(engine, chosen, trained.preprocess, size, batch_size, tta)
    np.savez_compressed(output / "predictions.npz", logits=logits, targets=targets)
    metrics = classification_metrics(logits, targets, trained.class_names)
    worst = top_losses(logits, targets, chosen, trained.class_names)
    result = {
        "source": trained.source,
        "model": trained.model_name,
        "data": splits.source,
        "split": name,
        "img_size": size,
        "tta": tta,
        "backend": engine.name,
        **metrics,
        "top_losses": worst,
        "figures": write_figures(output, metrics, worst, chosen, trained),
    }
    atomic_write_text(output / "eval.json", json.dumps(result, indent=2) + "\n")
    log.info(
        "%s split: top-1 %.2f%%, top-5 %.2f%%, loss %.4f, ECE %.2f%% on %d images -> %s",
        name,
        100 * metrics["top1"],
        100 * metrics["top5"],
        metrics["loss"],
        100 * metrics["ece"],
        metrics["num_samples"],
        output / "eval.json",
    )
    return result


def top_losses(
    logits: np.ndarray, targets: np.ndarray, split: ImageSplit, class_names: list[str], count: int = TOP_LOSSES
) -> list[dict[str, Any]]:
    """The misclassified samples with the highest loss (the most confidently wrong), worst first."""
    losses = per_sample_loss(logits, targets)
    probabilities = softmax(logits)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != targets)
    worst = wrong[np.argsort(-losses[wrong], kind="stable")][:count]
    return [
        {
            "index": int(i),
            "path": split.paths[i] if split.paths else None,
            "true": class_names[targets[i]],
            "predicted": class_names[predicted[i]],
            "confidence": float(probabilities[i, predicted[i]]),
            "loss": float(losses[i]),
        }
        for i in worst
    ]


def write_figures(
    output: Path, metrics: dict[str, Any], worst: list[dict[str, Any]], split: ImageSplit, trained: Trained
) -> dict[str, str]:
    """The PNG figures of one evaluation; returns {figure: file name} for those written."""
    names = trained.class_names
    matrix = np.asarray(metrics["confusion_matrix"])
    order = class_order(matrix)
    written = {
        "confusion_counts": save_figure(
            plot_confusion(matrix, names, False, order), output / FIGURES["confusion_counts"]
        ),
        "confusion_normalised": save_figure(
            plot_confusion(matrix, names, True, order), output / FIGURES["confusion_normalised"]
        ),
        "reliability": save_figure(
            plot_reliability(metrics["reliability"], metrics["ece"]), output / FIGURES["reliability"]
        ),
    }
    if worst:
        images = [split[row["index"]][0].permute(1, 2, 0).numpy() for row in worst]
        titles = [f"true: {r['true']}\npred: {r['predicted']} ({100 * r['confidence']:.0f}%)" for r in worst]
        figure = plot_image_grid(images, titles, title="Most confidently wrong (top losses)")
        written["top_losses"] = save_figure(figure, output / FIGURES["top_losses"])
    metrics_csv = trained.run_dir / "metrics.csv" if trained.run_dir else None
    if metrics_csv and metrics_csv.is_file():
        rows = read_metrics_csv(metrics_csv)
        if rows:
            written["curves"] = save_figure(plot_curves(rows), output / FIGURES["curves"])
    return {key: path.name for key, path in written.items()}
