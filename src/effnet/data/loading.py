"""Reproducible loading: augmentation, order and mixing are pure functions of seeds, never of workers.

* `TransformedDataset` seeds torch's RNG per item from (seed, epoch, index) around the transform, so
  an image's augmentation does not depend on which worker made it, how many workers there are, or
  whether the epoch was interrupted and resumed.
* `make_loader` draws the epoch's order from (seed, epoch) and can skip the batches a resumed run has
  already seen, so a resumed epoch feeds exactly the remaining batches.
* `make_batch_mixer` (MixUp / CutMix) draws its randomness from (seed, step).

Build one loader per epoch: `make_loader(..., epoch=e)` also sets the dataset's epoch before the
loader's workers start (a worker holds a copy of the dataset, so changing the epoch afterwards would
not reach it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sized
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

MAX_AUTO_WORKERS = 4


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (order included); equal inputs give equal seeds."""
    state = np.random.SeedSequence([int(v) % (1 << 63) for v in values]).generate_state(2, dtype=np.uint64)
    return int(state[0]) >> 1


class TransformedDataset(Dataset):
    """`split` with `transform` applied; augmentation randomness is a pure function of (seed, epoch, index)."""

    def __init__(self, split: Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None, seed: int = 0):
        self.split, self.transform, self.seed = split, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def in_memory(self) -> bool:
        return getattr(self.split, "in_memory", True)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.split[index]
        if self.transform is None:
            return image, label
        with torch.random.fork_rng(devices=[]), single_threaded():
            # The CPU generator only: torch.manual_seed would also queue seeds for every lazy accelerator
            # backend, recording a stack trace each time (2 ms per image).
            torch.default_generator.manual_seed(derive_seed(self.seed, self.epoch, index))
            return self.transform(image), label


@contextmanager
def single_threaded():
    """Run torch ops on one thread. Per-image ops and batch collation are small: splitting them over the
    threads the model also uses made in-process loading many times slower on a busy small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def auto_num_workers(dataset: Dataset) -> int:
    """0 for data held in memory, where augmenting in the main process beats shipping images between
    processes (see README "Data" for the measurement); else a few workers to decode files in parallel."""
    if getattr(dataset, "in_memory", True):
        return 0
    return max(1, min(MAX_AUTO_WORKERS, os.cpu_count() or 1))


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(size, generator=generator).tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    num_workers: int | str = "auto",
    drop_last: bool = False,
    sampler: Sampler | None = None,
    skip_batches: int = 0,
) -> DataLoader:
    """A DataLoader for one epoch whose batches are a pure function of (seed, epoch).

    With a `sampler` (e.g. DistributedSampler) its order is used instead (its `set_epoch(epoch)` is
    called). `skip_batches` drops the first batches of the epoch, to resume mid-epoch exactly.
    `num_workers="auto"`: see `auto_num_workers`. Memory is pinned when CUDA is available.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if sampler is not None:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        order = list(sampler)
    elif shuffle:
        order = epoch_order(len(dataset), seed, epoch)
    else:
        order = list(range(len(dataset)))
    if skip_batches:
        total = loader_length(order, batch_size, drop_last)
        if skip_batches > total:
            raise ValueError(f"cannot skip {skip_batches} batches of an epoch that has {total}")
        order = order[skip_batches * batch_size :]
    workers = auto_num_workers(dataset) if num_workers == "auto" else int(num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_FixedOrder(order),
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        collate_fn=collate_single_threaded,
    )


def collate_single_threaded(batch: list) -> Any:
    with single_threaded():
        return default_collate(batch)


class _FixedOrder(Sampler[int]):
    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def loader_length(data: Sized, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch (before skipping)."""
    return len(data) // batch_size if drop_last else math.ceil(len(data) / batch_size)
