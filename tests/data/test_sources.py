"""Named data sets without the network: torchvision's classes are replaced by small fakes."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from torchvision import datasets

from effnet.data import load_data


class FakeCIFAR10:
    """torchvision.datasets.CIFAR10's interface: .data (N, 32, 32, 3) uint8, .targets, .classes."""

    classes = [f"class{i}" for i in range(10)]
    present = True

    def __init__(self, root, train=True, download=False):
        if not self.present:
            if download:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        count = 200 if train else 50
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(count)]


@pytest.fixture
def fake_cifar(monkeypatch):
    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.setattr(FakeCIFAR10, "present", True)
    return FakeCIFAR10


def test_cifar_is_held_in_memory_with_val_carved_from_train(fake_cifar, tmp_path):
    data = load_data("cifar10", data_dir=tmp_path, val_split=0.1, seed=0)
    assert [len(data.train), len(data.val), len(data.test)] == [180, 20, 50]
    assert data.class_names == FakeCIFAR10.classes
    assert data.train.in_memory and data.train.images.shape == (180, 3, 32, 32)
    assert np.bincount(data.val.targets).tolist() == [2] * 10
    original = FakeCIFAR10(tmp_path, train=False)
    image, label = data.test[7]
    assert torch.equal(image, torch.from_numpy(original.data[7]).permute(2, 0, 1)) and label == original.targets[7]


def test_offline_cifar_says_how_to_use_a_local_copy(fake_cifar, monkeypatch, tmp_path):
    monkeypatch.setattr(FakeCIFAR10, "present", False)
    with pytest.raises(RuntimeError, match=r"could not be downloaded.*URLError.*--data /path/to/cifar10-jpg.tar.gz"):
        load_data("cifar10", data_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"download=False.*--data /path/to/cifar10"):
        load_data("cifar10", data_dir=tmp_path, download=False)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="on_bad_image"):
        load_data("digits", on_bad_image="ignore")
    with pytest.raises(ValueError, match="val_split"):
        load_data("digits", val_split=0.6)
