"""`fit`: fine-tune an EfficientNet on a data set, writing a run folder that survives a SIGKILL.

The loop is one readable pass (nanoGPT-style): `_start` builds everything a run needs into one
`_Run`; then each epoch sets what trains (`_set_trainable`), runs the batches (`_run_epoch`, one
`train_step` per batch) and ends (`_end_epoch`: validate, keep the best, checkpoint); `_final_test`
tests the best weights. Freezing, parameter groups, schedules, the step itself, state files and
processes live in the sibling modules; the feature cache hides behind `TrainingInputs`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm import tqdm

from effnet.data import DataSplits, TransformedDataset, flip_tta, load_data, make_batch_mixer, make_loader
from effnet.models.checkpoint import config_from_dict, config_to_dict, load_model, save_model
from effnet.models.efficientnet import EfficientNet
from effnet.models.registry import create_model, get_config
from effnet.paths import runs_dir
from effnet.profiling import count_params
from effnet.runtime import (
    MALLOC_ENV,
    autocast,
    autocast_dtype,
    choose_stage_precision,
    choose_wide_bf16_route,
    keep_freed_memory,
    pick_device,
    prepare_model,
    release_freed_memory_eagerly,
    set_stage_precision,
)
from effnet.training.backbone import choose_backbone
from effnet.training.checkpoint import (
    RUN_FILES,
    TrainState,
    check_compatible,
    load_state,
    nonfinite_entries,
    save_state,
    set_rng_state,
    write_json,
    write_metrics,
)
from effnet.training.config import AUTO_MODEL, ConfigError, TrainConfig, default_lr
from effnet.training.distributed import DistContext, all_reduce_sum, init_distributed, shutdown
from effnet.training.finetune import first_trainable_part, freeze, resolve_auto, set_train_mode
from effnet.training.inputs import TrainingInputs, eval_transform
from effnet.training.schedule import BudgetEpochs, LRSchedule
from effnet.training.step import NonFiniteLoss, Step, make_step, train_step

log = logging.getLogger("effnet")
SINGLE_PROCESS = DistContext()
IMAGENET_CLASSES = 1000
DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ADVICE = "Try a lower --lr, --clip-grad 1.0 or --precision fp32."


class TrainingDiverged(RuntimeError):
    """The loss, a weight or a statistic became NaN or infinite; the run folder keeps the last good checkpoint."""


@dataclass
class FitResult:
    model: EfficientNet  # the best weights by validation accuracy (EMA weights with ema=True)
    history: list[dict[str, Any]]  # one row per epoch, as in metrics.csv
    results: dict[str, Any]  # as in results.json
    run_dir: Path | None


@dataclass(frozen=True)
class _Job:
    """What `fit` was asked to train, on what, and where: fixed for the whole run."""

    model: str | EfficientNet | None  # a name, a module, or None for the config's (or resumed run's) own
    data: str | DataSplits | None
    state: dict[str, Any] | None  # the resume state, None for a new run
    run_dir: Path
    context: DistContext
    device: torch.device


@dataclass
class _Run:
    """Everything one `fit` works with, built by `_start`; the loop reads and updates it."""

    config: TrainConfig
    splits: DataSplits
    net: EfficientNet  # the whole network (its state is what checkpoints hold)
    img_size: int
    flip: bool  # mirror augmentation (and flip TTA by default)
    inputs: TrainingInputs
    step: Step
    schedule: LRSchedule
    budget: BudgetEpochs
    mixer: Callable | None
    run_dir: Path
    context: DistContext
    device: torch.device
    lr: float
    started: float  # perf_counter() at which the run's wall time (earlier sessions' included) was 0
    batches_per_epoch: int
    best_weights: dict[str, torch.Tensor]
    state: TrainState = field(default_factory=TrainState)
    history: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # --val-at-minutes results
    pending_checks: list[float] = field(default_factory=list)  # --val-at-minutes marks still ahead
    restore_rng: dict[str, Any] | None = None  # the resumed run's generators, set once the loader exists
    trainable_from: int | None = None
    stop_reason: str | None = None
    tensorboard: Any = None

    @property
    def eval_net(self) -> nn.Module:
        """What is validated, tested and saved: the EMA of the weights, or the weights."""
        return self.step.ema.module if self.step.ema is not None else self.net

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def fit(
    model: str | EfficientNet | None,
    data: str | DataSplits | None,
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> FitResult:
    """Fine-tune `model` (a name for `create_model`, or an EfficientNet) on `data` (a spec for
    `effnet.data.load_data` such as 'digits', 'cifar10' or a folder, or a DataSplits).

    `overrides` are TrainConfig fields (`fit("efficientnet_lite0", "digits", pretrained=True)`).
    `resume=RUN_DIR` continues that run exactly; model and data then default to the run's own.
    A folder holding a run's files is refused unless resumed, or `overwrite=True` (which deletes them).
    """
    config, state, run_dir = _resolve_config(model, data, config, resume, overrides, overwrite)
    context, device = init_distributed(pick_device(config.device))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with _run_log(run_dir, context):
            return _train(_Job(model, data, state, run_dir, context, device), config)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        shutdown(context)


def _train(job: _Job, config: TrainConfig) -> FitResult:
    run = _start(job, config)
    while run.state.epoch < run.config.epochs and run.stop_reason is None:
        _set_trainable(run)
        _run_epoch(run)
        totals = _epoch_totals(run)
        if totals[2] == 0:  # the time budget ran out before this epoch's first batch
            _save_resume_state(run)
            break
        _end_epoch(run, *totals)
    if run.stop_reason:
        log.info("stopped: %s", run.stop_reason)
    return _final_test(run)


def _run_epoch(run: _Run) -> None:
    """Train on the epoch's batches from where it stands (a resumed run continues mid-epoch)."""
    config, state, device = run.config, run.state, run.device
    run.inputs.train.set_epoch(state.epoch)
    batches = _epoch_batches(run.inputs.train, config, run.context, state.epoch, state.batches_done)
    if run.restore_rng:  # after creating the loader iterator, which may draw from the global generator
        set_rng_state(run.restore_rng)
        run.restore_rng = None
    set_train_mode(run.net, run.trainable_from, config.bn_freeze)
    epoch_started = time.perf_counter() - state.seconds
    bar = _epoch_bar(run)
    for index, (images, labels) in enumerate(batches, start=state.batches_done):
        if index % config.accum_steps == 0 and _out_of_time(run):
            run.stop_reason = f"time budget of {config.max_minutes:g} min reached"
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if run.mixer is not None:
            images, targets = run.mixer(images, labels, state.epoch * run.batches_per_epoch + index)
        update = (index + 1) % config.accum_steps == 0
        if update:
            run.lr = run.schedule.step(state.step, _budget_used(run))
        try:
            logits, loss = train_step(run.step, images, targets, update)
        except NonFiniteLoss as error:
            bar.close()
            raise TrainingDiverged(
                f"the loss became {error.loss} at epoch {state.epoch + 1}, batch {index + 1}; stopped. "
                f"{_kept_files(run.run_dir)} {ADVICE}"
            ) from None
        state.loss_sum += loss.item() * len(labels)
        state.correct += (logits.argmax(1) == labels).sum().item()
        state.seen += len(labels)
        state.seconds = time.perf_counter() - epoch_started
        if update:
            _after_update(run, index)
        bar.update(1)
        bar.set_postfix(
            loss=f"{state.loss_sum / state.seen:.3f}",
            acc=f"{state.correct / state.seen:.1%}",
            lr=f"{run.lr:.2e}",
            img_s=f"{state.seen * run.context.world_size / state.seconds:.1f}",
        )
    bar.close()
    run.step.optimizer.zero_grad(set_to_none=True)  # a partial accumulation at the end of an epoch is dropped


