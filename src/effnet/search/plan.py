"""A search's plan as a typed value: which runs to train, what each network costs, and the recipe
every run shares; read from and written to the search folder's plan.json.

The runner (which trains) and the report (which tabulates) both read the plan, so what they share
lives here: the run list (`SearchPlan.runs`), the run names (`run_name`), the time estimate. The
file keeps the layout earlier versions wrote, so a search started before this module resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effnet.paths import cache_dir, runs_dir
from effnet.search.grid import Coefficients
from effnet.search.proxy import Proxy
from effnet.training.checkpoint import write_json

PLAN_FILE = "plan.json"
RESULTS_DIR = "results"
RUN_KINDS = ("baseline", "candidate", "depth", "width", "resolution", "compound")
RUN_OVERHEAD_S = 5.0  # rough allowance for fit's set-up and checkpoints; observed run times correct it


@dataclass
class SearchSettings:
    """Everything `effnet search` needs; the CLI fills it from its arguments."""

    data: str
    budget_minutes: float
    output: Path = field(default_factory=lambda: runs_dir("search"))  # never the current folder unasked
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
    """One network to train: `kind` is one of RUN_KINDS; `phi` scales the proxy with `coefficients`."""

    kind: str
    coefficients: Coefficients
    phi: float

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.coefficients.label()}_phi{self.phi:g}"

    @classmethod
    def from_key(cls, key: str) -> RunSpec:
        """The spec a key names (e.g. 'candidate_a1.20_b1.10_g1.15_phi1')."""
        try:
            kind, alpha, beta, gamma, phi = key.split("_")
            spec = cls(kind, Coefficients(float(alpha[1:]), float(beta[1:]), float(gamma[1:])), float(phi[3:]))
        except ValueError:
            spec = None
        if spec is None or spec.kind not in RUN_KINDS or spec.key != key:
            raise ValueError(f"{key!r} is not a run key; keys look like candidate_a1.20_b1.10_g1.15_phi1")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "phi": self.phi, **dataclasses.asdict(self.coefficients)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(data["kind"], Coefficients(data["alpha"], data["beta"], data["gamma"]), data["phi"])


BASELINE = RunSpec("baseline", Coefficients(1.0, 1.0, 1.0), 0.0)


def run_name(spec: RunSpec, seed: int) -> str:
    """The name of one seed's run of `spec`: its results/<name>.json and runs/<name>/ folder."""
    return f"{spec.key}_s{seed}"


def spec_key(name: str) -> str:
    """The spec key of a run name (what `run_name` added, removed)."""
    return name.rsplit("_s", 1)[0]


