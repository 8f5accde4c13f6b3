"""The architecture as data: the paper's Table 1 and the per-variant scaling tables.

Everything that defines *which* network is built lives here, as plain frozen dataclasses and
tuples that can be checked line by line against Tan & Le (ICML 2019), Table 1, and the official
TensorFlow `efficientnet_builder.py` / `efficientnet_lite_builder.py` coefficient tables.
The modules in `efficientnet.py` only know how to turn a `ModelConfig` into layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Padding = Literal["symmetric", "same"]
Activation = Literal["silu", "relu6"]


@dataclass(frozen=True)
class StageSpec:
    """One row of Table 1: `repeats` MBConv blocks sharing a kernel, expansion and width.

    `stride` applies to the first block of the stage only; the rest use stride 1.
    """

    expand_ratio: int
    kernel: int
    stride: int
    channels: int
    repeats: int


# Tan & Le (2019), Table 1: the EfficientNet-B0 baseline.
#   Stage | Operator          | Resolution | Channels | Layers
#   1     | Conv3x3            | 224x224    | 32       | 1      (the stem, below)
#   2     | MBConv1, k3x3      | 112x112    | 16       | 1
#   3     | MBConv6, k3x3      | 112x112    | 24       | 2
#   4     | MBConv6, k5x5      | 56x56      | 40       | 2
#   5     | MBConv6, k3x3      | 28x28      | 80       | 3
#   6     | MBConv6, k5x5      | 14x14      | 112      | 3
#   7     | MBConv6, k5x5      | 14x14      | 192      | 4
#   8     | MBConv6, k3x3      | 7x7        | 320      | 1
#   9     | Conv1x1 & Pooling & FC | 7x7    | 1280     | 1      (the head, below)
B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(expand_ratio=1, kernel=3, stride=1, channels=16, repeats=1),
    StageSpec(expand_ratio=6, kernel=3, stride=2, channels=24, repeats=2),
    StageSpec(expand_ratio=6, kernel=5, stride=2, channels=40, repeats=2),
    StageSpec(expand_ratio=6, kernel=3, stride=2, channels=80, repeats=3),
    StageSpec(expand_ratio=6, kernel=5, stride=1, channels=112, repeats=3),
    StageSpec(expand_ratio=6, kernel=5, stride=2, channels=192, repeats=4),
    StageSpec(expand_ratio=6, kernel=3, stride=1, channels=320, repeats=1),
)
B0_STEM_CHANNELS = 32
B0_HEAD_CHANNELS = 1280
B0_RESOLUTION = 224
SE_RATIO = 0.25  # squeeze width as a fraction of the block's *input* channels

# Official coefficients: name -> (width multiplier, depth multiplier, resolution, dropout rate).
# B1-B7 follow compound scaling approximately, rounded by the authors (see scaling.compound_scale
# for the exact formula and how far these are from it).
EFFICIENTNET_COEFFICIENTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}

# EfficientNet-Lite (TF `efficientnet_lite_builder.py`): no squeeze-excitation, ReLU6, and the
# stem, the head and the first and last stages' repeats are left unscaled for mobile accelerators.
LITE_COEFFICIENTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}

# TensorFlow's batch-norm constants and "same" padding: weights trained in TF (Google's EfficientNets,
# their Lite variants, Keras, efficientnet_pytorch's ports) give the same outputs only with them.
TF_BN: dict[str, float] = {"bn_eps": 1e-3, "bn_momentum": 0.01}
TF_CONVENTIONS: dict[str, object] = {"padding": "same", **TF_BN}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite inputs: [-1, 1] (timm's `tf_efficientnet_lite*` pretrained_cfg).
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images must be prepared for a model: read by the data pipeline, predict and export.

    Evaluation resizes the short side to `round(input_size / crop_pct)` and centre-crops
    `input_size`, the ImageNet convention the reference weights were evaluated with.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_size(self) -> int:
        return int(round(self.input_size / self.crop_pct))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one network; produced by `scaling.build_config`."""

    stages: tuple[StageSpec, ...]
    stem_channels: int
    head_channels: int
    num_classes: int = 1000
    drop_rate: float = 0.2
    drop_path_rate: float = 0.2
    se_ratio: float | None = SE_RATIO
    activation: Activation = "silu"
    padding: Padding = "symmetric"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    name: str = "efficientnet"

    @property
    def num_blocks(self) -> int:
        return sum(stage.repeats for stage in self.stages)