def _after_update(run: _Run, index: int) -> None:
    """After optimizer step: plan the budget's epochs, validate at a --val-at-minutes mark, checkpoint."""
    state, config = run.state, run.config
    state.step += 1
    state.batches_done = index + 1
    writes = run.context.is_main and run.run_dir
    run.config = run.budget.after_step(config, run.schedule, run.elapsed(), state.step, writes)
    if run.pending_checks and _any_process(run.elapsed() >= run.pending_checks[0] * 60, run.context, run.device):
        run.pending_checks.pop(0)
        run.curve.append(_mid_epoch_check(run))
        run.budget.restart_timing()
        set_train_mode(run.net, run.trainable_from, config.bn_freeze)
    if config.checkpoint_every and state.step % config.checkpoint_every == 0:
        _save_resume_state(run)


def _end_epoch(run: _Run, loss_sum: float, correct: float, seen: float) -> None:
    """Validate, keep the best weights, write the checkpoints and metrics, decide on early stopping;
    the sums are this epoch's over all processes."""
    config, state, main, epoch = run.config, run.state, run.context.is_main, run.state.epoch
    val = evaluate(run.inputs.part(run.eval_net), run.inputs.val, config, run.device, run.step.dtype, run.context)
    run.schedule.epoch_end(val["acc"] if val else None)
    done = state.batches_done / run.batches_per_epoch
    row = {
        "epoch": epoch + 1 if done >= 1 else round(epoch + done, 3),
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "val_loss": val["loss"] if val else None,
        "val_acc": val["acc"] if val else None,
        "lr": run.lr,
        "epoch_time_s": state.seconds,
        "images_per_s": seen / state.seconds,
    }
    run.history.append(row)
    _stop_if_nonfinite(run)  # before best.pt, last.pt and state.pt
    extra = {"data": config.data, "img_size": run.img_size, "seed": config.seed}
    if val is None or val["acc"] > state.best_val_acc:
        state.best_val_acc, state.best_epoch, state.bad_epochs = (val["acc"] if val else -1.0), epoch + 1, 0
        run.best_weights = _copy_weights(run.eval_net)
        if main:
            save_model(run.run_dir / "best.pt", run.eval_net, run.splits.class_names, extra)
    else:
        state.bad_epochs += 1
    if run.stop_reason is None:  # a budget-cut epoch keeps its place and sums for a resume
        state.epoch += 1
        state.start_epoch()
        elapsed = all_reduce_sum([run.elapsed()], run.context, run.device)[0] / run.context.world_size
        run.config = config = run.budget.after_epoch(config, run.schedule, elapsed, state.epoch, main and run.run_dir)
    if main:
        save_model(run.run_dir / "last.pt", run.eval_net, run.splits.class_names, extra)
        _save_resume_state(run)
        write_metrics(run.run_dir / "metrics.csv", run.history)
        for key, value in row.items() if run.tensorboard else ():
            if key != "epoch" and value is not None:
                run.tensorboard.add_scalar(key, value, epoch + 1)
    log.info(_summary_line(row, config.epochs))
    if config.patience is not None and val and state.bad_epochs >= config.patience:
        run.stop_reason = f"early stopping: no better validation accuracy for {config.patience} epoch(s)"


