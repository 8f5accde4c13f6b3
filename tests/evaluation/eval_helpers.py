"""Helpers of the evaluation tests: PNG checks, and the training tests' tiny EfficientNet."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# The training tests' tiny EfficientNet (B0's block types, ~50k parameters) serves here too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import tiny_model  # noqa: E402

__all__ = ["assert_png_not_blank", "tiny_model"]


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
