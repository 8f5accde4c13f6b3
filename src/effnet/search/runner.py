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
import os
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effnet.data import DataSplits, ImageSplit, load_data, stratified_split
from effnet.models.efficientnet import EfficientNet
from effnet.search import report
from effnet.search.grid import Coefficients
from effnet.search.plan import PLAN_FILE, RESULTS_DIR, Recipe, RunSpec, SearchPlan, SearchSettings, run_name, spec_key
from effnet.search.planning import compound_specs, make_plan, measure_specs
from effnet.training import engine
from effnet.training.checkpoint import write_json
from effnet.training.config import TrainConfig

__all__ = ["RunSpec", "SearchResult", "SearchSettings", "search", "search_splits_from_plan", "train_run"]

log = logging.getLogger("effnet")

RUN_GUARD_FACTOR = 4.0  # fit's max_minutes = this x the run's estimate


@dataclass
class SearchResult:
    output: Path
    rows: list[dict[str, Any]]  # one per planned run, finished or not (see report.table_rows)
    chosen: dict[str, Any] | None
    complete: bool
    coefficients_file: Path | None


@dataclass
class _Session:
    """What the training of a search's runs shares: the plan, the runs finished so far (by run
    name), and the clock: how much slower than the plan's estimates the runs so far were."""

    settings: SearchSettings
    plan: SearchPlan
    data: DataSplits
    output: Path
    finished: dict[str, dict[str, Any]]
    deadline: float
    slowdown: list[float] = field(default_factory=list)  # actual / estimated time of each run trained


# ------------------------------------------------------------------------------------------------
def search(settings: SearchSettings) -> SearchResult:
    """Plan (or reload the plan), train what is not finished yet within the budget, report."""
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
    data = _search_splits(splits, plan.train_images, settings.val_images)
    session = _Session(settings, plan, data, output, finished, deadline=started + settings.budget_minutes * 60)
    complete = _train_all(session, [spec for spec in plan.runs() if spec.kind != "compound"])
    # Compound scaling uses the chosen coefficients, known once candidates are done.
    best = _best_coefficients(session.plan, finished, settings.seeds)
    if best is not None:
        session.plan = _plan_compound_runs(session.plan, best, output)
        complete = _train_all(session, _compound_runs(session.plan, best)) and complete
    rows = report.table_rows(session.plan, finished, settings.seeds)
    chosen = report.choose(rows)
    done = complete and _all_done(session.plan, finished, settings.seeds, best)
    coefficients_file = report.write_all(output, session.plan, rows, chosen, done)
    return SearchResult(output, rows, chosen, complete, coefficients_file)


def _train_all(session: _Session, specs: list[RunSpec]) -> bool:
    """Train every seed of `specs` not finished yet, in order, skipping a run the budget cannot
    fit (a later, cheaper run may still fit). True if none was skipped."""
    complete = True
    for spec in specs:
        for seed in range(session.settings.seeds):
            name = run_name(spec, seed)
            if name in session.finished:
                continue
            twin = _same_network(session.plan, session.finished, spec, seed)
            if twin is not None:  # e.g. the depth-only point that is also a grid candidate
                session.finished[name] = _reuse(twin, spec, seed, session.output)
            elif _fits_budget(session, spec, name):
                session.finished[name] = _timed_run(session, spec, seed)
            else:
                complete = False
                break  # this spec's other seeds would not fit either
    return complete


def _fits_budget(session: _Session, spec: RunSpec, name: str) -> bool:
    """Whether `spec` can still be trained before the deadline; logs why not otherwise."""
    # The plan's estimates, corrected by how much slower than them the runs so far were.
    correction = statistics.median(session.slowdown) if session.slowdown else 1.0
    estimate = session.plan.estimate_seconds(session.plan.cost(spec).macs) * correction
    # Candidates come in spread-out order, so dropping the last ones keeps the rest spread;
    # the single-dimension study keeps its share of the budget.
    reserve = 0.0
    if spec.kind == "candidate":
        reserve = _study_seconds(session.plan, session.finished, session.settings) * correction
    if time.perf_counter() + estimate + reserve <= session.deadline:
        return True
    log.warning(
        "budget of %g min: no time left for %s (about %.0f s)%s; rerun the same command with a larger "
        "--budget-minutes to train it",
        session.settings.budget_minutes,
        name,
        estimate,
        " after keeping the single-dimension study's share" if reserve else "",
    )
    return False


def _timed_run(session: _Session, spec: RunSpec, seed: int) -> dict[str, Any]:
    """Train one run (here or through the launcher) and record how long it took against its estimate."""
    tick = time.perf_counter()
    if session.settings.launcher:
        row = _launch(spec, seed, session.settings, session.output)
    else:
        row = train_run(spec, seed, session.plan, session.data, session.output, session.settings.workers)
    session.slowdown.append((time.perf_counter() - tick) / session.plan.estimate_seconds(session.plan.cost(spec).macs))
    return row


# ------------------------------------------------------------------------------------------------
def _load_or_make_plan(settings: SearchSettings, splits: DataSplits, output: Path, started: float) -> SearchPlan:
    if not (output / PLAN_FILE).is_file():
        plan = make_plan(settings, splits, started)
        plan.write(output)
        return plan
    plan = SearchPlan.read(output)
    if changed := plan.recipe.differences(Recipe.of(settings)):
        details = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{output} holds a search with other settings ({details}). Rerun with the same arguments "
            "to continue it, or choose another --output."
        )
    log.info("continuing the search planned in %s", output / PLAN_FILE)
    return plan