def _start(job: _Job, config: TrainConfig) -> _Run:
    """Data, model, inputs (the feature cache included: the budget pays for it), step, schedule; and
    with a resume state, everything restored to where the run stopped."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    if not config.grad_checkpointing and keep_freed_memory():  # before the feature cache, which gains too
        log.info("memory: freed blocks kept for reuse, not faulted in anew each step (%s=system: not)", MALLOC_ENV)
    config, splits, net = _load(job, config, started)
    context, device, run_dir = job.context, job.device, job.run_dir
    img_size = net.pretrained_cfg["input_size"]
    flip = splits.mirror_safe if config.flip is None else config.flip
    inputs = TrainingInputs.build(net, splits, img_size, config, device, flip)
    batches_per_epoch = len(inputs.train) // context.world_size // config.batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"the training split has {len(inputs.train)} images, fewer than one batch of {config.batch_size} "
            f"per process; lower --batch-size"
        )
    net = _prepare(net, config, device)
    dtype = autocast_dtype(device, config.precision)
    lr = config.lr if config.lr is not None else default_lr(config.optimizer, _global_batch(config, context))
    step = make_step(net, config, lr, dtype, device, any_process=lambda flag: _any_process(flag, context, device))
    schedule = LRSchedule(step.optimizer, config, lr, batches_per_epoch // config.accum_steps)
    config, budget = BudgetEpochs.for_run(config, schedule.steps_per_epoch, len(inputs.val or ()), len(inputs.train))
    mixer = make_batch_mixer(len(splits.class_names), config.mixup, config.cutmix, config.seed)
    if mixer is not None and config.cache_frozen:
        # The batches are the frozen prefix's stored outputs: mixing them is manifold mixup (Verma et al.,
        # 2019) at the cut, which keeps the cache; mixing images would need the prefix on every batch.
        log.info("mixup/cutmix mix the cached features of the frozen stages, not images (--no-cache-frozen: images)")
    run = _Run(
        config=config,
        splits=splits,
        net=net,
        img_size=img_size,
        flip=flip,
        inputs=inputs,
        step=step,
        schedule=schedule,
        budget=budget,
        mixer=mixer,
        run_dir=run_dir,
        context=context,
        device=device,
        lr=lr,
        started=started,
        batches_per_epoch=batches_per_epoch,
        best_weights=_copy_weights(step.ema.module if step.ema is not None else net),
        tensorboard=_open_tensorboard(run_dir) if config.tensorboard and context.is_main else None,
    )
    if job.state:
        _restore(run, job.state)
    run.started -= run.state.elapsed_s  # the wall time of the run before this resume counts
    run.pending_checks = _pending_checks(run)
    _log_plan(config, lr, context, dtype, planned=budget.budget_s is not None and budget.chosen is None)
    return run


def _load(job: _Job, config: TrainConfig, started: float) -> tuple[TrainConfig, DataSplits, EfficientNet]:
    """The data splits and the network, with the config completed from them (and saved); `started`:
    when the budget's clock started (`--model auto` chooses for what is left of it)."""
    model, data, device = job.model, job.data, job.device
    splits = data if isinstance(data, DataSplits) else _load_splits(config)
    if (model or config.model) == AUTO_MODEL and job.state is None:
        if job.context.enabled:
            raise ConfigError("--model auto measures in one process: under torchrun name the model it chose alone")
        budget_s = config.max_minutes * 60 - (time.perf_counter() - started)
        model = choose_backbone(config, splits, device, budget_s)
        config = config.replace(model=model, pretrained=True)
    asked_size = config.img_size
    native_size = _native_size(model, config) if config.finetune == "auto" and not asked_size else None
    config = resolve_auto(config, device, native_size)
    net = _build_model(model, config, splits.class_names, job.state, job.run_dir)
    config = replace(config, model=net.config.name, data=config.data or splits.source)
    if job.context.is_main:
        config.save(job.run_dir / "config.yaml")
    log.info(
        "%s on %s: %d classes, %s train/val/test images; image size %d%s; device %s",
        config.model,
        config.data,
        len(splits.class_names),
        "/".join(str(len(s)) if s is not None else "-" for s in (splits.train, splits.val, splits.test)),
        net.pretrained_cfg["input_size"],
        _size_origin(asked_size, net.pretrained_cfg["input_size"], native_size),
        device,
    )
    return config, splits, net


