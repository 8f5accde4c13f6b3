"""`load_data`: one entry point for every data source effnet trains on.

* `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). It ships inside
  scikit-learn, so it works on a machine with no network: the embedded default of `effnet train`.
* `cifar10`, `cifar100`: torchvision's copies, downloaded into `data_dir` when missing and online;
  held in memory as uint8 (they are already decoded arrays).
* `flowers102`: torchvision's Oxford Flowers (official train/val/test), decoded lazily in loader workers.
* anything else: an image folder or an archive of one (see `effnet.data.folders`).

Where a data set has no validation split, one is carved from train (stratified per class, seeded), so
the test split is never looked at while choosing epochs or hyper-parameters.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from effnet.data.folders import MAX_MEMORY_BYTES, carve, load_image_folder
from effnet.data.splits import DataSplits, ImageSplit, check_policy
from effnet.paths import cache_dir

logger = logging.getLogger("effnet")

NAMED_DATASETS = ("digits", "cifar10", "cifar100", "flowers102")


def load_data(
    spec: str | Path,
    data_dir: str | Path | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    on_bad_image: str = "fail",
    download: bool = True,
    max_memory_bytes: int = MAX_MEMORY_BYTES,
) -> DataSplits:
    """Load `spec` ("digits" | "cifar10" | "cifar100" | "flowers102" | folder | .tar/.tar.gz/.zip).

    `val_split` is the fraction of each class carved from train for validation when the source has no
    validation split (and, for a single pool of images such as `digits` or `DIR/<class>/*`, the fraction
    held out for test as well: 80/10/10 by default). Splits are a pure function of `seed`.
    `on_bad_image="fail"` raises one error listing every unusable file; "skip" leaves them out, logged once.
    `max_memory_bytes` bounds the decoded size of a folder held in memory (larger ones decode lazily).
    `data_dir` (downloads, extracted archives, decoded images) defaults to effnet's cache folder,
    `effnet.paths.cache_dir("data")`.
    """
    check_policy(on_bad_image)
    data_dir = Path(data_dir) if data_dir is not None else cache_dir("data")
    if not 0 <= val_split < 0.5:
        raise ValueError(f"val_split must be in [0, 0.5), got {val_split}")
    name = str(spec).lower()
    if name in NAMED_DATASETS and not Path(spec).exists():
        data = _NAMED_LOADERS[name](Path(data_dir), val_split, seed, download, on_bad_image)
    elif Path(spec).exists():
        data = load_image_folder(spec, data_dir, val_split, seed, on_bad_image, max_memory_bytes)
    else:
        raise FileNotFoundError(
            f"{spec} is neither a data set name ({', '.join(NAMED_DATASETS)}) nor an existing folder or archive"
        )
    sizes = ", ".join(f"{split_name} {len(split):,}" for split_name, split in data.splits().items())
    logger.info("%s: %d classes; %s images", data.source, data.num_classes, sizes)
    return data


@functools.cache
def _digits_pool() -> tuple[torch.Tensor, list[int], list[str]]:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(gray).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return images, bunch.target.tolist(), [str(d) for d in bunch.target_names]


def load_digits(data_dir: Path, val_split: float, seed: int, download: bool, on_bad_image: str) -> DataSplits:
    """scikit-learn's 8x8 digits as RGB uint8 (ink 0..16 scaled to 0..255), split 80/10/10 by default."""
    images, targets, class_names = _digits_pool()
    pool = ImageSplit(targets, images=images, on_bad_image=on_bad_image)
    train, val, test = carve(pool, [val_split, val_split], seed)
    return DataSplits(train, val, test, list(class_names), source="digits (scikit-learn, 8x8)", mirror_safe=False)


def _torchvision_dataset(factory: Callable, title: str, data_dir: Path, download: bool, **kwargs):
    """Build a torchvision data set, turning "not found" and download failures into one clear message."""
    try:
        return factory(root=str(data_dir), download=False, **kwargs)
    except RuntimeError:
        if not download:
            raise RuntimeError(f"{title} is not in {data_dir} and download=False. {_LOCAL_COPY_HELP}") from None
    try:
        logger.info("downloading %s into %s", title, data_dir)
        return factory(root=str(data_dir), download=True, **kwargs)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"{title} is not in {data_dir} and could not be downloaded ({type(error).__name__}: {error}); "
            f"offline? {_LOCAL_COPY_HELP}"
        ) from None


_LOCAL_COPY_HELP = (
    "Copy torchvision's files for it into --data-dir, or point --data at a local copy as an image folder or "
    "archive, e.g. --data /path/to/cifar10-jpg.tar.gz or --data /path/to/cifar10 (with train/<class>/ and "
    "test/<class>/ inside)."
)


def _load_cifar(dataset_name: str, data_dir: Path, val_split: float, seed: int, download: bool, on_bad_image: str):
    from torchvision import datasets

    factory = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[dataset_name]
    title = dataset_name.upper().replace("CIFAR", "CIFAR-")
    parts = {}
    for split_name, train in (("train", True), ("test", False)):
        dataset = _torchvision_dataset(factory, title, data_dir, download, train=train)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        parts[split_name] = ImageSplit(dataset.targets, images=images, on_bad_image=on_bad_image)
    train, val = carve(parts["train"], [val_split], seed)
    return DataSplits(train, val, parts["test"], list(dataset.classes), source=f"{title} (torchvision, {data_dir})")


def load_flowers102(data_dir: Path, val_split: float, seed: int, download: bool, on_bad_image: str) -> DataSplits:
    """Oxford Flowers-102 with its official splits; files checked by torchvision's MD5, decoded lazily."""
    from PIL import Image
    from torchvision import datasets

    splits = {}
    for split_name in ("train", "val", "test"):
        dataset = _torchvision_dataset(datasets.Flowers102, "Flowers-102", data_dir, download, split=split_name)
        paths = [str(p) for p in dataset._image_files]
        sizes = []
        for path in paths:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
        splits[split_name] = ImageSplit(dataset._labels, paths=paths, sizes=sizes, on_bad_image=on_bad_image)
    return DataSplits(**splits, class_names=list(datasets.Flowers102.classes), source=f"Flowers-102 ({data_dir})")


_NAMED_LOADERS = {
    "digits": load_digits,
    "cifar10": lambda *args: _load_cifar("cifar10", *args),
    "cifar100": lambda *args: _load_cifar("cifar100", *args),
    "flowers102": load_flowers102,
}
