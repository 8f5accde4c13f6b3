"""A small trained run made by `effnet.fit` (a tiny EfficientNet on scikit-learn's digits at 32 px),
shared by the evaluation tests, and helpers to check PNG files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effnet.models import get_config
from effnet.models.efficientnet import EfficientNet
from effnet.models.spec import StageSpec


def tiny_model(num_classes: int, img_size: int = 32) -> EfficientNet:
    """B0's blocks (MBConv, SE, SiLU) in 7 one-block stages of 8-32 channels: every code path, ~60k params."""
    base = get_config("efficientnet_b0")
    widths = [(1, 8), (2, 12), (2, 16), (2, 16), (1, 24), (2, 32), (1, 32)]
    stages = tuple(StageSpec(1 if i == 0 else 3, 3, stride, channels, 1) for i, (stride, channels) in enumerate(widths))
    config = dataclasses.replace(
        base,
        stages=stages,
        stem_channels=8,
        head_channels=64,
        num_classes=num_classes,
        drop_rate=0.0,
        preprocess=dataclasses.replace(base.preprocess, input_size=img_size),
        name="tiny",
    )
    model = EfficientNet(config)
    model.model_name = "tiny"
    return model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run folder (best.pt, config.yaml, metrics.csv, results.json, report.html) from
    `effnet.fit`: the tiny model trained on a quarter of digits' training images (for speed; the
    validation and test splits are digits' own, so eval and report reload them by name)."""
    from effnet.data import load_data, stratified_split
    from effnet.training import TrainConfig, fit

    root = tmp_path_factory.mktemp("eval-run")
    splits = load_data("digits", data_dir=str(root / "data"))
    quarter = stratified_split(splits.train.targets, [0.75], seed=0)[0]
    result = fit(
        tiny_model(10),
        dataclasses.replace(splits, train=splits.train.subset(quarter)),
        TrainConfig(data="digits"),  # the name, recorded in config.yaml
        epochs=3,
        batch_size=16,
        optimizer="adamw",
        lr=0.01,
        warmup_steps=3,
        label_smoothing=0.0,
        workers=0,
        precision="fp32",
        quiet=True,
        output=str(root / "run"),
        data_dir=str(root / "data"),
    )
    return result.run_dir


def assert_png_not_blank(path: Path, min_std: float = 5.0) -> np.ndarray:
    """`path` is a PNG that decodes and is not one flat colour; returns its pixels."""
    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > min_std, f"{path} looks blank (pixel std {pixels.std():.2f})"
    return pixels
