"""`search`: the paper's small grid search for alpha, beta, gamma, on a proxy, within a time budget.

One call plans the runs (baseline, candidates, single-dimension study), trains each through
`effnet.fit` with the same short recipe, saves each finished run atomically as one JSON file, and
writes the report. A rerun with the same output folder reads the saved plan and the finished runs
and continues with the rest, so a killed search loses at most the run in progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effnet.data import DataSplits, ImageSplit, load_data, stratified_split
from effnet.models.efficientnet import EfficientNet
from effnet.paths import cache_dir
from effnet.profiling import time_calls
from effnet.search.grid import PAPER_COEFFICIENTS, Coefficients, coefficient_grid, factor_within, spread_subset
from effnet.search.proxy import Proxy, architecture_key, measure
from effnet.training import engine
from effnet.training.checkpoint import write_json
from effnet.training.config import TrainConfig

log = logging.getLogger("effnet")

PLAN_FILE = "plan.json"
RESULTS_DIR = "results"
STUDY_DIMENSIONS = ("depth", "width", "resolution")
MIN_CANDIDATE_MINUTES = 1.0  # below this a CPU proxy learns too little to rank candidates
RUN_GUARD_FACTOR = 4.0  # fit's max_minutes = this x the run's estimate
RUN_OVERHEAD_S = 5.0  # rough allowance for fit's set-up and checkpoints; observed run times correct it
# Recipe fields a rerun must share with the saved plan: changing them would mix incomparable runs.
RECIPE_FIELDS = ("data", "proxy", "grid_step", "target", "tolerance", "seeds", "epochs", "val_images", "study_phis")
RECIPE_FIELDS += ("batch_size", "lr", "optimizer", "augment", "precision", "val_split")


@dataclass
class SearchSettings:
    """Everything `effnet search` needs; the CLI fills it from its arguments."""

    data: str
    budget_minutes: float
    output: Path = Path("search")
    proxy: Proxy = field(default_factory=Proxy)
    grid_step: float = 0.05
    target: float = 2.0
    tolerance: float = 0.1
    seeds: int = 1
    epochs: int = 1
    minutes_per_candidate: float | None = None  # None: the budget split evenly
    max_candidates: int | None = None
    train_images: int | None = None  # None: as many as fit each candidate's time share
    val_images: int = 2000
    study_phis: tuple[float, ...] = (1.0, 2.0)
    batch_size: int = 32
    lr: float | None = 3e-3
    optimizer: str = "adamw"
    augment: str = "light"
    precision: str = "fp32"  # bf16 autocast did not speed up CPU training here (docs/search.md)
    val_split: float = 0.1
    data_dir: str = field(default_factory=lambda: str(cache_dir("data")))  # downloads, extracted archives
    workers: int | str = "auto"
    threads: int | None = None  # None: every local core
    launcher: str | None = None  # e.g. "torchrun --nproc_per_node 4": each run in its own DDP job


@dataclass(frozen=True)
class RunSpec:
    """One network to train: `kind` is baseline, candidate, depth, width, resolution or compound."""

    kind: str
    coefficients: Coefficients
    phi: float

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.coefficients.label()}_phi{self.phi:g}"

    @classmethod
    def from_key(cls, key: str) -> RunSpec:
        kind, alpha, beta, gamma, phi = key.split("_")
        return cls(kind, Coefficients(float(alpha[1:]), float(beta[1:]), float(gamma[1:])), float(phi[3:]))


@dataclass
class SearchResult:
    output: Path
    rows: list[dict[str, Any]]  # one per planned run, finished or not (see report.table_rows)
    chosen: dict[str, Any] | None
    complete: bool
    coefficients_file: Path | None


# ------------------------------------------------------------------------------------------------
def search(settings: SearchSettings) -> SearchResult:
    """Plan (or reload the plan), train what is not finished yet within the budget, report."""
    from effnet.search import report  # the report draws with matplotlib: import it only when used

    started = time.perf_counter()
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    output = Path(settings.output)
    (output / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    splits = load_data(settings.data, settings.data_dir, settings.val_split, seed=0)
    proxy = dataclasses.replace(settings.proxy, num_classes=len(splits.class_names))
    settings = dataclasses.replace(settings, proxy=proxy)
    plan = _load_or_make_plan(settings, splits, output, started)
    finished = _finished_runs(output)
    if finished:
        log.info("resuming %s: %d run(s) already finished are skipped", output, len(finished))
    data = _search_splits(splits, plan["train_images"], settings.val_images)

    deadline = started + settings.budget_minutes * 60
    slowdown: list[float] = []  # actual / estimated time of the runs trained so far
    complete = True
    for spec in _pending(plan, finished, settings):
        for seed in range(settings.seeds):
            name = f"{spec.key}_s{seed}"
            if name in finished:
                continue
            twin = _same_network(plan, finished, spec, seed)
            if twin is not None:  # e.g. the depth-only point that is also a grid candidate
                finished[name] = _reuse(twin, spec, seed, output)
                continue
            # The plan's estimates, corrected by how much slower than them the runs so far were.
            correction = statistics.median(slowdown) if slowdown else 1.0
            estimate = _estimate_seconds(plan, plan["measured"][spec.key]["macs"]) * correction
            # Candidates come in spread-out order, so dropping the last ones keeps the rest spread;
            # the single-dimension study keeps its share of the budget.
            reserve = _study_seconds(plan, finished, settings) * correction if spec.kind == "candidate" else 0.0
            if time.perf_counter() + estimate + reserve > deadline:
                log.warning(
                    "budget of %g min: no time left for %s (about %.0f s)%s; rerun the same command with a larger "
                    "--budget-minutes to train it",
                    settings.budget_minutes,
                    name,
                    estimate,
                    " after keeping the single-dimension study's share" if reserve else "",
                )
                complete = False
                break
            tick = time.perf_counter()
            if settings.launcher:
                finished[name] = _launch(spec, seed, settings, output)
            else:
                finished[name] = train_run(spec, seed, plan, data, output, settings.workers)
            slowdown.append((time.perf_counter() - tick) / _estimate_seconds(plan, plan["measured"][spec.key]["macs"]))
    rows = report.table_rows(plan, finished, settings.seeds)
    chosen = report.choose(rows)
    coefficients_file = report.write_all(output, plan, rows, chosen, complete and _all_done(plan, finished, settings))
    return SearchResult(output, rows, chosen, complete, coefficients_file)


# ------------------------------------------------------------------------------------------------
def _load_or_make_plan(settings: SearchSettings, splits: DataSplits, output: Path, started: float) -> dict[str, Any]:
    recipe = _recipe(settings)
    plan_file = output / PLAN_FILE
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        changed = {k: (plan["recipe"].get(k), v) for k, v in recipe.items() if plan["recipe"].get(k) != v}
        if changed:
            details = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{output} holds a search with other settings ({details}). Rerun with the same arguments "
                "to continue it, or choose another --output."
            )
        log.info("continuing the search planned in %s", plan_file)
        return plan
    plan = make_plan(settings, splits, started)
    write_json(plan_file, plan)
    return plan


def _recipe(settings: SearchSettings) -> dict[str, Any]:
    values = {name: getattr(settings, name) for name in RECIPE_FIELDS}
    values["proxy"] = dataclasses.asdict(settings.proxy)
    values["study_phis"] = list(settings.study_phis)
    return json.loads(json.dumps(values))


def make_plan(settings: SearchSettings, splits: DataSplits, started: float) -> dict[str, Any]:
    """Which runs to train, each network's measured cost, and how many images each run sees.

    The grid is reduced to distinct networks (rounding maps many coefficients to one), then, if
    the budget cannot train them all, to a subset spread over the ways of splitting the FLOPs
    (`spread_subset`), preferring networks whose *measured* FLOPs ratio is also within tolerance.
    """
    proxy = settings.proxy
    grid = coefficient_grid(settings.grid_step, settings.target, settings.tolerance)
    baseline = RunSpec("baseline", Coefficients(1.0, 1.0, 1.0), 0.0)
    measured = {baseline.key: _measure(proxy, baseline)}
    base_macs = measured[baseline.key]["macs"]

    distinct: dict[tuple, Coefficients] = {}
    for point in sorted(grid, key=lambda p: abs(p.flops_factor - settings.target)):
        distinct.setdefault(architecture_key(proxy.config(point)), point)
    networks = list(distinct.values())
    for point in networks:
        measured[RunSpec("candidate", point, 1.0).key] = _measure(proxy, RunSpec("candidate", point, 1.0))

    def measured_factor(point: Coefficients) -> float:
        return measured[RunSpec("candidate", point, 1.0).key]["macs"] / base_macs

    matched = [p for p in networks if factor_within(measured_factor(p), settings.target, settings.tolerance)]

    study = _study_specs(settings)
    for spec in study:
        measured[spec.key] = _measure(proxy, spec)

    # Cost unit: one candidate, i.e. the proxy scaled by the paper's coefficients (what is timed).
    reference_spec = RunSpec("candidate", PAPER_COEFFICIENTS, 1.0)
    reference = measured.setdefault(reference_spec.key, _measure(proxy, reference_spec))["macs"]
    ips = _calibrate(proxy, settings.batch_size)
    setup = time.perf_counter() - started
    available = settings.budget_minutes * 60 - setup - 10 * settings.seeds
    compound_macs = [base_macs * settings.target**phi for phi in settings.study_phis if phi != 1.0]
    fixed_units = (base_macs + sum(measured[s.key]["macs"] for s in study) + sum(compound_macs)) / reference
    per_candidate = settings.minutes_per_candidate
    if per_candidate is None:
        per_candidate = max(MIN_CANDIDATE_MINUTES, available / 60 / settings.seeds / (len(networks) + fixed_units))
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
    chosen = _select_candidates(proxy, grid, networks, matched, count, settings.target)
    train_images = settings.train_images or _images_for(per_candidate, ips, settings)
    train_images = min(train_images, len(splits.train))
    note = (
        f"{len(grid)} grid points within {settings.tolerance:.0%} of {settings.target:g} map to {len(networks)} "
        f"distinct proxy networks ({len(matched)} with measured FLOPs also within tolerance); training "
        f"{len(chosen)} of them"
        + (
            f", spread over the depth/width/resolution split of the FLOPs (farthest-point sampling from the "
            f"paper's coefficients), as the budget allows {per_candidate:.2f} min per candidate"
            if len(chosen) < len(networks)
            else ""
        )
    )
    log.info("%s; each run sees %d training images x %d epoch(s)", note, train_images, settings.epochs)
    return {
        "recipe": _recipe(settings),
        "grid_size": len(grid),
        "distinct_networks": len(networks),
        "matched_networks": len(matched),
        "grid": [dataclasses.asdict(p) for p in grid],
        "candidates": [dataclasses.asdict(p) for p in chosen],
        "study": [_spec_to_dict(s) for s in study],
        "measured": measured,
        "baseline_key": baseline.key,
        "train_images": train_images,
        "calibration_images_per_s": ips,
        "reference_macs": reference,
        "minutes_per_candidate": per_candidate,
        "note": note,
        "class_names": splits.class_names,
        "source": splits.source,
    }


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


def _study_specs(settings: SearchSettings) -> list[RunSpec]:
    """Scaling one dimension only, at the same FLOPs factors as compound scaling (target ** phi)."""
    specs = []
    for kind, corner in zip(STUDY_DIMENSIONS, _corners(settings.target), strict=True):
        specs += [RunSpec(kind, corner, phi) for phi in settings.study_phis]
    return specs


def _corners(target: float) -> tuple[Coefficients, ...]:
    """All of the FLOPs factor in depth, in width or in resolution."""
    root = math.sqrt(target)
    return Coefficients(target, 1.0, 1.0), Coefficients(1.0, root, 1.0), Coefficients(1.0, 1.0, root)


def _measure(proxy: Proxy, spec: RunSpec) -> dict[str, Any]:
    config = proxy.config(spec.coefficients, spec.phi)
    counted = measure(config)
    return {
        "macs": counted.macs,
        "params": counted.params,
        "resolution": counted.resolution,
        "stages": [[s.channels, s.repeats] for s in config.stages],
        "architecture": repr(architecture_key(config)),
    }


def _calibrate(proxy: Proxy, batch_size: int) -> float:
    """Training images per second of the proxy scaled by the paper's coefficients, on random
    data: fixes how many images a candidate can see in its share of the budget."""
    model = EfficientNet(proxy.config(PAPER_COEFFICIENTS, 1.0)).to(memory_format=torch.channels_last)
    size = model.config.preprocess.input_size
    images = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, proxy.num_classes, (batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return time_calls(step, batch_size, warmup=1, repeats=2).images_per_second


def _images_for(minutes: float, ips: float, settings: SearchSettings) -> int:
    """Training images per epoch so that a candidate (epochs of training, one validation pass
    costing about a third per image) fills `minutes`."""
    seconds = max(minutes * 60 - RUN_OVERHEAD_S, 1.0)
    images = int((seconds * ips - settings.val_images / 3) / settings.epochs)
    return max(images, 2 * settings.batch_size)  # class-balanced subsets may round a few images away


def _estimate_seconds(plan: dict[str, Any], macs: int) -> float:
    images = plan["train_images"] * plan["recipe"]["epochs"] + plan["recipe"]["val_images"] / 3
    return RUN_OVERHEAD_S + images / plan["calibration_images_per_s"] * macs / plan["reference_macs"]


# ------------------------------------------------------------------------------------------------
def _pending(plan: dict[str, Any], finished: dict[str, dict], settings: SearchSettings) -> Iterator[RunSpec]:
    """The runs in training order: baseline, candidates, one-dimension study, then compound
    scaling with the chosen coefficients (known only once every candidate is done)."""
    from effnet.search import report

    yield RunSpec("baseline", Coefficients(1.0, 1.0, 1.0), 0.0)
    for point in plan["candidates"]:
        yield RunSpec("candidate", Coefficients(**point), 1.0)
    for spec in plan["study"]:
        yield _spec_from_dict(spec)
    chosen = report.choose(report.table_rows(plan, finished, settings.seeds))
    if chosen is None:
        return
    best = Coefficients(chosen["alpha"], chosen["beta"], chosen["gamma"])
    for phi in settings.study_phis:
        spec = RunSpec("compound", best, phi)
        if phi == 1.0:
            continue  # the chosen candidate itself
        if spec.key not in plan["measured"]:
            plan["measured"][spec.key] = _measure(Proxy(**plan["recipe"]["proxy"]), spec)
            write_json(Path(settings.output) / PLAN_FILE, plan)
        yield spec


def _study_seconds(plan: dict[str, Any], finished: dict[str, dict], settings: SearchSettings) -> float:
    """Estimated time of the study runs not finished yet, compound scaling included."""
    base_macs = plan["measured"][plan["baseline_key"]]["macs"]
    total = 0.0
    for seed in range(settings.seeds):
        for study in map(_spec_from_dict, plan["study"]):
            if f"{study.key}_s{seed}" not in finished:
                total += _estimate_seconds(plan, plan["measured"][study.key]["macs"])
        for phi in settings.study_phis:
            suffix = f"_phi{phi:g}_s{seed}"
            if phi != 1.0 and not any(k.startswith("compound_") and k.endswith(suffix) for k in finished):
                total += _estimate_seconds(plan, base_macs * settings.target**phi)
    return total


def _all_done(plan: dict[str, Any], finished: dict[str, dict], settings: SearchSettings) -> bool:
    from effnet.search.report import planned_specs

    return all(f"{spec.key}_s{seed}" in finished for spec in planned_specs(plan) for seed in range(settings.seeds))


def _spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "phi": spec.phi, **dataclasses.asdict(spec.coefficients)}


def search_splits_from_plan(plan: dict[str, Any], data_dir: str) -> DataSplits:
    """The data every run of this plan trains and is scored on, loaded again (another process)."""
    recipe = plan["recipe"]
    splits = load_data(recipe["data"], data_dir, recipe["val_split"], seed=0)
    return _search_splits(splits, plan["train_images"], recipe["val_images"])


def _spec_from_dict(data: dict[str, Any]) -> RunSpec:
    return RunSpec(data["kind"], Coefficients(data["alpha"], data["beta"], data["gamma"]), data["phi"])


def _same_network(plan: dict[str, Any], finished: dict[str, dict], spec: RunSpec, seed: int) -> dict | None:
    """A finished run, with the same seed, of the very network `spec` builds (rounding makes
    different coefficients meet), whose result can stand for this run."""
    architecture = plan["measured"][spec.key]["architecture"]
    for row in finished.values():
        key = row["run"].rsplit("_s", 1)[0]
        if row["seed"] == seed and plan["measured"][key]["architecture"] == architecture and "same_as" not in row:
            return row
    return None


def _reuse(twin: dict[str, Any], spec: RunSpec, seed: int, output: Path) -> dict[str, Any]:
    name = f"{spec.key}_s{seed}"
    row = twin | {"run": name, "kind": spec.kind, "phi": spec.phi, "same_as": twin["run"]}
    row |= dataclasses.asdict(spec.coefficients)
    write_json(output / RESULTS_DIR / f"{name}.json", row)
    log.info("%s builds the same network as %s: its result is reused", name, twin["run"])
    return row


def _finished_runs(output: Path) -> dict[str, dict[str, Any]]:
    folder = output / RESULTS_DIR
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def _search_splits(splits: DataSplits, train_images: int, val_images: int) -> DataSplits:
    """The same fixed, class-balanced subsets for every run; no test split: candidates are scored
    on validation, and the test set stays untouched by the search."""
    if splits.val is None:
        raise ValueError(f"{splits.source} has no validation split; use --val-split > 0")
    return dataclasses.replace(
        splits,
        train=_balanced_subset(splits.train, train_images),
        val=_balanced_subset(splits.val, val_images),
        test=None,
    )


def _balanced_subset(split: ImageSplit, count: int) -> ImageSplit:
    if count >= len(split):
        return split
    _, chosen = stratified_split(split.targets, [count / len(split)], seed=0)
    return split.subset(chosen)


# ------------------------------------------------------------------------------------------------
def _launch(spec: RunSpec, seed: int, settings: SearchSettings, output: Path) -> dict[str, Any]:
    """Train one run in a child process started by `settings.launcher` (e.g. 'torchrun
    --nproc_per_node 4'), where `fit` spreads it over the devices with DDP."""
    name = f"{spec.key}_s{seed}"
    command = [*shlex.split(settings.launcher), "-m", "effnet.search.worker", str(output), spec.key, str(seed)]
    command += ["--data-dir", settings.data_dir, "--workers", str(settings.workers)]
    log.info("training %s: %s", name, " ".join(command))
    status = subprocess.run(command, check=False).returncode
    result = output / RESULTS_DIR / f"{name}.json"
    if status != 0 or not result.is_file():
        raise RuntimeError(f"training {name} with {settings.launcher!r} failed (exit status {status}); see above")
    return json.loads(result.read_text())


def train_run(
    spec: RunSpec,
    seed: int,
    plan: dict[str, Any],
    data: DataSplits,
    output: Path,
    workers: int | str = "auto",
) -> dict[str, Any]:
    """Train one network through `effnet.fit` with the plan's recipe and save its result as
    results/<run>.json (on the main process only, under torchrun)."""
    name = f"{spec.key}_s{seed}"
    run_dir = output / "runs" / name
    recipe = plan["recipe"]
    estimate = _estimate_seconds(plan, plan["measured"][spec.key]["macs"])
    config = TrainConfig(
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        optimizer=recipe["optimizer"],
        augment=recipe["augment"],
        precision=recipe["precision"],
        seed=seed,
        workers=workers,
        # Every run sees the same images; the clock only guards against a run gone astray (a slow,
        # shared machine is handled by dropping candidates, not by cutting runs short).
        max_minutes=max(RUN_GUARD_FACTOR * estimate / 60, 0.5),
        warmup_steps=min(50, max(1, plan["train_images"] // recipe["batch_size"] // 5)),
        progress=False,
        output=str(run_dir),
        # report.html evaluates the test split: minutes per run that a search cannot afford (it
        # scores on validation and writes its own report).
        report=False,
    )
    log.info("training %s (~%.0f s)", name, estimate)
    if (run_dir / "state.pt").is_file():  # killed after an epoch: fit continues it exactly
        fitted = engine.fit(None, data, resume=run_dir)
    else:
        torch.manual_seed(seed)  # the initial weights too are a function of the seed
        model = EfficientNet(Proxy(**plan["recipe"]["proxy"]).config(spec.coefficients, spec.phi))
        model.model_name = spec.key
        fitted = engine.fit(model, data, config)
    results = fitted.results
    row = {
        "run": name,
        "kind": spec.kind,
        "phi": spec.phi,
        **dataclasses.asdict(spec.coefficients),
        "seed": seed,
        "val_acc": results["best_val_acc"],
        "train_images_seen": sum(r["images_per_s"] * r["epoch_time_s"] for r in fitted.history),
        "train_time_s": results["wall_time_s"],
        "stop_reason": results["stop_reason"],
        "processes": results["world_size"],
        "run_dir": str(run_dir),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(output / RESULTS_DIR / f"{name}.json", row)
    log.info("%s: validation accuracy %.2f%% in %.0f s", name, 100 * row["val_acc"], row["train_time_s"])
    return row