def _prepare(net: EfficientNet, config: TrainConfig, device: torch.device) -> EfficientNet:
    """The network on its device in its memory format. Fusing batch norm with its activation saves
    training memory at some of the step's speed; the cached path trains only the small suffix,
    where speed is what counts."""
    net = prepare_model(net, device, config.channels_last, memory_efficient=not config.cache_frozen)
    net.set_grad_checkpointing(config.grad_checkpointing)
    if config.grad_checkpointing and release_freed_memory_eagerly():
        log.info("memory saving: activation checkpointing, and freed blocks returned to the system at once")
    return net


def _restore(run: _Run, saved: dict[str, Any]) -> None:
    """Continue from `state.pt`. Every process restores the generators rank 0 saved: all ranks seed
    alike and draw alike (dropout, drop path; data order and augmentation are seeded per epoch and
    image), so their generators are equal at any step."""
    step = run.step
    for key, component in (("optimizer", step.optimizer), ("schedule", run.schedule), ("scaler", step.scaler)):
        component.load_state_dict(saved[key])
    if step.ema is not None:
        step.ema.load_state_dict(saved["ema"])
    run.state = TrainState.from_dict(saved["progress"])
    run.restore_rng = saved["rng"]
    run.history = [row for row in saved["history"] if row["epoch"] <= run.state.epoch]
    if (run.run_dir / "best.pt").is_file():
        run.best_weights = load_model(run.run_dir / "best.pt")[0].state_dict()
    log.info("resuming %s at epoch %d, batch %d", run.run_dir, run.state.epoch + 1, run.state.batches_done)


def _set_trainable(run: _Run) -> None:
    """Freeze what the fine-tuning mode leaves frozen in this epoch and, when that changed (the first
    epoch, a "gradual" unfreeze), choose the stages' precision and rebuild the DDP/compile wrapper."""
    net, config = run.net, run.config
    trainable_from = first_trainable_part(net, config, run.state.epoch)
    if trainable_from == run.trainable_from:
        return
    run.trainable_from = trainable_from
    freeze(net, trainable_from)
    trained = run.inputs.part(net)
    set_train_mode(net, trainable_from, config.bn_freeze)
    _pick_stage_precision(run, trained)
    run.step.model = _wrap(trained, config, run.context, run.device)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    log.info("epoch %d: training %s of %s parameters", run.state.epoch + 1, f"{trainable:,}", f"{count_params(net):,}")


