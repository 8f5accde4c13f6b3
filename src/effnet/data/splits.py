"""The containers every data source produces: `ImageSplit` (one split, a torch Dataset of uint8 RGB
images) and `DataSplits` (train/val/test, class names, where they came from, the bad files found).

An ImageSplit holds its images either in memory (decoded once: a uint8 tensor N x 3 x H x W when all
images share a size, else a list of 3 x H x W tensors) or as file paths decoded on each access in
loader workers. Items are always `(uint8 tensor 3 x H x W, int label)`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from effnet.data.images import BadImageError, read_rgb

logger = logging.getLogger("effnet")

BAD_IMAGE_POLICIES = ("fail", "skip")
SAMPLES_PER_CLASS = 4
# Lazily decoded JPEGs keep both sides >= this (see read_rgb): ample for EfficientNet-B7's 600 px.
LAZY_DECODE_MIN_SIDE = 1024


def check_policy(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")


def hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ImageSplit(Dataset):
    """One split of a data set: `[i] -> (uint8 tensor 3xHxW RGB, int label)`.

    Give `images` (in memory) or `paths` (lazy: decoded on access; JPEGs of more than twice
    LAZY_DECODE_MIN_SIDE are decoded at reduced scale, see `read_rgb`). In lazy mode every file was
    validated when the data were loaded; if one vanishes or breaks during the run, `on_bad_image`
    decides: "fail" raises a RuntimeError naming the file, "skip" logs it once and returns the next
    readable item instead (so a batch keeps its size and the run goes on).
    """

    def __init__(
        self,
        targets: Sequence[int],
        images: torch.Tensor | list[torch.Tensor] | None = None,
        paths: Sequence[str] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
        on_bad_image: str = "fail",
    ):
        check_policy(on_bad_image)
        if images is None and paths is None:
            raise ValueError("an ImageSplit needs images (in memory) or paths (decoded lazily)")
        self.targets = [int(t) for t in targets]
        self.images = images
        self.paths = list(paths) if paths is not None else None
        for name, items in (("images", images), ("paths", self.paths)):
            if items is not None and len(items) != len(self.targets):
                raise ValueError(f"{len(items)} {name} but {len(self.targets)} targets")
        if sizes is None and images is not None:
            sizes = [tuple(image.shape[-2:]) for image in images]
        self.sizes = [tuple(int(v) for v in size) for size in sizes] if sizes is not None else None
        self.on_bad_image = on_bad_image
        self._reported: set[str] = set()

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[index], self.targets[index]
        for offset in range(len(self)):
            item = (index + offset) % len(self)
            try:
                return hwc_to_chw(read_rgb(self.paths[item], min_side=LAZY_DECODE_MIN_SIDE)), self.targets[item]
            except BadImageError as error:
                message = f"{error.path} became unreadable during the run ({error.reason})"
                if self.on_bad_image == "fail":
                    raise RuntimeError(f"{message}; restore it, or pass on_bad_image='skip'") from None
                if error.path not in self._reported:
                    self._reported.add(error.path)
                    logger.warning("%s; skipped (the next readable image is used in its place)", message)
        raise RuntimeError("no image of this split is readable any more")

    def subset(self, indices: Sequence[int]) -> ImageSplit:
        """The items at `indices`, sharing memory with this split (used to carve validation sets)."""
        indices = [int(i) for i in indices]
        if self.images is None:
            images = None
        elif isinstance(self.images, torch.Tensor):
            images = self.images[torch.as_tensor(indices, dtype=torch.long)]
        else:
            images = [self.images[i] for i in indices]
        return ImageSplit(
            targets=[self.targets[i] for i in indices],
            images=images,
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            sizes=[self.sizes[i] for i in indices] if self.sizes is not None else None,
            on_bad_image=self.on_bad_image,
        )

    def summary(self, class_names: Sequence[str]) -> dict:
        counts = Counter(self.targets)
        samples: dict[str, list[int]] = {name: [] for name in class_names}
        for index, target in enumerate(self.targets):
            if len(samples[class_names[target]]) < SAMPLES_PER_CLASS:
                samples[class_names[target]].append(index)
        result = {
            "count": len(self),
            "in_memory": self.in_memory,
            "per_class": {name: counts.get(label, 0) for label, name in enumerate(class_names)},
            "samples": samples,
        }
        if self.sizes:
            heights, widths = np.array(self.sizes).T
            result["image_size"] = {
                "min_hw": [int(heights.min()), int(widths.min())],
                "max_hw": [int(heights.max()), int(widths.max())],
                "mean_hw": [round(float(heights.mean()), 1), round(float(widths.mean()), 1)],
            }
        return result


@dataclass
class DataSplits:
    """What `load_data` returns: the splits (val/test may be None), class names (label order),
    a description of the source, the files left out as bad (path, reason), and whether a mirror
    image keeps its label (not for handwriting: a mirrored 2, 3 or 7 is no digit)."""

    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit | None
    class_names: list[str]
    source: str
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    mirror_safe: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, ImageSplit]:
        return {name: split for name, split in (("train", self.train), ("val", self.val), ("test", self.test)) if split}

    def summary(self) -> dict:
        """Per split: image count, per-class counts, image-size stats and a few sample indices per class."""
        return {
            "source": self.source,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "bad_images": len(self.bad_images),
            "splits": {name: split.summary(self.class_names) for name, split in self.splits().items()},
        }


def stratified_split(targets: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions) + 1 parts, the first part taking what the fractions leave.

    Each class is split separately (same proportions in every part), shuffled by a generator seeded
    with `seed`, so the result is a pure function of (targets, fractions, seed). Every class keeps at
    least one item in the first (training) part.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to less than 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        sizes = [int(round(len(members) * f)) for f in fractions]
        while sum(sizes) >= len(members) and any(sizes):
            sizes[int(np.argmax(sizes))] -= 1
        bounds = np.cumsum([len(members) - sum(sizes), *sizes])
        for part, chunk in zip(parts, np.split(members, bounds[:-1]), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) if part else np.array([], dtype=int) for part in parts]
