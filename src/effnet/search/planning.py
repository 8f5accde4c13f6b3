"""Making a search's plan: the grid reduced to distinct proxy networks, each network's cost measured,
the training speed calibrated, and the budget split into how many candidates and how many images
each run sees."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from effnet.data import DataSplits
from effnet.models.efficientnet import EfficientNet
from effnet.profiling import time_calls
from effnet.search.grid import PAPER_COEFFICIENTS, Coefficients, coefficient_grid, factor_within, spread_subset
from effnet.search.plan import BASELINE, RUN_OVERHEAD_S, NetworkCost, Recipe, RunSpec, SearchPlan, SearchSettings
from effnet.search.proxy import Proxy, architecture_key, measure
from effnet.training.step import Step, fixed_batch_step

log = logging.getLogger("effnet")

STUDY_DIMENSIONS = ("depth", "width", "resolution")
MIN_CANDIDATE_MINUTES = 1.0  # below this a CPU proxy learns too little to rank candidates
# Cost unit: one candidate, i.e. the proxy scaled by the paper's coefficients (what is timed).
REFERENCE = RunSpec("candidate", PAPER_COEFFICIENTS, 1.0)


def make_plan(settings: SearchSettings, splits: DataSplits, started: float) -> SearchPlan:
    """Which runs to train, each network's measured cost, and how many images each run sees.

    The grid is reduced to distinct networks (rounding maps many coefficients to one), then, if
    the budget cannot train them all, to a subset spread over the ways of splitting the FLOPs
    (`spread_subset`), preferring networks whose *measured* FLOPs ratio is also within tolerance.
    """
    proxy = settings.proxy
    grid = coefficient_grid(settings.grid_step, settings.target, settings.tolerance)
    networks = _distinct_networks(proxy, grid, settings.target)
    study = study_specs(settings)
    measured = measure_specs(proxy, [BASELINE, *(_candidate(p) for p in networks), *study, REFERENCE])
    base_macs = measured[BASELINE.key].macs
    matched = [
        p
        for p in networks
        if factor_within(measured[_candidate(p).key].macs / base_macs, settings.target, settings.tolerance)
    ]
    ips = _calibrate(proxy, settings.batch_size)
    per_candidate, count = _candidate_budget(settings, measured, study, len(networks), time.perf_counter() - started)
    chosen = _select_candidates(proxy, grid, networks, matched, count, settings.target)
    train_images = min(settings.train_images or _images_for(per_candidate, ips, settings), len(splits.train))
    note = _selection_note(settings, len(grid), len(networks), len(matched), len(chosen), per_candidate)
    log.info("%s; each run sees %d training images x %d epoch(s)", note, train_images, settings.epochs)
    return SearchPlan(
        recipe=Recipe.of(settings),
        grid_size=len(grid),
        distinct_networks=len(networks),
        matched_networks=len(matched),
        grid=grid,
        candidates=chosen,
        study=study,
        measured=measured,
        baseline_key=BASELINE.key,
        train_images=train_images,
        calibration_images_per_s=ips,
        reference_macs=measured[REFERENCE.key].macs,
        minutes_per_candidate=per_candidate,
        note=note,
        class_names=splits.class_names,
        source=splits.source,
    )


def _candidate(point: Coefficients) -> RunSpec:
    return RunSpec("candidate", point, 1.0)


def _distinct_networks(proxy: Proxy, grid: list[Coefficients], target: float) -> list[Coefficients]:
    """One grid point per distinct proxy network: the one whose ideal FLOPs factor is nearest `target`."""
    distinct: dict[tuple, Coefficients] = {}
    for point in sorted(grid, key=lambda p: abs(p.flops_factor - target)):
        distinct.setdefault(architecture_key(proxy.config(point)), point)
    return list(distinct.values())


def _candidate_budget(
    settings: SearchSettings, measured: dict[str, NetworkCost], study: list[RunSpec], networks: int, setup: float
) -> tuple[float, int]:
    """Minutes per candidate and how many candidates the budget trains, after the baseline, the
    single-dimension study and the compound runs (counted in units of one candidate's cost)."""
    base_macs = measured[BASELINE.key].macs
    available = settings.budget_minutes * 60 - setup - 10 * settings.seeds
    compound_macs = [base_macs * settings.target**phi for phi in settings.study_phis if phi != 1.0]
    fixed = base_macs + sum(measured[s.key].macs for s in study) + sum(compound_macs)
    fixed_units = fixed / measured[REFERENCE.key].macs
    per_candidate = settings.minutes_per_candidate
    if per_candidate is None:
        per_candidate = max(MIN_CANDIDATE_MINUTES, available / 60 / settings.seeds / (networks + fixed_units))
    count = int(available / 60 / settings.seeds / per_candidate - fixed_units)
    if settings.max_candidates:
        count = min(count, settings.max_candidates)
    if count < 1:
        need = (fixed_units + 1) * per_candidate * settings.seeds + setup / 60
        raise ValueError(
            f"a budget of {settings.budget_minutes:g} min cannot train the baseline, the single-dimension study and "
            f"one candidate at {per_candidate:.2f} min each (about {need:.1f} min needed). Raise --budget-minutes, "
            "lower --minutes-per-candidate, or drop the study with --study-phis ''."
        )
    return per_candidate, count


def _selection_note(
    settings: SearchSettings, grid: int, networks: int, matched: int, chosen: int, per_candidate: float
) -> str:
    note = (
        f"{grid} grid points within {settings.tolerance:.0%} of {settings.target:g} map to {networks} "
        f"distinct proxy networks ({matched} with measured FLOPs also within tolerance); training {chosen} of them"
    )
    if chosen < networks:
        note += (
            f", spread over the depth/width/resolution split of the FLOPs (farthest-point sampling from the "
            f"paper's coefficients), as the budget allows {per_candidate:.2f} min per candidate"
        )
    return note


def _select_candidates(
    proxy: Proxy,
    grid: list[Coefficients],
    networks: list[Coefficients],
    matched: list[Coefficients],
    count: int,
    target: float,
) -> list[Coefficients]:
    """The paper's coefficients first (the reference to beat), then networks whose measured FLOPs
    factor is within tolerance, then the others, each spread over the FLOPs split; the three pure
    corners are left to the single-dimension study."""
    paper = architecture_key(proxy.config(PAPER_COEFFICIENTS))
    first = [PAPER_COEFFICIENTS] if PAPER_COEFFICIENTS in grid else []
    others = [p for p in networks if architecture_key(proxy.config(p)) != paper]
    chosen = first + spread_subset([p for p in matched if p in others], count - len(first), covered=_corners(target))
    if len(chosen) < count:
        rest = [p for p in others if p not in chosen]
        chosen += spread_subset(rest, count - len(chosen), covered=_corners(target) + tuple(chosen))
    return chosen


def study_specs(settings: SearchSettings) -> list[RunSpec]:
    """Scaling one dimension only, at the same FLOPs factors as compound scaling (target ** phi)."""
    specs = []
    for kind, corner in zip(STUDY_DIMENSIONS, _corners(settings.target), strict=True):
        specs += [RunSpec(kind, corner, phi) for phi in settings.study_phis]
    return specs


def compound_specs(best: Coefficients, study_phis: tuple[float, ...]) -> list[RunSpec]:
    """Compound scaling with the chosen coefficients at the study's phis (phi=1 is the candidate itself)."""
    return [RunSpec("compound", best, phi) for phi in study_phis if phi != 1.0]


def _corners(target: float) -> tuple[Coefficients, ...]:
    """All of the FLOPs factor in depth, in width or in resolution."""
    root = math.sqrt(target)
    return Coefficients(target, 1.0, 1.0), Coefficients(1.0, root, 1.0), Coefficients(1.0, 1.0, root)


def measure_specs(proxy: Proxy, specs: list[RunSpec]) -> dict[str, NetworkCost]:
    """The cost of the network each spec builds, by spec key (each key measured once)."""
    measured: dict[str, NetworkCost] = {}
    for spec in specs:
        if spec.key not in measured:
            config = proxy.config(spec.coefficients, spec.phi)
            counted = measure(config)
            stages = tuple((s.channels, s.repeats) for s in config.stages)
            measured[spec.key] = NetworkCost(
                counted.macs, counted.params, counted.resolution, stages, repr(architecture_key(config))
            )
    return measured


def _calibrate(proxy: Proxy, batch_size: int) -> float:
    """Training images per second of the proxy scaled by the paper's coefficients, on random
    data: fixes how many images a candidate can see in its share of the budget."""
    model = EfficientNet(proxy.config(PAPER_COEFFICIENTS, 1.0)).to(memory_format=torch.channels_last)
    step = _calibration_step(model, batch_size, proxy.num_classes)
    return time_calls(step, batch_size, warmup=1, repeats=2).images_per_second


def _calibration_step(model: EfficientNet, batch_size: int, num_classes: int) -> Callable[[], object]:
    """One SGD training step on a random batch (the package's one `train_step`), the cost a candidate pays per batch."""
    step = Step(model.train(), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    return fixed_batch_step(step, batch_size, model.config.preprocess.input_size, num_classes)


def _images_for(minutes: float, ips: float, settings: SearchSettings) -> int:
    """Training images per epoch so that a candidate (epochs of training, one validation pass
    costing about a third per image) fills `minutes`."""
    seconds = max(minutes * 60 - RUN_OVERHEAD_S, 1.0)
    images = int((seconds * ips - settings.val_images / 3) / settings.epochs)
    return max(images, 2 * settings.batch_size)  # class-balanced subsets may round a few images away