def _epoch_totals(run: _Run) -> list[float]:
    """This epoch's loss sum, correct and seen counts over all processes."""
    state = run.state
    return all_reduce_sum([state.loss_sum, state.correct, state.seen], run.context, run.device)


def _save_resume_state(run: _Run) -> None:
    _stop_if_nonfinite(run)
    if not run.context.is_main:
        return
    run.state.elapsed_s = run.elapsed()
    step = run.step
    save_state(
        run.run_dir / "state.pt",
        {
            "model_name": run.config.model,
            "model_config": config_to_dict(run.net.config),
            "class_names": list(run.splits.class_names),
            "model": run.net.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(),
            "scaler": step.scaler.state_dict(),
            "ema": step.ema.state_dict() if step.ema is not None else None,
            "progress": run.state.to_dict(),
            "history": run.history,
        },
    )


def _final_test(run: _Run) -> FitResult:
    """Test the best weights (with flip TTA where mirror images are of the same class) and write results.json."""
    config, splits, eval_net = run.config, run.splits, run.eval_net
    eval_net.load_state_dict(run.best_weights)
    test_set = (
        TransformedDataset(splits.test, eval_transform(run.net, run.img_size), config.seed) if splits.test else None
    )
    tta = run.flip if config.tta is None else config.tta
    test = evaluate(eval_net, test_set, config, run.device, run.step.dtype, run.context, tta=tta)
    results = _results(run, test, tta)
    if test:
        log.info("test accuracy %.2f%% (top-5 %.2f%%) on %d images", 100 * test["acc"], 100 * test["top5"], test["n"])
        if tta:
            log.info("with flip TTA (logits averaged with the mirror image's): %.2f%%", 100 * test["tta_acc"])
    if run.context.is_main:
        write_json(run.run_dir / "results.json", results)
        if run.tensorboard:
            run.tensorboard.close()
        if config.report:
            _write_report(run.run_dir, splits)
        log.info("run folder: %s", run.run_dir)
    return FitResult(eval_net, run.history, results, run.run_dir)


def _results(run: _Run, test: dict[str, float] | None, tta: bool) -> dict[str, Any]:
    config, history = run.config, run.history
    return {
        **{f"test_{key}": test[key] if test else None for key in ("acc", "top5", "loss")},
        **{f"test_{key}_tta": test[f"tta_{key}"] if test and tta else None for key in ("acc", "top5", "loss")},
        "test_images": test["n"] if test else 0,
        "best_val_acc": run.state.best_val_acc if run.inputs.val else None,
        "best_epoch": run.state.best_epoch,
        "epochs_run": len(history),
        "stop_reason": run.stop_reason or "completed",
        "wall_time_s": run.elapsed(),
        "img_size": run.img_size,
        "model": config.model,
        "data": config.data,
        "params": count_params(run.eval_net),
        "images_per_s": history[-1]["images_per_s"] if history else None,
        "device": str(run.device),
        "world_size": run.context.world_size,
        "val_at_minutes": run.curve,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset | None,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    context: DistContext = SINGLE_PROCESS,
    tta: bool = False,
) -> dict[str, float] | None:
    """Loss, top-1 and top-5 accuracy over the whole `dataset`; under DDP each process takes every
    world_size-th image and the sums are reduced, so every image counts exactly once. With `tta`
    also `tta_loss`, `tta_acc`, `tta_top5`: the same for logits averaged over each image and its
    mirror image (one more forward pass per batch)."""
    if dataset is None or len(dataset) == 0:
        return None
    if context.enabled:
        dataset = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    model.eval()
    sums = torch.zeros(7, dtype=torch.float64)  # count, then loss, top-1, top-5 single view and with TTA
    loader = make_loader(dataset, config.batch_size * 2, shuffle=False, seed=config.seed, num_workers=config.workers)
    shown = config.progress and context.is_main and len(loader) > 1  # the final test can take minutes on a CPU
    for images, labels in tqdm(loader, desc="evaluating", leave=False, disable=not shown, dynamic_ncols=True):
        images, labels = images.to(device), labels.to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(images).float()
            views = [(1, logits)] + ([(4, flip_tta(model, images, logits))] if tta else [])
        sums[0] += len(labels)
        for offset, scores in views:
            ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
            sums[offset] += nn.functional.cross_entropy(scores, labels, reduction="sum").item()
            sums[offset + 1] += (ranked[:, 0] == labels).sum().item()
            sums[offset + 2] += (ranked == labels[:, None]).any(dim=1).sum().item()
    count, *totals = all_reduce_sum(sums.tolist(), context, device)
    names = ("loss", "acc", "top5", "tta_loss", "tta_acc", "tta_top5")
    metrics = dict(zip(names, (total / count for total in totals), strict=True))
    return {key: value for key, value in metrics.items() if tta or not key.startswith("tta")} | {"n": int(count)}


