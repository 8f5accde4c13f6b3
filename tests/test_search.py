"""The compound-scaling search: the grid's constraint, the proxy's measured cost, and a tiny
search on synthetic images that is killed, resumed, and leaves a coefficients file that builds."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import effnet
from effnet.cli import main as cli_main
from effnet.models.efficientnet import EfficientNet
from effnet.models.scaling import build_config
from effnet.profiling import count_macs, count_params
from effnet.search import PAPER_COEFFICIENTS, Coefficients, Proxy, coefficient_grid, measure, spread_subset
from effnet.search.plan import PLAN_FILE, RunSpec, SearchPlan
from effnet.search.runner import SearchSettings, search


@pytest.mark.parametrize(("step", "target", "tolerance"), [(0.05, 2.0, 0.1), (0.1, 2.0, 0.02), (0.05, 3.0, 0.05)])
def test_grid_keeps_exactly_the_points_within_tolerance(step: float, target: float, tolerance: float) -> None:
    grid = coefficient_grid(step, target, tolerance)
    kept = {(p.alpha, p.beta, p.gamma) for p in grid}
    assert len(kept) == len(grid) > 0
    # Brute force, in exact rational arithmetic (boundaries included), over a range wider than
    # any admissible value: kept <=> within tolerance.
    exact_step, exact_target, exact_tol = (Fraction(v).limit_denominator(1000) for v in (step, target, tolerance))
    alphas = [1 + i * exact_step for i in range(int(target * (1 + tolerance) / step) + 3)]
    betas = [1 + i * exact_step for i in range(int(math.sqrt(target * (1 + tolerance)) / step) + 3)]
    assert alphas[-1] > target * (1 + tolerance) and betas[-1] ** 2 > target * (1 + tolerance)
    for alpha, beta, gamma in itertools.product(alphas, betas, betas):
        inside = abs(alpha * beta**2 * gamma**2 / exact_target - 1) <= exact_tol
        assert ((float(alpha), float(beta), float(gamma)) in kept) == inside, (alpha, beta, gamma)
    for point in grid:
        for value in (point.alpha, point.beta, point.gamma):
            assert value >= 1
            assert math.isclose((value - 1) / step, round((value - 1) / step), abs_tol=1e-9)


def test_grid_contains_the_papers_coefficients_and_rejects_bad_settings() -> None:
    assert PAPER_COEFFICIENTS in coefficient_grid()  # 1.2 * 1.1^2 * 1.15^2 = 1.92, 4% under 2
    assert PAPER_COEFFICIENTS not in coefficient_grid(tolerance=0.03)
    for bad in ({"step": 0}, {"target": 1.0}, {"tolerance": 1.5}):
        with pytest.raises(ValueError):
            coefficient_grid(**bad)


def test_spread_subset_starts_at_the_paper_and_spreads_over_the_flops_split() -> None:
    grid = coefficient_grid()
    subset = spread_subset(grid, 6)
    assert subset[0] == PAPER_COEFFICIENTS
    assert len(set(subset)) == 6 and set(subset) <= set(grid)
    assert spread_subset(grid, 4) == subset[:4]  # any prefix is itself spread out
    # Points on the covered corners are at distance 0: they are still picked once each, never twice.
    corners = (Coefficients(2.0, 1.0, 1.0), Coefficients(1.0, 1.45, 1.0), Coefficients(1.0, 1.0, 1.45))
    on_edges = [p for p in grid if sorted(p.flops_shares)[1] == 0]  # all FLOPs in one dimension
    assert len(set(spread_subset(on_edges, len(on_edges) - 1, covered=corners))) == len(on_edges) - 1
    # Spread: the closest pair of the subset is farther apart than in most same-size samples.
    rng = np.random.default_rng(0)

    def closest_pair(points: list[Coefficients]) -> float:
        return min(math.dist(a.flops_shares, b.flops_shares) for a, b in itertools.combinations(points, 2))

    random_pairs = [closest_pair([grid[i] for i in rng.choice(len(grid), 6, replace=False)]) for _ in range(50)]
    assert closest_pair(subset) > np.percentile(random_pairs, 90)


def test_proxy_is_the_shrunken_baseline_and_its_cost_is_measured() -> None:
    proxy = Proxy(width_mult=0.5, depth_mult=0.5, resolution=64, num_classes=10)
    base = proxy.config(Coefficients(1.0, 1.0, 1.0), phi=0)
    assert base.stages == build_config(0.5, 0.5, 64, 0.2).stages
    scaled = proxy.config(PAPER_COEFFICIENTS, phi=1)
    assert scaled.preprocess.input_size == round(64 * 1.15)
    # Measured on the meta device, the count equals that of the real module on the CPU.
    model = EfficientNet(scaled)
    counted = measure(scaled)
    assert counted.macs == count_macs(model, scaled.preprocess.input_size)
    assert counted.params == count_params(model)
    # Rounding makes the real FLOPs factor differ from alpha*beta^2*gamma^2 = 1.92: reported, not assumed.
    ratio = counted.macs / measure(base).macs
    assert 1.3 < ratio < 3.5 and not math.isclose(ratio, PAPER_COEFFICIENTS.flops_factor, rel_tol=0.02)


# ------------------------------------------------------------------------------------------------
def _synthetic_folder(root: Path, classes: int = 3, per_class: int = 40) -> Path:
    """Tiny 16x16 images whose class is their colour: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        colour = np.zeros(3)
        colour[label % 3] = 200
        for index in range(per_class):
            pixels = (rng.normal(0, 30, (16, 16, 3)) + colour).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


