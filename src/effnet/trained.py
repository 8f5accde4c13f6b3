"""Whatever a user points `eval`, `predict`, `cam` or `export` at, as one object: a run folder, a model
checkpoint, an exported ONNX file, or a model name (its offline pretrained ImageNet weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from effnet.inference import Engine, create_engine
from effnet.models import create_model, list_models
from effnet.models.checkpoint import load_model
from effnet.models.efficientnet import EfficientNet
from effnet.models.keras import is_keras_file, read_keras, variant


@dataclass
class Trained:
    """A model ready for inference and what is known about it.

    `model` is None for an ONNX file (it runs only through ONNX Runtime). `run_config` is the run's
    config.yaml (data spec, seed, val split) when the source is a run folder, else empty.
    """

    source: str
    model: EfficientNet | None
    class_names: list[str]
    preprocess: dict[str, Any]
    model_name: str
    extra: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    onnx_path: Path | None = None

    @property
    def data_spec(self) -> str | None:
        """The data the model was trained on, so `eval` can default to it."""
        return self.run_config.get("data") or self.extra.get("data") or None

    def engine(self, backend: str = "auto", img_size: int | None = None) -> Engine:
        """An inference engine for this model (an ONNX file always runs on ONNX Runtime)."""
        if self.model is None:
            return create_engine(self.onnx_path, backend)
        return create_engine(self.model, backend, img_size=img_size or self.preprocess["input_size"])

    def label(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)


def imagenet_class_names() -> list[str]:
    text = resources.files("effnet").joinpath("resources/imagenet_classes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_trained(source: str | Path, device: str = "cpu") -> Trained:
    """Resolve `source`: RUN_DIR (its best.pt and config.yaml), a checkpoint written by
    `effnet.models.checkpoint.save_model`, an .onnx file from `effnet export`, or a model name."""
    path = Path(source)
    if path.is_dir():
        checkpoint = path / "best.pt"
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"{path} is a folder without best.pt: give a run folder made by `effnet train` or a checkpoint file"
            )
        trained = _from_checkpoint(checkpoint, device)
        trained.run_dir = path
        config_file = path / "config.yaml"
        trained.run_config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
        trained.source = str(path)
        return trained
    if path.is_file():
        if is_keras_file(path):
            return _from_keras(path, device)
        return _from_onnx(path) if path.suffix == ".onnx" else _from_checkpoint(path, device)
    if str(source) in list_models():
        model = create_model(str(source), pretrained=True).to(device).eval()
        return Trained(str(source), model, imagenet_class_names(), model.pretrained_cfg, str(source))
    raise FileNotFoundError(
        f"{source}: no such run folder, checkpoint or ONNX file, and not a model name "
        "(`effnet models` lists the names; a name means its pretrained ImageNet weights)"
    )


def _from_checkpoint(path: Path, device: str) -> Trained:
    model, meta = load_model(path, map_location=device)
    names = meta.get("class_names") or [str(index) for index in range(model.num_classes)]
    return Trained(str(path), model, list(names), meta["preprocess"], meta["model_name"], dict(meta.get("extra", {})))


def _from_keras(path: Path, device: str) -> Trained:
    """A Keras EfficientNet file: its variant and classes told by its weights, ImageNet labels for 1,000."""
    state, meta = read_keras(path)
    classes = meta["num_classes"]
    if not classes:
        raise ValueError(f"{path} has no classifier (include_top=False without a Dense head): nothing to predict")
    size = {"img_size": meta["input_size"]} if meta["input_size"] else {}
    model = create_model(variant(state), num_classes=classes, pretrained=path, **size).to(device).eval()
    names = imagenet_class_names() if classes == 1000 else [str(index) for index in range(classes)]
    return Trained(str(path), model, names, model.pretrained_cfg, model.config.name)


def _from_onnx(path: Path) -> Trained:
    from effnet.export import read_onnx_metadata

    meta = read_onnx_metadata(path)
    if "preprocess" not in meta:
        raise ValueError(f"{path} has no effnet metadata (preprocess, class_names): export it with `effnet export`")
    names = meta.get("class_names") or []
    return Trained(str(path), None, list(names), meta["preprocess"], meta.get("model_name", path.stem), onnx_path=path)