# ------------------------------------------------------------------------------------------------
def _resolve_config(
    model: str | EfficientNet | None,
    data: str | DataSplits | None,
    config: TrainConfig | None,
    resume: str | Path | None,
    overrides: dict[str, Any],
    overwrite: bool = False,
) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """The run's config, resume state and folder. A resumed run starts from its saved config.yaml;
    a new run refuses a folder that already holds a run, so nothing is overwritten."""
    if resume is not None:
        run_dir = Path(resume)
        state = load_state(run_dir)
        overrides.pop("output", None)
        if isinstance(data, str):
            overrides["data"] = data  # checked against the run's classes when the model is rebuilt
        config = (config or TrainConfig.load(run_dir / "config.yaml")).replace(output=str(run_dir), **overrides)
        return config, state, run_dir
    config = (config or TrainConfig()).replace(**overrides)
    if model is not None:
        config = config.replace(model=model if isinstance(model, str) else model.config.name)
    if isinstance(data, str):
        config = config.replace(data=data)
    if not config.data and not isinstance(data, DataSplits):
        raise ValueError("no data to train on: pass digits, cifar10, cifar100, flowers102, an image folder or archive")
    run_dir = Path(config.output) if config.output else _default_run_dir(config)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(found)}). Continue it with --resume {run_dir}, "
            "choose another --output, or replace it with --overwrite."
        )
    for name in (*found, "config.yaml"):
        (run_dir / name).unlink(missing_ok=True)
    return config.replace(output=str(run_dir)), None, run_dir


def _default_run_dir(config: TrainConfig) -> Path:
    data_name = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.zip)$", "", Path(config.data.rstrip("/")).name) or "data"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return runs_dir(f"{config.model}-{re.sub(r'[^A-Za-z0-9_.-]', '_', data_name)}-{stamp}")


def _load_splits(config: TrainConfig) -> DataSplits:
    return load_data(
        config.data,
        data_dir=config.data_dir,
        val_split=config.val_split,
        seed=config.seed,
        on_bad_image=config.on_bad_image,
    )


def _build_model(
    model: str | EfficientNet | None,
    config: TrainConfig,
    class_names: list[str],
    state: dict[str, Any] | None,
    run_dir: Path | None,
) -> EfficientNet:
    """The network to train: rebuilt from the resume state, the given module with its classifier
    sized to the classes, or `create_model` at the requested resolution (so that pretrained_cfg,
    and every checkpoint, records the size actually used)."""
    if state is not None:
        check_compatible(state, model if isinstance(model, str) else state["model_name"], class_names, run_dir)
        net = EfficientNet(config_from_dict(state["model_config"]))
        net.load_state_dict(state["model"])
        return net
    if isinstance(model, EfficientNet):
        net = model
        if net.num_classes != len(class_names):
            net.reset_classifier(len(class_names))
        if config.img_size:
            preprocess = replace(net.config.preprocess, input_size=config.img_size)
            net.config = replace(net.config, preprocess=preprocess)
        if config.bn_momentum is not None:
            net.config = replace(net.config, bn_momentum=config.bn_momentum)
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = config.bn_momentum
        return net
    size = {"img_size": config.img_size} if config.img_size else {}
    momentum = {"bn_momentum": config.bn_momentum} if config.bn_momentum is not None else {}
    net = create_model(
        model or config.model,
        num_classes=len(class_names),
        pretrained=config.pretrained,
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
        **size,
        **momentum,
    )
    if config.pretrained and net.num_classes != IMAGENET_CLASSES:
        # A new head starts at zero (BiT, Kolesnikov et al. 2020): the first steps train the head
        # alone on sound features instead of back-propagating a random head's noise into them.
        nn.init.zeros_(net.classifier.weight)
        nn.init.zeros_(net.classifier.bias)
    return net


def _size_origin(asked: int | None, used: int, native: int | None) -> str:
    if asked or native is None:
        return ""
    chosen = "the model's own" if used == native else f"the CPU recipe's 6/7 of the model's {native}"
    return f" ({chosen}; --img-size to change)"