TINY_ARGS = [
    "--budget-minutes", "10", "--width-mult", "0.25", "--depth-mult", "0.25", "--base-resolution", "32",
    "--grid-step", "0.25", "--max-candidates", "2", "--study-phis", "1", "--train-images", "48",
    "--batch-size", "16", "--val-images", "24", "--workers", "0", "--threads", "1",
]  # fmt: skip


def _search_command(data: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "effnet", "search", "--data", str(data), "--output", str(output), *TINY_ARGS]


@pytest.mark.slow
def test_tiny_search_resumes_after_sigkill_and_writes_usable_coefficients(tmp_path: Path) -> None:
    data, output = _synthetic_folder(tmp_path / "images"), tmp_path / "search"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        _search_command(data, output), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    results = output / "results"
    deadline = time.monotonic() + 120
    while not list(results.glob("*.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, f"the search ended before it could be killed: {first.stderr.read()}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = {path.name: path.read_text() for path in results.glob("*.json")}
    assert 1 <= len(saved) < 6 and not (output / "coefficients.json").exists()

    second = subprocess.run(_search_command(data, output), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{len(saved)} run(s) already finished are skipped" in second.stderr
    for name, text in saved.items():  # finished runs are neither retrained nor rewritten
        assert (results / name).read_text() == text
        assert f"training {Path(name).stem} " not in second.stderr
    # baseline + 2 candidates + depth, width and resolution at phi=1: all done, once each.
    rows = list(results.glob("*.json"))
    assert len(rows) == 6 and all(json.loads(p.read_text())["val_acc"] is not None for p in rows)
    assert "chosen: alpha=" in second.stdout
    for name in ("results.csv", "results.md", "candidates.png", "single_dimension.png", "plan.json"):
        assert (output / name).stat().st_size > 0

    coefficients = output / "coefficients.json"
    record = json.loads(coefficients.read_text())
    point = Coefficients(record["alpha"], record["beta"], record["gamma"])
    assert abs(point.flops_factor / 2 - 1) <= 0.1 and record["provenance"]["search_complete"] is True
    model = effnet.create_model("efficientnet", phi=1, coefficients=coefficients, num_classes=3)
    expected = effnet.compound_scale(1, point.alpha, point.beta, point.gamma)
    assert model.config.stages == expected.config.stages
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert cli_main(["scale", "--phi", "1", "--coefficients", str(coefficients)]) == 0

    # A rerun with another recipe must not mix its runs into this search.
    with pytest.raises(ValueError, match="other settings"):
        search(SearchSettings(data=str(data), budget_minutes=1, output=output, grid_step=0.1, workers=0))


def test_plan_file_round_trips_and_a_corrupt_or_foreign_one_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a run key"):
        RunSpec.from_key("candidate_a1.2_b1.10_g1.15_phi1")
    folder = tmp_path / "search"
    folder.mkdir()
    for text, problem in [
        ("{not json", "corrupt"),
        ("[1, 2]", "not a search plan"),
        ('{"steps": ["train"]}', "missing"),
    ]:
        (folder / PLAN_FILE).write_text(text)
        with pytest.raises(ValueError, match=problem) as caught:
            SearchPlan.read(folder)
        assert str(folder / PLAN_FILE) in str(caught.value) and "\n" not in str(caught.value)
        assert "--output" in str(caught.value)
