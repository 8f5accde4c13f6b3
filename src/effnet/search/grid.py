"""The candidate coefficients: a grid of (alpha, beta, gamma) under the FLOPs constraint, and a
spread-out subset of it when the budget cannot train them all.

The paper (Section 3.3) fixes phi=1 and searches alpha, beta, gamma >= 1 with
alpha * beta**2 * gamma**2 ~ 2: one step of phi then doubles the FLOPs whichever way they are
split between depth (alpha), width (beta**2) and resolution (gamma**2). Every point of the grid is
one such split, which is why we subsample in "FLOPs-share" space: the fractions of log(2) spent on
depth, width and resolution, a point of a triangle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from effnet.models.scaling import PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA


@dataclass(frozen=True)
class Coefficients:
    """alpha (depth), beta (width), gamma (resolution): the bases of compound scaling."""

    alpha: float
    beta: float
    gamma: float

    @property
    def flops_factor(self) -> float:
        """alpha * beta^2 * gamma^2: how much one unit of phi should multiply the FLOPs."""
        return self.alpha * self.beta**2 * self.gamma**2

    @property
    def flops_shares(self) -> tuple[float, float, float]:
        """Fractions of log(FLOPs factor) spent on depth, width and resolution (they sum to 1)."""
        parts = (math.log(self.alpha), 2 * math.log(self.beta), 2 * math.log(self.gamma))
        total = sum(parts)
        return tuple(p / total for p in parts) if total > 0 else (1 / 3, 1 / 3, 1 / 3)

    def label(self) -> str:
        return f"a{self.alpha:.2f}_b{self.beta:.2f}_g{self.gamma:.2f}"


PAPER_COEFFICIENTS = Coefficients(PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA)


def within_constraint(point: Coefficients, target: float, tolerance: float) -> bool:
    """`tolerance` is relative: |alpha*beta^2*gamma^2 / target - 1| <= tolerance."""
    return factor_within(point.flops_factor, target, tolerance)


def factor_within(factor: float, target: float, tolerance: float) -> bool:
    """A FLOPs factor (ideal or measured) within relative `tolerance` of `target`, boundary included."""
    return abs(factor / target - 1) <= tolerance + 1e-9


def coefficient_grid(step: float = 0.05, target: float = 2.0, tolerance: float = 0.1) -> list[Coefficients]:
    """All alpha, beta, gamma in {1, 1+step, 1+2*step, ...} whose product alpha*beta^2*gamma^2
    lies within `tolerance` (relative) of `target`, ordered by (alpha, beta, gamma)."""
    if step <= 0:
        raise ValueError(f"--grid-step must be > 0 (got {step})")
    if target <= 1:
        raise ValueError(f"--target must be > 1 (got {target}): it is the FLOPs factor of one step of phi")
    if not 0 <= tolerance < 1:
        raise ValueError(f"--tolerance is relative and must be in [0, 1) (got {tolerance})")
    upper = target * (1 + tolerance)
    # Integer steps, rounded, so 1 + 3 * 0.05 is exactly 1.15 and the grid has no float drift.
    alphas = _values(step, upper)
    betas = _values(step, math.sqrt(upper))
    return [
        point
        for alpha in alphas
        for beta in betas
        for gamma in betas
        if within_constraint(point := Coefficients(alpha, beta, gamma), target, tolerance)
    ]


def _values(step: float, upper: float) -> list[float]:
    count = int(math.floor((upper - 1) / step + 1e-9))
    return [round(1 + i * step, 10) for i in range(count + 1)]


def spread_subset(
    points: list[Coefficients],
    count: int,
    first: Coefficients = PAPER_COEFFICIENTS,
    covered: tuple[Coefficients, ...] = (),
) -> list[Coefficients]:
    """`count` points spread as evenly as possible over the FLOPs-share triangle (greedy
    farthest-point sampling), starting from the point nearest `first` (the paper's coefficients
    by default). Points near `covered` (e.g. the pure depth/width/resolution corners that the
    single-dimension study trains anyway) are picked last. Deterministic; the order is the
    sampling order, so any prefix is spread too."""
    if count >= len(points):
        return sorted(points, key=lambda p: _distance(p.flops_shares, first.flops_shares))
    shares = [p.flops_shares for p in points]
    start = min(range(len(points)), key=lambda i: _distance(shares[i], first.flops_shares))
    chosen = [start]
    nearest = [min(_distance(s, c.flops_shares) for c in (points[start], *covered)) for s in shares]
    while len(chosen) < count:
        # The next point is the one farthest from everything chosen so far (ties: lowest index).
        index = max((i for i in range(len(points)) if i not in chosen), key=lambda i: (nearest[i], -i))
        chosen.append(index)
        nearest = [min(n, _distance(s, shares[index])) for n, s in zip(nearest, shares, strict=True)]
    return [points[i] for i in chosen]


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return math.dist(a, b)