def _native_size(model: str | EfficientNet | None, config: TrainConfig) -> int:
    """The input resolution the model was built (or pretrained) for."""
    if isinstance(model, EfficientNet):
        return model.pretrained_cfg["input_size"]
    return get_config(model or config.model).preprocess.input_size


@contextlib.contextmanager
def _run_log(run_dir: Path, context: DistContext) -> Iterator[None]:
    """Log to RUN_DIR/train.log on the main process, and log why a run failed before the error
    propagates. When nothing configured logging (a notebook), the file still gets INFO records;
    the console then shows only warnings (logging's last-resort handler)."""
    if not context.is_main:
        log.setLevel(logging.WARNING)  # other processes only report problems
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    if not logging.getLogger().handlers and log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    except Exception as error:
        log.error("run failed: %s", error)
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def _wrap(net: nn.Module, config: TrainConfig, context: DistContext, device: torch.device) -> nn.Module:
    """DDP (rebuilt whenever the trainable set changes) and torch.compile around the network."""
    model: nn.Module = net
    if context.enabled:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if config.compile else model


def _pick_stage_precision(run: _Run, trained: nn.Module) -> None:
    """--precision auto under bf16 on a CPU: each stage of `trained` computes in bf16 or fp32, whichever
    trains it faster here (`runtime.choose_stage_precision`, about two training steps' time). The
    choice is rank 0's under DDP and is kept in the resume state, so a resumed run computes as before.
    Not with --grad-checkpointing: memory comes first there, and fp32 stages store twice the bytes."""
    config, device, dtype, context = run.config, run.device, run.step.dtype, run.context
    if not (config.precision == "auto" and device.type == "cpu" and dtype is torch.bfloat16):
        return
    if config.grad_checkpointing:
        return
    choose_wide_bf16_route()  # the stages' bf16 timings below depend on it
    saved = run.state.stage_precision
    if saved and saved["trainable_from"] == run.trainable_from:
        choice = saved["full_precision"]
    else:
        example = run.inputs.example(config.batch_size, run.img_size, config.channels_last).to(device)
        task = f"{config.model} from part {run.trainable_from}{' on cached features' if config.cache_frozen else ''}"
        choice = choose_stage_precision(trained, example, dtype, task=task)
        if context.enabled:  # every process computes as rank 0 does
            ours = [float(full and context.is_main) for full in choice]
            choice = [flag > 0 for flag in all_reduce_sum(ours, context, device)]
        run.state.stage_precision = {"trainable_from": run.trainable_from, "full_precision": choice}
    set_stage_precision(trained, choice)
    first = run.inputs.first_stage
    log.info(
        "precision by stage, measured here: %s",
        ", ".join(f"{first + i} {'fp32' if full else 'bf16'}" for i, full in enumerate(choice)),
    )


def _pending_checks(run: _Run) -> list[float]:
    """The --val-at-minutes marks still ahead; those the setup (the feature cache) or the run before
    a resume already passed are skipped, not all validated at once at the first step."""
    marks = run.config.val_at_minutes if run.inputs.val else []
    passed = [m for m in marks if m * 60 <= run.elapsed()]
    if passed:
        log.info("validation marks at %s min passed before training (re)started: skipped", passed)
    return [m for m in marks if m * 60 > run.elapsed()]


def _mid_epoch_check(run: _Run) -> dict[str, float]:
    """Validation at a --val-at-minutes mark; the caller puts the network back in training mode."""
    minutes = run.elapsed() / 60
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep the training stream as it was
        val = evaluate(
            run.inputs.part(run.eval_net), run.inputs.val, run.config, run.device, run.step.dtype, run.context
        )
    log.info("at %.1f min: val loss %.4f acc %.2f%%", minutes, val["loss"], 100 * val["acc"])
    return {"minutes": round(minutes, 2), "val_acc": val["acc"], "val_loss": val["loss"]}


def _epoch_bar(run: _Run) -> tqdm:
    return tqdm(
        total=run.batches_per_epoch,
        initial=run.state.batches_done,
        desc=f"epoch {run.state.epoch + 1}/{run.config.epochs}",
        disable=not run.config.progress or not run.context.is_main,
        leave=False,
        dynamic_ncols=True,
    )


