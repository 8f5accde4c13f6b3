"""`--cache-frozen`: train the unfrozen stages on stored outputs of the frozen ones.

With `--finetune last:N` the stem and the first 7 - N stages never change, so their output for a
given input image is a constant. This module computes it once per stored *view* of each training
image and serves those features to the loop instead of images:

* view 0 is the image as evaluated (resize, normalise), view 1 its mirror image (unless mirror
  images change the label, as in handwriting), the other views draws of the run's augmentation
  preset (a fixed set of augmented views, seeded per view and image, so a resumed run rebuilds
  the same cache);
* each epoch shows every image once, through one of its views picked at random (seeded by epoch),
  shifted by a few feature cells (`cache_shift`, by default 1/12 of the map's side, rounded: 2 of
  24): a translation of the image by whole multiples of the prefix's stride, which the convolutions
  carry through exactly away from the borders, so it is the cached counterpart of CIFAR's classic
  pad-and-crop augmentation. On CIFAR-10 it took the 45-minute test accuracy from 92.77-92.93% to
  93.01% (README "Training"): the suffix memorises 4 fixed views less;
* validation features (view 0) are cached too, so per-epoch validation runs the suffix only. The
  test set still goes through the whole model at the end: that is the model a user keeps.

The prefix runs on the inference engine `runtime` measures fastest on this CPU (OpenVINO or PyTorch
with folded batch norms, in bf16 only where the CPU computes bf16 natively, and never against a
forced --precision). Features are stored in bfloat16 whatever the engine: half the memory of fp32,
and rounding the frozen features to 8 bits of mantissa is far below the augmentation's noise.
Computing them in bf16 costs more precision than storing them (Lite0's first block amplifies the
rounding of its inputs): the relative error against fp32 is logged, and `--precision fp32` holds
for the prefix too for anyone who wants exact features.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from effnet.data import TransformedDataset, build_transforms, make_loader
from effnet.data.loading import derive_seed
from effnet.inference import create_engine
from effnet.models.efficientnet import EfficientNet
from effnet.models.frozen import FrozenPrefix, TrainableSuffix, split_at_stage
from effnet.training.config import TrainConfig

log = logging.getLogger("effnet")
CACHE_DTYPE = torch.bfloat16
PREFIX_BATCH = 64
# Share of the available memory the cache may take: the rest is for the model, the optimizer, the
# data loader and the user's other programs.
MEMORY_SHARE = 0.6
# Default shift: this fraction of the feature map's side (CIFAR's pad-4-of-32 crop is 1/8).
SHIFT_SHARE = 1 / 12


class CachedFeatures(Dataset):
    """Items `(features of one view, label)`; which view, and its shift by up to `shift` cells along
    each axis (edges repeated), are a pure function of (seed, epoch, index)."""

    in_memory = True

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, seed: int = 0, shift: int = 0) -> None:
        self.features, self.labels, self.seed = features, labels, seed  # features: views x N x C x H x W
        self.shift = shift
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        views = self.features.shape[0]
        draw = derive_seed(self.seed, self.epoch, index)  # 63 random bits: the view, then the shift
        view, draw = draw % views, draw // views
        features = self.features[view, index]
        if self.shift:
            span = 2 * self.shift + 1  # shifts -shift..shift along each axis
            down, right = draw % span - self.shift, draw // span % span - self.shift
            features = _shifted(features, down, right)
        # Stored in bf16, served in fp32 like images: autocast casts again where it computes in bf16.
        return features.float(), int(self.labels[index])


def _shifted(features: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """`features` (C x H x W) moved `down` rows and `right` columns, the edge rows and columns repeated
    into the space left behind (what replicate padding and a crop would give)."""
    height, width = features.shape[-2:]
    rows = (torch.arange(height) - down).clamp_(0, height - 1)
    columns = (torch.arange(width) - right).clamp_(0, width - 1)
    return features.index_select(1, rows).index_select(2, columns)  # far faster than [:, rows][:, :, columns]


def frozen_stage_count(first_trainable_part: int) -> int:
    """Stages in the frozen prefix, from `finetune.first_trainable_part` (0 stem, 1-7 stages, ...)."""
    return first_trainable_part - 1


def trainable_suffix(model: EfficientNet, frozen_stages: int) -> TrainableSuffix:
    """The part of `model` (or of its EMA copy) that runs on cached features."""
    return split_at_stage(model, frozen_stages)[1]


def build_feature_cache(
    model: EfficientNet,
    frozen_stages: int,
    train_split: Dataset,
    val_split: Dataset | None,
    img_size: int,
    config: TrainConfig,
    device: torch.device,
    flip: bool = True,
) -> tuple[CachedFeatures, CachedFeatures | None]:
    """Run the frozen prefix over `config.cache_views` views of every training image (and view 0
    of every validation image); return the two cached data sets. Without `flip` (mirror images
    change the label) there is no mirrored view and the augmented draws do not flip."""
    prefix = split_at_stage(model, frozen_stages)[0]
    task = prefix_task(model, frozen_stages, img_size)
    run_prefix = _prefix_runner(prefix, img_size, device, task, config.precision)
    preprocess = model.pretrained_cfg
    plain = build_transforms(preprocess, train=False, img_size=img_size)
    augmented = build_transforms(preprocess, train=True, augment=config.augment, img_size=img_size, flip=flip)
    seed, workers = config.seed, config.workers
    views = views_that_fit(prefix, img_size, config.cache_views, len(train_split), len(val_split or []))
    started = time.perf_counter()
    fixed = [plain, _Mirrored(plain)] if flip else [plain]
    train_views = [
        *[TransformedDataset(train_split, transform, seed) for transform in fixed],
        *[_at_epoch(TransformedDataset(train_split, augmented, seed), view) for view in range(len(fixed), views)],
    ][:views]
    show = config.progress
    train = _cache(train_views, run_prefix, seed, workers, config.cache_shift, "training", show)
    val_views = [TransformedDataset(val_split, plain, seed)]
    val = _cache(val_views, run_prefix, seed, workers, 0, "validation", show) if val_split else None
    stored = train.features.numel() + (val.features.numel() if val else 0)
    log.info(
        "cached the frozen stem + %d stage(s): %d view(s) of %d training images%s, features %s, %.2f GB, in %.0f s;"
        " served shifted by up to %d cell(s)",
        frozen_stages,
        views,
        len(train),
        f" and {len(val)} validation images" if val else "",
        "x".join(str(d) for d in train.features.shape[2:]),
        stored * train.features.element_size() / 1e9,
        time.perf_counter() - started,
        train.shift,
    )
    return train, val


def default_shift(side: int) -> int:
    """`cache_shift`'s default for a feature map `side` cells wide: SHIFT_SHARE of it, at least 1."""
    return max(1, round(side * SHIFT_SHARE))


