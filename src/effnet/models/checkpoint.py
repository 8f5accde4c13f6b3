"""A trained model as one file: weights, the exact architecture, class names, preprocessing.

This is what `effnet eval`, `predict`, `export` and `create_model(pretrained=FILE)` read. It holds
only tensors and plain Python values, so it loads with `torch.load(..., weights_only=True)`, and
it is written atomically (temporary file, then rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from effnet.files import atomic_write
from effnet.models.efficientnet import EfficientNet
from effnet.models.spec import ModelConfig, PreprocessConfig, StageSpec
from effnet.models.weights import WeightsError, read_state_dict

CHECKPOINT_FORMAT = "effnet-model"
CHECKPOINT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` that never leaves half a file (`effnet.files.atomic_write`)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    data["stages"] = tuple(StageSpec(**stage) for stage in data["stages"])
    pre = dict(data["preprocess"])
    pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
    data["preprocess"] = PreprocessConfig(**pre)
    return ModelConfig(**data)


def save_model(
    path: str | Path,
    model: EfficientNet,
    class_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing model checkpoint (see module docstring)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": model.config.name,
        "config": config_to_dict(model.config),
        "class_names": list(class_names) if class_names is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    atomic_save(payload, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[EfficientNet, dict[str, Any]]:
    """Rebuild the model saved by `save_model`. Returns (model in eval mode, metadata) where the
    metadata holds `model_name`, `class_names`, `preprocess` and `extra`."""
    state, meta = read_state_dict(path)
    if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
        raise WeightsError(
            f"{path} is not an effnet model checkpoint (no 'config' entry). To load foreign weights use "
            "effnet.create_model(name, pretrained=path); a run folder's model is runs/<name>/best.pt."
        )
    config = config_from_dict(meta["config"])
    model = EfficientNet(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"{path}: weights do not match the architecture recorded in it: {error}") from error
    model.to(map_location).eval()
    meta = {k: v for k, v in meta.items() if k != "config"}
    meta["preprocess"] = dataclasses.asdict(config.preprocess)
    return model, meta
