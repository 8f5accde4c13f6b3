"""Predict labels for image files: what `effnet predict` runs.

Inputs may be files, folders (searched recursively for images) or glob patterns. A file that cannot be
read is reported with its path and the reason and the others are still predicted: one bad photo in a
folder of thousands should cost one line of output, not the whole run.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from effnet.data import BadImageError, build_transforms, flip_tta, read_rgb
from effnet.data.images import is_image_file
from effnet.data.splits import hwc_to_chw
from effnet.inference import Engine
from effnet.trained import Trained


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), most probable first


@dataclass
class Failure:
    path: str
    reason: str


def collect_images(inputs: list[str]) -> tuple[list[Path], list[Failure]]:
    """Expand files, folders and globs into image paths (in the order given, folders sorted)."""
    found: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not images:
                failures.append(Failure(item, "folder contains no image files"))
            found += images
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                failures.append(Failure(item, "pattern matches no files"))
            found += matches
        else:
            failures.append(Failure(item, "no such file or folder"))
    return list(dict.fromkeys(found)), failures


def predict_files(
    trained: Trained,
    paths: list[Path],
    engine: Engine,
    top_k: int = 5,
    batch_size: int = 32,
    img_size: int | None = None,
    tta: bool = False,
) -> tuple[list[Prediction], list[Failure]]:
    """Read, preprocess (the model's eval transform) and classify `paths` in batches; with `tta`
    from logits averaged over each image and its mirror image."""
    transform = build_transforms(trained.preprocess, train=False, img_size=img_size)
    predictions: list[Prediction] = []
    failures: list[Failure] = []
    for start in range(0, len(paths), batch_size):
        batch, names = [], []
        for path in paths[start : start + batch_size]:
            try:
                image = hwc_to_chw(read_rgb(path))
            except BadImageError as error:
                failures.append(Failure(str(path), error.reason))
                continue
            batch.append(transform(image))
            names.append(str(path))
        if not batch:
            continue
        images = torch.stack(batch)
        logits = flip_tta(engine, images) if tta else engine(images).float()
        probabilities = logits.softmax(1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        for name, row_values, row_indices in zip(names, values.tolist(), indices.tolist(), strict=True):
            top = [(trained.label(i), p) for i, p in zip(row_indices, row_values, strict=True)]
            predictions.append(Prediction(name, top))
    return predictions, failures


def format_table(predictions: list[Prediction]) -> str:
    """Path, then the top labels with their probabilities, one line per image."""
    if not predictions:
        return ""
    width = min(60, max(len(p.path) for p in predictions))
    lines = [f"{'image':{width}}  top predictions"]
    for prediction in predictions:
        labels = "  ".join(f"{label} {100 * prob:5.1f}%" for label, prob in prediction.top)
        lines.append(f"{_shorten(prediction.path, width):{width}}  {labels}")
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def write_json(path: str | Path, predictions: list[Prediction], failures: list[Failure]) -> None:
    data = {
        "predictions": [
            {"path": p.path, "top": [{"label": label, "probability": prob} for label, prob in p.top]}
            for p in predictions
        ],
        "failures": [{"path": f.path, "reason": f.reason} for f in failures],
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def write_csv(path: str | Path, predictions: list[Prediction]) -> None:
    """One row per image: path, then label_1, prob_1, ..., label_k, prob_k."""
    k = max((len(p.top) for p in predictions), default=0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")])
        for p in predictions:
            writer.writerow([p.path] + [value for label, prob in p.top for value in (label, f"{prob:.6f}")])
