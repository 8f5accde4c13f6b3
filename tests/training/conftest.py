"""Fixtures for the training tests (helpers in training_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import write_folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and much faster than on two when the machine is
    shared: every op's two-thread rendezvous then waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 training images (val carved out by val_split) and 12 test images in 3 classes."""
    return write_folder(tmp_path_factory.mktemp("colours"), {"train": 16, "test": 4})


@pytest.fixture
def fast_options(tmp_path: Path) -> dict:
    """Options for a quick, deterministic run of the tiny model on the image folder."""
    return {
        "img_size": 32,
        "epochs": 2,
        "batch_size": 8,
        "val_split": 0.25,
        "warmup_steps": 2,
        "workers": 0,
        "progress": False,
        "report": False,
        "precision": "fp32",
        "output": str(tmp_path / "run"),
        "data_dir": str(tmp_path / "data"),
    }