def _out_of_time(run: _Run) -> bool:
    """True in every process once the budget is spent in any (checked at each optimizer step's start)."""
    spent = run.config.max_minutes is not None and run.elapsed() > run.config.max_minutes * 60
    return _any_process(spent, run.context, run.device)


def _budget_used(run: _Run) -> float:
    """The fraction of --max-minutes spent (0 without a budget), for time-based schedules."""
    return run.elapsed() / (run.config.max_minutes * 60) if run.config.max_minutes else 0.0


def _global_batch(config: TrainConfig, context: DistContext) -> int:
    return config.batch_size * config.accum_steps * context.world_size


def _copy_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _stop_if_nonfinite(run: _Run) -> None:
    """Checked before every checkpoint write: a finite loss can hide NaN BN statistics or weights."""
    step = run.step
    state = {
        "model": run.net.state_dict(),
        "ema": step.ema.state_dict() if step.ema is not None else None,
        "optimizer": step.optimizer.state_dict(),
    }
    bad = nonfinite_entries(state)
    if bad:
        raise TrainingDiverged(
            f"training diverged in epoch {run.state.epoch + 1}: {len(bad)} weights, statistics or optimizer values "
            f"are not finite (e.g. {bad[0].rstrip('.')}), so they were not saved. {_kept_files(run.run_dir)} {ADVICE}"
        )


def _log_plan(config: TrainConfig, lr: float, context: DistContext, dtype: torch.dtype | None, planned: bool) -> None:
    """One line with what the run will do; `planned`: the epochs are still to be chosen from the step time."""
    length = f"{config.epochs} epoch(s)" + (f" or {config.max_minutes:g} min" if config.max_minutes else "")
    if planned:
        length = f"as many epochs as fit {config.max_minutes:g} min (planned after the first steps)"
    log.info(
        "fine-tuning %s with %s lr %.3g (%s schedule), batch %d x %d step(s) x %d process(es), %s, precision %s%s",
        config.finetune,
        config.optimizer,
        lr,
        config.schedule,
        config.batch_size,
        config.accum_steps,
        context.world_size,
        length,
        DTYPE_NAMES[dtype],
        ", channels_last" if config.channels_last else "",
    )


def _epoch_batches(
    train_set: Dataset, config: TrainConfig, context: DistContext, epoch: int, skip: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This epoch's batches in their seeded order (shared out across processes under DDP), from batch `skip` on."""
    sampler = _distributed_sampler(train_set, context, config.seed, epoch)
    loader = make_loader(
        train_set,
        config.batch_size,
        shuffle=sampler is None,
        seed=config.seed,
        epoch=epoch,
        num_workers=config.workers,
        drop_last=True,
        sampler=sampler,
        skip_batches=skip,
    )
    return iter(loader)


def _distributed_sampler(dataset: Dataset, context: DistContext, seed: int, epoch: int) -> DistributedSampler | None:
    if not context.enabled:
        return None
    sampler = DistributedSampler(dataset, context.world_size, context.rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


def _kept_files(run_dir: Path) -> str:
    """What a stopped run leaves to go on from, naming only files that exist."""
    kept = [name for name in ("state.pt", "best.pt", "last.pt") if (run_dir / name).is_file()]
    if not kept:
        return f"No checkpoint was saved in {run_dir} yet: start again (with --overwrite)."
    resume = f"; continue with --resume {run_dir}" if "state.pt" in kept else ""
    return f"{run_dir} keeps the last finite checkpoint ({', '.join(kept)}){resume}."


def _any_process(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True if `flag` holds in any process, so that all of them stop together."""
    return all_reduce_sum([float(flag)], context, device)[0] > 0 if context.enabled else flag


def _summary_line(row: dict[str, Any], epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}" if row["val_acc"] is not None else "no val"
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}, {val}, "
        f"lr {row['lr']:.2e}, {row['images_per_s']:.1f} img/s, {row['epoch_time_s']:.0f} s"
    )


def _open_tensorboard(run_dir: Path | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard") from error
    return SummaryWriter(str(run_dir / "tensorboard"))


def _write_report(run_dir: Path, splits: DataSplits) -> None:
    """report.html from the evaluation layer, if present, on the data already in memory; a failure
    there never loses the run."""
    from effnet.evaluation.report import write_report  # the evaluation layer builds on this one

    try:
        log.info("report: %s", write_report(run_dir, data=splits))
    except Exception as error:  # the run's files are complete; the report is a bonus
        log.warning("report.html not written (%s: %s); the run is otherwise complete", type(error).__name__, error)
