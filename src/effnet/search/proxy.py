"""The proxy network the search trains: a shrunken baseline, scaled by phi with candidate coefficients.

Training B0 at 224 pixels dozens of times is out of reach on a CPU, so the search shrinks the
baseline (width and depth multipliers, a lower base resolution) and scales *that* network. The
multipliers compose with the candidate's: a candidate at phi is the base variant built with width
`w0 * width_mult * beta**phi`, depth `d0 * depth_mult * alpha**phi` and resolution
`round(base_resolution * gamma**phi)`, exactly how `compound_scale` builds B0 at phi from the
same coefficients (one rounding of channels and repeats, not two), so the search and the final
model scale the same way. Rounding (channels to multiples of 8, repeats up) makes many nearby
coefficients give the same network, and makes the real FLOPs ratio differ from
alpha*beta^2*gamma^2: the search measures both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from effnet.models.efficientnet import EfficientNet
from effnet.models.scaling import build_config
from effnet.models.spec import EFFICIENTNET_COEFFICIENTS, LITE_COEFFICIENTS, ModelConfig
from effnet.profiling import count_macs, count_params
from effnet.search.grid import Coefficients

BASES = {**EFFICIENTNET_COEFFICIENTS, **LITE_COEFFICIENTS}


@dataclass(frozen=True)
class Proxy:
    """A shrunken baseline: `base` (a variant name) times `width_mult` and `depth_mult`, at
    `resolution` pixels, with `num_classes` outputs and the regularisation of the short recipe."""

    base: str = "efficientnet_b0"
    width_mult: float = 0.5
    depth_mult: float = 0.5
    resolution: int = 64
    num_classes: int = 10
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0  # stochastic depth only slows down a few epochs of training

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"unknown --base {self.base!r}; choose one of {', '.join(BASES)}")
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise ValueError("--width-mult and --depth-mult must be > 0")
        if self.resolution < 16:
            raise ValueError(f"--base-resolution must be >= 16 pixels (got {self.resolution})")

    def config(self, coefficients: Coefficients, phi: float = 1.0) -> ModelConfig:
        """The proxy scaled by `phi` with `coefficients` (phi=0 is the proxy itself)."""
        width, depth, _, _ = BASES[self.base]
        config = build_config(
            width * self.width_mult * coefficients.beta**phi,
            depth * self.depth_mult * coefficients.alpha**phi,
            int(round(self.resolution * coefficients.gamma**phi)),
            self.drop_rate,
            lite="lite" in self.base,
            name=f"{self.base}_proxy_{coefficients.label()}_phi{phi:g}",
        )
        return dataclasses.replace(config, num_classes=self.num_classes, drop_path_rate=self.drop_path_rate)


@dataclass(frozen=True)
class Measured:
    """What a config costs, counted on the built module (never from the formula)."""

    macs: int
    params: int
    resolution: int


def measure(config: ModelConfig) -> Measured:
    """MACs and parameters of the network `config` builds. Built on the meta device: shapes
    without memory or arithmetic, so the FlopCounterMode count takes milliseconds, not seconds."""
    with torch.device("meta"):
        model = EfficientNet(config)
    resolution = config.preprocess.input_size
    return Measured(macs=count_macs(model, resolution), params=count_params(model), resolution=resolution)


def architecture_key(config: ModelConfig) -> tuple:
    """Two configs with the same key build the same network (the name aside)."""
    return (config.stages, config.stem_channels, config.head_channels, config.preprocess.input_size)
