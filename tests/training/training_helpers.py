"""Fixtures for the training tests: a tiny EfficientNet (same code paths, ~50k parameters) and a
small synthetic image folder whose classes differ in colour, so a few steps can learn them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from effnet.models import get_config
from effnet.models.efficientnet import EfficientNet
from effnet.models.spec import StageSpec

CLASSES = ["red", "green", "blue"]


def tiny_model(num_classes: int = len(CLASSES), img_size: int = 32) -> EfficientNet:
    """B0's blocks (SE, SiLU, stochastic depth) with 7 one-block stages of 8-24 channels."""
    base = get_config("efficientnet_b0")
    stages = tuple(
        StageSpec(expand_ratio=1 if i == 0 else 2, kernel=3, stride=stride, channels=channels, repeats=1 + (i == 1))
        for i, (stride, channels) in enumerate([(1, 8), (2, 12), (2, 16), (2, 16), (1, 20), (2, 24), (1, 24)])
    )
    config = dataclasses.replace(
        base,
        stages=stages,
        stem_channels=8,
        head_channels=32,
        num_classes=num_classes,
        drop_path_rate=0.2,
        preprocess=dataclasses.replace(base.preprocess, input_size=img_size),
        name="tiny",
    )
    return EfficientNet(config)


def write_folder(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 20) -> Path:
    """root/<split>/<class>/*.png; class c has channel c brighter, plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                pixels[..., index] += 150
                Image.fromarray(pixels).save(folder / f"{number:03d}.png")
    return root