def views_that_fit(
    prefix: FrozenPrefix, img_size: int, wanted: int, train_images: int, val_images: int, memory: int | None = None
) -> int:
    """How many of the `wanted` views per training image fit in MEMORY_SHARE of the available
    memory (`memory` bytes, default: what the system reports, divided among the processes on this
    machine) beside one view of the validation images. Fewer than wanted: logged, and the run goes
    on with fewer. Not even one: a ValueError naming the ways out, before any time is spent."""
    shape = prefix(torch.zeros(1, 3, img_size, img_size)).shape[1:]  # FrozenPrefix: eval mode, no grad
    per_image = shape.numel() * torch.finfo(CACHE_DTYPE).bits // 8
    if memory is None:  # processes on one machine (torchrun) each hold a cache: each gets its share
        memory = available_memory()
        if memory is None:
            return wanted
        memory //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget = MEMORY_SHARE * memory - val_images * per_image
    fits = min(wanted, int(budget // (train_images * per_image)))
    gigabytes = per_image * (train_images * wanted + val_images) / 1e9
    if fits < 1:
        raise ValueError(
            f"--cache-frozen would store {gigabytes:.1f} GB of features ({'x'.join(map(str, shape))} per view of "
            f"{train_images} images) but only {memory / 1e9:.1f} GB of memory is available: train without the "
            "cache (--no-cache-frozen), at a lower --img-size, or with more trainable stages (--finetune last:N, "
            "larger N)"
        )
    if fits < wanted:
        log.warning(
            "the feature cache stores %d view(s) per image instead of %d: %d would need %.1f GB, %.1f GB available",
            fits,
            wanted,
            wanted,
            gigabytes,
            memory / 1e9,
        )
    return fits


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


class _Mirrored:
    """`transform`, then a horizontal flip."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.flip(self.transform(image), dims=[-1])


def _at_epoch(dataset: TransformedDataset, epoch: int) -> TransformedDataset:
    dataset.set_epoch(epoch)
    return dataset


def prefix_task(model: EfficientNet, frozen_stages: int, img_size: int) -> str:
    """The name under which the runtime remembers the prefix's engine choice on this machine."""
    return f"feature-cache prefix of {model.config.name} (stem + {frozen_stages} stages) at {img_size}px"


def prefix_engine(prefix: FrozenPrefix, img_size: int, device: torch.device, task: str, precision: str = "auto"):
    """The engine `runtime` picks for the prefix on this CPU (`inference.create_engine`, measured
    once per machine) at the run's `precision` (a forced --precision holds for the prefix too),
    without its logits parity check: features are checked by the caller."""
    engine = create_engine(
        prefix, "auto", device, img_size=img_size, batch_size=PREFIX_BATCH, task=task, precision=precision
    )
    if hasattr(engine, "parity"):
        engine.parity = {}
    return engine


def _prefix_runner(prefix: FrozenPrefix, img_size: int, device: torch.device, task: str, precision: str):
    """A function images -> prefix features (float, on the CPU) on `prefix_engine`. A
    reduced-precision engine's features are compared with PyTorch fp32 on the first batch and the
    relative error logged."""
    engine = prefix_engine(prefix, img_size, device, task, precision)
    checked = False

    def run(images: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        features = engine(images)
        if not checked:
            with torch.inference_mode():
                expected = prefix(images[:8].to(device)).float().cpu()
            error = float((features[:8] - expected).norm() / expected.norm())
            log.info(
                "frozen prefix on %s %s: relative error %.1e against PyTorch fp32",
                engine.name,
                getattr(engine, "precision", "fp32"),
                error,
            )
            checked = True
        return features

    return run


def _cache(
    views: list[TransformedDataset],
    run_prefix,
    seed: int,
    workers: int | str,
    shift: int | None,
    what: str = "training",
    progress: bool = True,
) -> CachedFeatures:
    """Features of every image under each view, as one views x N x C x H x W tensor, served shifted
    by up to `shift` cells (None: `default_shift` of the feature map). A progress bar per view (with
    its ETA): on a slow CPU this is the longest silent phase of a run otherwise."""
    features: torch.Tensor | None = None
    labels = torch.empty(len(views[0]), dtype=torch.long)
    # "auto" (in-process for data in memory) measured fastest: 1 or 2 worker processes, which would
    # prepare the next batch while the prefix runs, slowed the cache on 2 cores (benchmarks/README.md).
    for view, dataset in enumerate(views):
        start = 0
        loader = make_loader(dataset, PREFIX_BATCH, shuffle=False, seed=seed, epoch=dataset.epoch, num_workers=workers)
        description = f"caching {what} view {view + 1}/{len(views)}"
        for images, batch_labels in tqdm(loader, desc=description, disable=not progress, leave=False, unit="batch"):
            out = run_prefix(images)
            if features is None:
                features = torch.empty((len(views), len(dataset), *out.shape[1:]), dtype=CACHE_DTYPE)
            features[view, start : start + len(out)] = out.to(CACHE_DTYPE)
            if view == 0:  # every view holds the same images in the same order
                labels[start : start + len(out)] = batch_labels
            start += len(out)
    assert features is not None
    return CachedFeatures(features, labels, seed, default_shift(features.shape[-1]) if shift is None else shift)