def _best_coefficients(plan: SearchPlan, finished: dict[str, dict], seeds: int) -> Coefficients | None:
    """The coefficients of the best candidate finished so far (None before any is)."""
    chosen = report.choose(report.table_rows(plan, finished, seeds))
    return None if chosen is None else Coefficients(chosen["alpha"], chosen["beta"], chosen["gamma"])


def _plan_compound_runs(plan: SearchPlan, best: Coefficients, output: Path) -> SearchPlan:
    """The plan with the compound runs of `best` measured; plan.json rewritten if any is new."""
    new = [spec for spec in compound_specs(best, plan.recipe.study_phis) if spec.key not in plan.measured]
    if not new:
        return plan
    plan = plan.with_costs(measure_specs(plan.recipe.proxy, new))
    plan.write(output)
    return plan


def _compound_runs(plan: SearchPlan, best: Coefficients) -> list[RunSpec]:
    """The planned compound runs that scale `best` (not those of an earlier choice)."""
    return [spec for spec in plan.runs() if spec.kind == "compound" and spec.coefficients == best]


def _study_seconds(plan: SearchPlan, finished: dict[str, dict], settings: SearchSettings) -> float:
    """Estimated time of the study runs not finished yet, compound scaling included."""
    total = 0.0
    for seed in range(settings.seeds):
        for study in plan.study:
            if run_name(study, seed) not in finished:
                total += plan.estimate_seconds(plan.cost(study).macs)
        for phi in settings.study_phis:
            suffix = f"_phi{phi:g}_s{seed}"
            if phi != 1.0 and not any(k.startswith("compound_") and k.endswith(suffix) for k in finished):
                total += plan.estimate_seconds(plan.baseline_macs * settings.target**phi)
    return total


def _all_done(plan: SearchPlan, finished: dict[str, dict], seeds: int, best: Coefficients | None) -> bool:
    """Every seed of every run trained: the fixed ones and the compound runs of the chosen coefficients."""
    specs = [s for s in plan.runs() if s.kind != "compound"] + ([] if best is None else _compound_runs(plan, best))
    return all(run_name(spec, seed) in finished for spec in specs for seed in range(seeds))


def search_splits_from_plan(plan: SearchPlan, data_dir: str) -> DataSplits:
    """The data every run of this plan trains and is scored on, loaded again (another process)."""
    recipe = plan.recipe
    splits = load_data(recipe.data, data_dir, recipe.val_split, seed=0)
    return _search_splits(splits, plan.train_images, recipe.val_images)


def _same_network(plan: SearchPlan, finished: dict[str, dict], spec: RunSpec, seed: int) -> dict | None:
    """A finished run, with the same seed, of the very network `spec` builds (rounding makes
    different coefficients meet), whose result can stand for this run."""
    architecture = plan.cost(spec).architecture
    for row in finished.values():
        same = plan.measured[spec_key(row["run"])].architecture == architecture
        if row["seed"] == seed and same and "same_as" not in row:
            return row
    return None


def _reuse(twin: dict[str, Any], spec: RunSpec, seed: int, output: Path) -> dict[str, Any]:
    name = run_name(spec, seed)
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
    name = run_name(spec, seed)
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
    plan: SearchPlan,
    data: DataSplits,
    output: Path,
    workers: int | str = "auto",
) -> dict[str, Any]:
    """Train one network through `effnet.fit` with the plan's recipe and save its result as
    results/<run>.json (on the main process only, under torchrun)."""
    name = run_name(spec, seed)
    run_dir = output / "runs" / name
    estimate = plan.estimate_seconds(plan.cost(spec).macs)
    log.info("training %s (~%.0f s)", name, estimate)
    if (run_dir / "state.pt").is_file():  # killed after an epoch: fit continues it exactly
        fitted = engine.fit(None, data, resume=run_dir)
    else:
        torch.manual_seed(seed)  # the initial weights too are a function of the seed
        # The run's key is the model's name: what its checkpoints and run folder are known by.
        config = dataclasses.replace(plan.recipe.proxy.config(spec.coefficients, spec.phi), name=spec.key)
        fitted = engine.fit(EfficientNet(config), data, _train_config(plan, seed, workers, estimate, run_dir))
    row = _result_row(spec, seed, fitted, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(output / RESULTS_DIR / f"{name}.json", row)
    log.info("%s: validation accuracy %.2f%% in %.0f s", name, 100 * row["val_acc"], row["train_time_s"])
    return row


def _train_config(plan: SearchPlan, seed: int, workers: int | str, estimate: float, run_dir: Path) -> TrainConfig:
    """The short recipe every run of the search shares."""
    recipe = plan.recipe
    return TrainConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        augment=recipe.augment,
        precision=recipe.precision,
        seed=seed,
        workers=workers,
        # Every run sees the same images; the clock only guards against a run gone astray (a slow,
        # shared machine is handled by dropping candidates, not by cutting runs short).
        max_minutes=max(RUN_GUARD_FACTOR * estimate / 60, 0.5),
        warmup_steps=min(50, max(1, plan.train_images // recipe.batch_size // 5)),
        progress=False,
        output=str(run_dir),
        # report.html evaluates the test split: minutes per run that a search cannot afford (it
        # scores on validation and writes its own report).
        report=False,
    )


def _result_row(spec: RunSpec, seed: int, fitted: engine.FitResult, run_dir: Path) -> dict[str, Any]:
    """What results/<run>.json holds: the run, its validation accuracy and what it cost."""
    results = fitted.results
    return {
        "run": run_name(spec, seed),
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
