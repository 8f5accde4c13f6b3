"""`effnet compare --finetune`: every model fine-tuned with the same recipe, for the same
wall-clock budget, on the same data, through `effnet.fit` (the one training loop).

`fit` trains EfficientNets: it freezes by the parts stem / stages / head / classifier, and records
the architecture in its checkpoints. torchvision's classifiers enter it through
`TorchvisionAsEfficientNet`, which presents them in those parts. Each model's result is written
(atomically) as it finishes; a rerun skips the models that have one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effnet.comparison.zoo import (
    PRETRAINED_MODES,
    build,
    describe,
    has_pretrained,
    last_linear,
    pretrained_offline,
    torchvision_weights,
)
from effnet.data import DataSplits, load_data
from effnet.models import get_config, list_models
from effnet.models.efficientnet import EfficientNet
from effnet.models.spec import PreprocessConfig
from effnet.training import fit
from effnet.training.checkpoint import write_json

log = logging.getLogger("effnet")


class TorchvisionAsEfficientNet(EfficientNet):
    """A torchvision classifier in the shape `fit` expects: the network up to its last linear layer
    as `stem` (its pre-logits features), that layer as `classifier`, no stages or head, so that
    "full" and "head" fine-tuning, the no-weight-decay groups and `reset_classifier` all work.

    Only for training runs inside `effnet compare`: the checkpoints `fit` writes of it record an
    EfficientNet config and cannot be reloaded with `load_model` (which says so), so its runs have
    no report.html.
    """

    def __init__(self, name: str, network: nn.Module, preprocess: PreprocessConfig) -> None:
        nn.Module.__init__(self)  # not EfficientNet.__init__: the layers are torchvision's
        parent, attr, last = last_linear(network)
        setattr(parent, attr, nn.Identity())
        self.stem, self.stages, self.head = network, nn.Sequential(), nn.Identity()
        self.num_features = last.in_features
        self.classifier = last
        self.config = dataclasses.replace(
            get_config("efficientnet_b0"), name=name, num_classes=last.out_features, preprocess=preprocess
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stem(x))


def trainable_model(name: str, num_classes: int, pretrained: bool) -> EfficientNet:
    """Ours from `create_model`; torchvision's wrapped, with their own preprocessing (resolution,
    crop, interpolation, mean and std of their ImageNet weights)."""
    if name in list_models():
        return build(name, num_classes, pretrained)
    weights = torchvision_weights(name)
    preprocess = PreprocessConfig(input_size=describe(name).resolution)
    if weights is not None:
        transform = weights.transforms()
        preprocess = PreprocessConfig(
            input_size=transform.crop_size[0],
            crop_pct=transform.crop_size[0] / transform.resize_size[0],
            interpolation=transform.interpolation.value,
            mean=tuple(transform.mean),
            std=tuple(transform.std),
        )
    return TorchvisionAsEfficientNet(name, build(name, num_classes, pretrained), preprocess)


@dataclass
class FinetuneRow:
    name: str
    init: str  # "ImageNet" or "scratch"
    test_acc: float | None
    train_images_per_s: float | None  # last epoch's
    train_time_s: float  # in the training steps (what the budget limits)
    wall_time_s: float  # the whole fit: training, validation, checkpoints, test
    epochs: float
    stop_reason: str
    img_size: int
    params: int
    run_dir: str
    curve: list[tuple[float, float]]  # (training seconds so far, validation accuracy) per epoch


def _use_pretrained(name: str, mode: str) -> bool:
    """offline: ImageNet weights only if they load without network; download: whenever some exist."""
    if mode not in PRETRAINED_MODES:
        raise ValueError(f"pretrained={mode!r}: expected one of {', '.join(PRETRAINED_MODES)}")
    return mode != "none" and (pretrained_offline(name) or (mode == "download" and has_pretrained(name)))


def finetune_models(
    names: Sequence[str],
    data: str | DataSplits,
    output: str | Path,
    budget_minutes: float,
    pretrained: str = "offline",
    **fit_options: Any,
) -> list[FinetuneRow]:
    """Fine-tune each model in turn with `fit(..., max_minutes=budget_minutes, **fit_options)` on
    the same splits; results go to OUTPUT/finetune/<model>.json as each finishes, run folders to
    OUTPUT/finetune/runs/<model>. Models with a result file are skipped; a model interrupted
    mid-run starts again from scratch (its partial run folder is replaced)."""
    folder = Path(output) / "finetune"
    splits = data if isinstance(data, DataSplits) else load_data(data, **_data_options(fit_options))
    rows = []
    for index, name in enumerate(names, 1):
        result_file = folder / f"{name}.json"
        if result_file.is_file():
            log.info("[%d/%d] %s: done before (%s), skipped", index, len(names), name, result_file)
            rows.append(FinetuneRow(**json.loads(result_file.read_text())))
            continue
        run_dir = folder / "runs" / name
        if run_dir.exists():
            log.info("%s: an unfinished earlier attempt is in %s; starting it again", name, run_dir)
            shutil.rmtree(run_dir)
        use_pretrained = _use_pretrained(name, pretrained)
        log.info(
            "[%d/%d] %s (%s), %g min",
            index,
            len(names),
            name,
            "ImageNet" if use_pretrained else "scratch",
            budget_minutes,
        )
        model = trainable_model(name, len(splits.class_names), use_pretrained)
        # The HTML report reloads best.pt as an EfficientNet, which a wrapped torchvision model is not.
        no_report = {"report": False} if isinstance(model, TorchvisionAsEfficientNet) else {}
        fitted = fit(model, splits, max_minutes=budget_minutes, output=str(run_dir), **fit_options, **no_report)
        result = fitted.results
        row = FinetuneRow(
            name=name,
            init="ImageNet" if use_pretrained else "scratch",
            test_acc=result["test_acc"],
            train_images_per_s=result["images_per_s"],
            train_time_s=sum(epoch["epoch_time_s"] for epoch in fitted.history),
            wall_time_s=result["wall_time_s"],
            epochs=fitted.history[-1]["epoch"] if fitted.history else 0,  # fractional when the budget cut one
            stop_reason=result["stop_reason"],
            img_size=result["img_size"],
            params=result["params"],
            run_dir=str(run_dir),
            curve=_validation_curve(fitted.history),
        )
        folder.mkdir(parents=True, exist_ok=True)
        write_json(result_file, dataclasses.asdict(row))
        rows.append(row)
    return rows


def _data_options(fit_options: dict[str, Any]) -> dict[str, Any]:
    """The load_data settings among fit's options, so the splits are the ones fit would make."""
    keys = {"data_dir", "val_split", "seed", "on_bad_image"}
    return {key: value for key, value in fit_options.items() if key in keys}


def _validation_curve(history: list[dict[str, Any]]) -> list[tuple[float, float]]:
    seconds, curve = 0.0, []
    for epoch in history:
        seconds += epoch["epoch_time_s"]
        if epoch["val_acc"] is not None:
            curve.append((seconds, epoch["val_acc"]))
    return curve
