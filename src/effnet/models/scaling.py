"""Compound scaling: pure functions from (width, depth, resolution) multipliers to a `ModelConfig`.

The paper (Section 3.3) scales a baseline with one coefficient phi:

    depth d = alpha ** phi,  width w = beta ** phi,  resolution r = gamma ** phi
    subject to alpha * beta**2 * gamma**2 ~ 2,  alpha, beta, gamma >= 1

so that the FLOPs of the scaled network grow by about 2 ** phi (FLOPs are linear in depth and
quadratic in width and resolution). Channel and repeat counts are then rounded exactly as the
reference TensorFlow code does, which is what makes our B1-B7 match the published checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from effnet.models.spec import (
    B0_HEAD_CHANNELS,
    B0_RESOLUTION,
    B0_STAGES,
    B0_STEM_CHANNELS,
    SE_RATIO,
    ModelConfig,
    PreprocessConfig,
    StageSpec,
)

PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA = 1.2, 1.1, 1.15


def round_filters(channels: float, width_multiplier: float, divisor: int = 8) -> int:
    """Scale a channel count and round it to a multiple of `divisor`, never below 90% of the
    scaled value (the reference `round_filters`; hardware prefers multiples of 8)."""
    scaled = channels * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth_multiplier: float) -> int:
    """Scale a stage's number of blocks, rounding up (the reference `round_repeats`)."""
    return int(math.ceil(depth_multiplier * repeats))


def scale_stages(
    stages: tuple[StageSpec, ...],
    width_multiplier: float,
    depth_multiplier: float,
    fix_first_last_repeats: bool = False,
) -> tuple[StageSpec, ...]:
    """Apply width and depth multipliers to every stage of a stage table."""
    last = len(stages) - 1
    scaled = []
    for index, stage in enumerate(stages):
        keep_repeats = fix_first_last_repeats and index in (0, last)
        scaled.append(
            replace(
                stage,
                channels=round_filters(stage.channels, width_multiplier),
                repeats=stage.repeats if keep_repeats else round_repeats(stage.repeats, depth_multiplier),
            )
        )
    return tuple(scaled)


def build_config(
    width_multiplier: float,
    depth_multiplier: float,
    resolution: int,
    drop_rate: float,
    *,
    lite: bool = False,
    name: str = "efficientnet",
    stages: tuple[StageSpec, ...] = B0_STAGES,
) -> ModelConfig:
    """The scaled network for given multipliers. `lite=True` gives the EfficientNet-Lite rules:
    no SE, ReLU6, unscaled stem/head channels and unscaled first/last stage repeats."""
    return ModelConfig(
        stages=scale_stages(stages, width_multiplier, depth_multiplier, fix_first_last_repeats=lite),
        stem_channels=B0_STEM_CHANNELS if lite else round_filters(B0_STEM_CHANNELS, width_multiplier),
        head_channels=B0_HEAD_CHANNELS if lite else round_filters(B0_HEAD_CHANNELS, width_multiplier),
        drop_rate=drop_rate,
        se_ratio=None if lite else SE_RATIO,
        activation="relu6" if lite else "silu",
        preprocess=PreprocessConfig(input_size=resolution),
        name=name,
    )


@dataclass(frozen=True)
class CompoundScaling:
    """The result of `compound_scale`: multipliers, resolution, the constraint and the config."""

    phi: float
    alpha: float
    beta: float
    gamma: float
    depth_multiplier: float
    width_multiplier: float
    resolution_multiplier: float
    resolution: int
    flops_base: float  # alpha * beta**2 * gamma**2, the per-unit-phi FLOPs factor (target 2)
    constraint_target: float
    config: ModelConfig

    @property
    def constraint_error(self) -> float:
        """Relative distance of alpha*beta^2*gamma^2 from the target: -0.04 means 4% under."""
        return (self.flops_base - self.constraint_target) / self.constraint_target

    @property
    def expected_flops_multiplier(self) -> float:
        """How much FLOPs should grow over the baseline: (alpha*beta^2*gamma^2) ** phi."""
        return self.flops_base**self.phi


def default_drop_rate(phi: float) -> float:
    """Dropout before the classifier for a given phi: 0.2 at B0 rising by 0.05 per unit of phi
    to 0.5, a smooth fit of the official B0-B7 values (0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5)."""
    return min(0.5, 0.2 + 0.05 * max(phi, 0.0))


def compound_scale(
    phi: float,
    alpha: float = PAPER_ALPHA,
    beta: float = PAPER_BETA,
    gamma: float = PAPER_GAMMA,
    base_resolution: int = B0_RESOLUTION,
    constraint_target: float = 2.0,
    drop_rate: float | None = None,
) -> CompoundScaling:
    """Scale the B0 baseline by compound coefficient `phi` (any real number >= 0).

    Resolution is `round(base_resolution * gamma ** phi)` to the nearest pixel, so phi=1 with the
    paper's gamma gives 258. The official B1-B7 are *not* exactly this formula (the authors rounded
    them by hand); use their names for the published networks.
    """
    if phi < 0:
        raise ValueError(f"phi must be >= 0 (got {phi}); phi=0 is the B0 baseline")
    for label, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1 (got {value}): scaling never shrinks a dimension")
    depth, width, res_mult = alpha**phi, beta**phi, gamma**phi
    resolution = int(round(base_resolution * res_mult))
    config = build_config(
        width,
        depth,
        resolution,
        default_drop_rate(phi) if drop_rate is None else drop_rate,
        name=f"efficientnet_phi{phi:g}",
    )
    return CompoundScaling(
        phi=phi,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        depth_multiplier=depth,
        width_multiplier=width,
        resolution_multiplier=res_mult,
        resolution=resolution,
        flops_base=alpha * beta**2 * gamma**2,
        constraint_target=constraint_target,
        config=config,
    )