@dataclass(frozen=True)
class Recipe:
    """The settings a rerun must share with the saved plan: changing one would mix incomparable runs."""

    data: str
    proxy: Proxy
    grid_step: float
    target: float
    tolerance: float
    seeds: int
    epochs: int
    val_images: int
    study_phis: tuple[float, ...]
    batch_size: int
    lr: float | None
    optimizer: str
    augment: str
    precision: str
    val_split: float

    @classmethod
    def of(cls, settings: SearchSettings) -> Recipe:
        """The recipe part of the settings."""
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)}
        return cls(**values | {"study_phis": tuple(values["study_phis"])})

    def differences(self, other: Recipe) -> dict[str, tuple[Any, Any]]:
        """Field -> (this value, the other's value), for the fields where the two differ."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"study_phis": list(self.study_phis)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        return cls(**data | {"proxy": Proxy(**data["proxy"]), "study_phis": tuple(data["study_phis"])})


@dataclass(frozen=True)
class NetworkCost:
    """What one planned network costs, counted on the built module; `architecture` tells networks
    apart (rounding makes different coefficients build the same one)."""

    macs: int
    params: int
    resolution: int
    stages: tuple[tuple[int, int], ...]
    architecture: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkCost:
        return cls(**data | {"stages": tuple(tuple(stage) for stage in data["stages"])})


@dataclass(frozen=True)
class SearchPlan:
    """Which runs a search trains, each network's measured cost, and how many images each run sees."""

    recipe: Recipe
    grid_size: int
    distinct_networks: int
    matched_networks: int
    grid: list[Coefficients]
    candidates: list[Coefficients]
    study: list[RunSpec]
    measured: dict[str, NetworkCost]  # by spec key
    baseline_key: str
    train_images: int
    calibration_images_per_s: float
    reference_macs: int  # the cost unit: the proxy scaled by the paper's coefficients, as calibrated
    minutes_per_candidate: float
    note: str
    class_names: list[str]
    source: str

    def runs(self) -> list[RunSpec]:
        """Every planned run in training order: baseline, candidates, the single-dimension study,
        then the compound-scaling runs planned so far (they wait for the chosen coefficients)."""
        specs = [BASELINE]
        specs += [RunSpec("candidate", point, 1.0) for point in self.candidates]
        specs += self.study
        specs += [RunSpec.from_key(key) for key in self.measured if key.startswith("compound_")]
        return list(dict.fromkeys(specs))  # plans made before spread_subset could repeat a point

    def cost(self, spec: RunSpec) -> NetworkCost:
        return self.measured[spec.key]

    @property
    def baseline_macs(self) -> int:
        return self.measured[self.baseline_key].macs

    def estimate_seconds(self, macs: float) -> float:
        """Time to train and validate one run of a network with `macs`, from the calibration."""
        images = self.train_images * self.recipe.epochs + self.recipe.val_images / 3
        return RUN_OVERHEAD_S + images / self.calibration_images_per_s * macs / self.reference_macs

    def with_costs(self, costs: dict[str, NetworkCost]) -> SearchPlan:
        """This plan with more measured networks (e.g. the compound runs, once coefficients are chosen)."""
        return dataclasses.replace(self, measured=self.measured | costs)

    # --------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {
            "recipe": self.recipe.to_json(),
            "grid": [dataclasses.asdict(p) for p in self.grid],
            "candidates": [dataclasses.asdict(p) for p in self.candidates],
            "study": [spec.to_dict() for spec in self.study],
            "measured": {key: dataclasses.asdict(cost) for key, cost in self.measured.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> SearchPlan:
        """The plan a plan.json holds; ValueError naming what is missing or wrong otherwise."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise ValueError(f"it holds a {type(data).__name__}, not an object with {', '.join(sorted(names))}")
        if missing := names - set(data):
            raise ValueError(f"missing {', '.join(sorted(missing))}")
        if unknown := set(data) - names:
            raise ValueError(f"unknown {', '.join(sorted(unknown))}")
        try:
            plan = cls(
                **data
                | {
                    "recipe": Recipe.from_json(data["recipe"]),
                    "grid": [Coefficients(**p) for p in data["grid"]],
                    "candidates": [Coefficients(**p) for p in data["candidates"]],
                    "study": [RunSpec.from_dict(s) for s in data["study"]],
                    "measured": {key: NetworkCost.from_json(cost) for key, cost in data["measured"].items()},
                }
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"malformed entry ({type(error).__name__}: {error})") from None
        plan._check()
        return plan

    def _check(self) -> None:
        for name in ("train_images", "reference_macs", "calibration_images_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if self.baseline_key != BASELINE.key:
            raise ValueError(f"baseline_key is {self.baseline_key!r}, not {BASELINE.key!r}")
        if unmeasured := [spec.key for spec in self.runs() if spec.key not in self.measured]:
            raise ValueError(f"no measured cost for {', '.join(unmeasured)}")

    def write(self, folder: Path) -> Path:
        """Save atomically as folder/plan.json."""
        path = Path(folder) / PLAN_FILE
        write_json(path, self.to_json())
        return path

    @classmethod
    def read(cls, folder: Path) -> SearchPlan:
        """The plan saved in folder/plan.json, with a one-line error if that file is corrupt or not
        a search plan (e.g. another tool's plan.json in the chosen --output)."""
        path = Path(folder) / PLAN_FILE
        advice = "choose another --output, or delete that folder to start the search over"
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is corrupt (not JSON: {error}); {advice}") from None
        try:
            return cls.from_json(data)
        except ValueError as error:
            raise ValueError(f"{path} is not a search plan effnet can read ({error}); {advice}") from None
