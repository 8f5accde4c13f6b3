"""`fit`: fine-tune an EfficientNet on a data set, writing a run folder that survives a SIGKILL.

The loop is deliberately one readable pass (nanoGPT-style): build, then for each epoch freeze
what the fine-tuning mode says, run the optimizer steps, validate, checkpoint; then test the best
weights. Everything else (freezing, parameter groups, schedules, state files, processes) lives in
the sibling modules.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm import tqdm

from effnet.data import DataSplits, TransformedDataset, build_transforms, load_data, make_batch_mixer, make_loader
from effnet.models.checkpoint import config_from_dict, config_to_dict, load_model, save_model
from effnet.models.efficientnet import EfficientNet
from effnet.models.registry import create_model, get_config
from effnet.paths import runs_dir
from effnet.profiling import count_params
from effnet.runtime import (
    autocast,
    autocast_dtype,
    choose_stage_precision,
    pick_device,
    prepare_model,
    release_freed_memory_eagerly,
    set_stage_precision,
)
from effnet.training.cached import build_feature_cache, frozen_stage_count, trainable_suffix
from effnet.training.checkpoint import (
    RUN_FILES,
    check_compatible,
    load_state,
    nonfinite_entries,
    save_state,
    set_rng_state,
    write_json,
    write_metrics,
)
from effnet.training.config import TrainConfig, default_lr
from effnet.training.distributed import DistContext, all_reduce_sum, init_distributed, shutdown
from effnet.training.finetune import (
    build_optimizer,
    first_trainable_part,
    freeze,
    param_groups,
    resolve_auto,
    set_train_mode,
)
from effnet.training.schedule import BudgetEpochs, LRSchedule

log = logging.getLogger("effnet")
SINGLE_PROCESS = DistContext()
IMAGENET_CLASSES = 1000
DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run folder keeps the last good checkpoint."""


@dataclass
class FitResult:
    model: EfficientNet  # the best weights by validation accuracy (EMA weights with ema=True)
    history: list[dict[str, Any]]  # one row per epoch, as in metrics.csv
    results: dict[str, Any]  # as in results.json
    run_dir: Path | None


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
            return _train(model, data, config, state, run_dir, context, device)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        shutdown(context)


def _train(
    model: str | EfficientNet | None,
    data: str | DataSplits | None,
    config: TrainConfig,
    state: dict[str, Any] | None,
    run_dir: Path,
    context: DistContext,
    device: torch.device,
) -> FitResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    asked_size = config.img_size
    native_size = _native_size(model, config) if config.finetune == "auto" and not asked_size else None
    config = resolve_auto(config, device, native_size)
    splits = data if isinstance(data, DataSplits) else _load_splits(config)
    net = _build_model(model, config, splits.class_names, state, run_dir)
    config = replace(config, model=_model_name(net), data=config.data or splits.source)
    if context.is_main:
        config.save(run_dir / "config.yaml")
    img_size = net.pretrained_cfg["input_size"]
    log.info(
        "%s on %s: %d classes, %s train/val/test images; image size %d%s; device %s",
        config.model,
        config.data,
        len(splits.class_names),
        "/".join(str(len(s)) if s is not None else "-" for s in (splits.train, splits.val, splits.test)),
        img_size,
        _size_origin(asked_size, img_size, native_size),
        device,
    )

    flip = splits.mirror_safe if config.flip is None else config.flip
    train_set, val_set, cut = _training_sets(net, splits, img_size, config, device, flip)
    batches_per_epoch = len(train_set) // context.world_size // config.batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"the training split has {len(train_set)} images, fewer than one batch of {config.batch_size} "
            f"per process; lower --batch-size"
        )

    # Fusing batch norm with its activation saves training memory at ~10% of the step's speed; the
    # cached path trains only the small suffix, where speed is what counts.
    net = prepare_model(net, device, config.channels_last, memory_efficient=not config.cache_frozen)
    net.set_grad_checkpointing(config.grad_checkpointing)
    if config.grad_checkpointing and release_freed_memory_eagerly():
        log.info("memory saving: activation checkpointing, and freed blocks returned to the system at once")
    dtype = autocast_dtype(device, config.precision)
    ema = _make_ema(net, config.ema_decay) if config.ema else None
    eval_net = ema.module if ema else net
    batch = config.batch_size * config.accum_steps * context.world_size
    lr = config.lr if config.lr is not None else default_lr(config.optimizer, batch)
    optimizer = build_optimizer(param_groups(net, config), config, lr)
    schedule = LRSchedule(optimizer, config, lr, batches_per_epoch // config.accum_steps)
    config, budget = BudgetEpochs.for_run(config, schedule.steps_per_epoch, len(val_set or ()), len(train_set))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    mixer = make_batch_mixer(len(splits.class_names), config.mixup, config.cutmix, config.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    tensorboard = _open_tensorboard(run_dir) if config.tensorboard and context.is_main else None
    current_lr = lr
    _log_plan(config, lr, context, dtype)

    progress = {"epoch": 0, "batches_done": 0, "step": 0, "best_val_acc": -1.0, "best_epoch": 0, "bad_epochs": 0}
    progress |= {"elapsed_s": 0.0, "partial": [0.0, 0.0, 0.0, 0.0]}  # loss sum, correct, seen, seconds
    history: list[dict[str, Any]] = []
    best_state = {k: v.detach().clone() for k, v in eval_net.state_dict().items()}
    restore_rng = None
    if state:
        # Every process restores the RNG state rank 0 saved: all ranks seed alike and draw alike
        # (dropout, drop path; data order and augmentation are seeded per epoch and image), so
        # their generators are equal at any step.
        for key, component in (("optimizer", optimizer), ("schedule", schedule), ("scaler", scaler), ("ema", ema)):
            if component is not None:
                component.load_state_dict(state[key])
        progress, restore_rng = dict(state["progress"]), state["rng"]
        history = [row for row in state["history"] if row["epoch"] <= progress["epoch"]]
        if (run_dir / "best.pt").is_file():
            best_state = load_model(run_dir / "best.pt")[0].state_dict()
        log.info("resuming %s at epoch %d, batch %d", run_dir, progress["epoch"] + 1, progress["batches_done"])

    elapsed_before = progress["elapsed_s"]  # wall time of the run before this resume
    pending_checks = [m for m in config.val_at_minutes if m * 60 > elapsed_before] if val_set else []
    curve: list[dict[str, float]] = []  # mid-epoch validation (--val-at-minutes), in results.json

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def save_resume_state() -> None:
        _stop_if_nonfinite(run_dir, progress["epoch"], net, ema, optimizer)
        if context.is_main:
            progress["elapsed_s"] = elapsed()
            save_state(
                run_dir / "state.pt",
                {
                    "model_name": config.model,
                    "model_config": config_to_dict(net.config),
                    "class_names": list(splits.class_names),
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema else None,
                    "progress": progress,
                    "history": history,
                },
            )

    stop_reason, trainable_from, train_model = None, None, net
    extra = {"data": config.data, "img_size": img_size, "seed": config.seed}
    while progress["epoch"] < config.epochs and stop_reason is None:
        epoch = progress["epoch"]
        if first_trainable_part(net, config, epoch) != trainable_from:  # first epoch, or "gradual" unfreezes
            trainable_from = first_trainable_part(net, config, epoch)
            freeze(net, trainable_from)
            trained = net if cut is None else trainable_suffix(net, cut)
            set_train_mode(net, trainable_from, config.bn_freeze)
            _pick_stage_precision(
                trained, cut, trainable_from, train_set, img_size, config, device, dtype, context, progress
            )
            train_model = _wrap(trained, config, context, device)
            trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
            log.info("epoch %d: training %s of %s parameters", epoch + 1, f"{trainable:,}", f"{count_params(net):,}")
        train_set.set_epoch(epoch)
        batches = _epoch_batches(train_set, config, context, epoch, progress["batches_done"])
        if restore_rng:  # after creating the loader iterator, which may draw from the global generator
            set_rng_state(restore_rng)
            restore_rng = None
        set_train_mode(net, trainable_from, config.bn_freeze)
        loss_sum, correct, seen, seconds = progress["partial"]
        tick = time.perf_counter()
        bar = tqdm(
            total=batches_per_epoch,
            initial=progress["batches_done"],
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not config.progress or not context.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        for index, (images, labels) in enumerate(batches, start=progress["batches_done"]):
            at_step_start = index % config.accum_steps == 0
            out_of_time = at_step_start and config.max_minutes is not None and elapsed() > config.max_minutes * 60
            if _any_process(out_of_time, context, device):
                stop_reason = f"time budget of {config.max_minutes:g} min reached"
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels, epoch * batches_per_epoch + index)
            with autocast(device, dtype):
                logits = train_model(images)
                loss = criterion(logits.float(), targets)
            if _any_process(not torch.isfinite(loss).item(), context, device):
                bar.close()
                raise TrainingDiverged(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, batch {index + 1}; stopped. "
                    f"{_kept_files(run_dir)} Try a lower --lr, --clip-grad 1.0 or --precision fp32."
                )
            scaler.scale(loss / config.accum_steps).backward()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            if (index + 1) % config.accum_steps == 0:
                budget_used = elapsed() / (config.max_minutes * 60) if config.max_minutes else 0.0
                current_lr = schedule.step(progress["step"], budget_used)
                if config.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update_parameters(net)
                progress["step"] += 1
                config = budget.after_step(config, schedule, elapsed(), progress["step"], context.is_main and run_dir)
                progress["batches_done"] = index + 1
                if pending_checks and _any_process(elapsed() >= pending_checks[0] * 60, context, device):
                    pending_checks.pop(0)
                    curve.append(_mid_epoch_check(eval_net, cut, val_set, config, device, dtype, context, elapsed()))
                    set_train_mode(net, trainable_from, config.bn_freeze)
                if config.checkpoint_every and progress["step"] % config.checkpoint_every == 0:
                    progress["partial"] = [loss_sum, correct, seen, seconds + time.perf_counter() - tick]
                    save_resume_state()
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.1%}",
                lr=f"{current_lr:.2e}",
                img_s=f"{seen * context.world_size / (seconds + time.perf_counter() - tick):.1f}",
            )
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation at the end of an epoch is dropped
        seconds += time.perf_counter() - tick
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], context, device)
        if seen == 0:  # the time budget ran out before this epoch's first batch
            save_resume_state()
            break

        val = evaluate(_val_model(eval_net, cut), val_set, config, device, dtype, context) if val_set else None
        schedule.epoch_end(val["acc"] if val else None)
        done = progress["batches_done"] / batches_per_epoch
        row = {
            "epoch": epoch + 1 if done >= 1 else round(epoch + done, 3),
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val["loss"] if val else None,
            "val_acc": val["acc"] if val else None,
            "lr": current_lr,
            "epoch_time_s": seconds,
            "images_per_s": seen / seconds,
        }
        history.append(row)
        _stop_if_nonfinite(run_dir, epoch, net, ema, optimizer)  # before best.pt, last.pt and state.pt
        if val is None or val["acc"] > progress["best_val_acc"]:
            progress.update(best_val_acc=val["acc"] if val else -1.0, best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k: v.detach().clone() for k, v in eval_net.state_dict().items()}
            if context.is_main:
                save_model(run_dir / "best.pt", eval_net, splits.class_names, extra)
        else:
            progress["bad_epochs"] += 1
        if stop_reason is None:
            progress.update(epoch=epoch + 1, batches_done=0)
        progress["partial"] = [0.0, 0.0, 0.0, 0.0] if stop_reason is None else [loss_sum, correct, seen, seconds]
        if context.is_main:
            save_model(run_dir / "last.pt", eval_net, splits.class_names, extra)
            save_resume_state()
            write_metrics(run_dir / "metrics.csv", history)
            if tensorboard:
                for key, value in row.items():
                    if key != "epoch" and value is not None:
                        tensorboard.add_scalar(key, value, epoch + 1)
        log.info(_summary_line(row, config.epochs))
        if config.patience is not None and val and progress["bad_epochs"] >= config.patience:
            stop_reason = f"early stopping: no better validation accuracy for {config.patience} epoch(s)"
    if stop_reason:
        log.info("stopped: %s", stop_reason)

    eval_net.load_state_dict(best_state)
    test_set = TransformedDataset(splits.test, _eval_transform(net, img_size), config.seed) if splits.test else None
    tta = flip if config.tta is None else config.tta
    test = evaluate(eval_net, test_set, config, device, dtype, context, tta=tta)
    results = {
        **{f"test_{key}": test[key] if test else None for key in ("acc", "top5", "loss")},
        **{f"test_{key}_tta": test[f"tta_{key}"] if test and tta else None for key in ("acc", "top5", "loss")},
        "test_images": test["n"] if test else 0,
        "best_val_acc": progress["best_val_acc"] if val_set else None,
        "best_epoch": progress["best_epoch"],
        "epochs_run": len(history),
        "stop_reason": stop_reason or "completed",
        "wall_time_s": elapsed(),
        "img_size": img_size,
        "model": config.model,
        "data": config.data,
        "params": count_params(eval_net),
        "images_per_s": history[-1]["images_per_s"] if history else None,
        "device": str(device),
        "world_size": context.world_size,
        "val_at_minutes": curve,
    }
    if test:
        log.info("test accuracy %.2f%% (top-5 %.2f%%) on %d images", 100 * test["acc"], 100 * test["top5"], test["n"])
        if tta:
            log.info("with flip TTA (logits averaged with the mirror image's): %.2f%%", 100 * test["tta_acc"])
    if context.is_main:
        write_json(run_dir / "results.json", results)
        if tensorboard:
            tensorboard.close()
        if config.report:
            _write_report(run_dir, splits)
        log.info("run folder: %s", run_dir)
    return FitResult(eval_net, history, results, run_dir)


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
            views = [(1, logits)] + ([(4, (logits + model(images.flip(3)).float()) / 2)] if tta else [])
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
        config = config.replace(model=model if isinstance(model, str) else _model_name(model))
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


def _model_name(net: EfficientNet) -> str:
    return getattr(net, "model_name", net.config.name)


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
        net.model_name = state["model_name"]
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


def _make_ema(net: EfficientNet, decay: float) -> AveragedModel:
    """Exponential moving average of weights and BN statistics, with timm's warm-up
    (decay = min(decay, (1 + n) / (10 + n))) so short runs are not dominated by the start."""

    def update(average: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        rate = 1 - torch.clamp((1 + count) / (10 + count), max=decay)
        return average + (current - average) * rate.to(average.dtype) if average.is_floating_point() else current

    return AveragedModel(net, avg_fn=update, use_buffers=True)


def _val_model(eval_net: EfficientNet, cut: int | None) -> nn.Module:
    """The evaluated network, or with cached features its part after the frozen prefix."""
    return eval_net if cut is None else trainable_suffix(eval_net, cut)


def _mid_epoch_check(
    eval_net: EfficientNet,
    cut: int | None,
    val_set: Dataset,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    context: DistContext,
    seconds: float,
) -> dict[str, float]:
    """Validation at a --val-at-minutes mark; the caller puts the network back in training mode."""
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep the training stream as it was
        val = evaluate(_val_model(eval_net, cut), val_set, config, device, dtype, context)
    log.info("at %.1f min: val loss %.4f acc %.2f%%", seconds / 60, val["loss"], 100 * val["acc"])
    return {"minutes": round(seconds / 60, 2), "val_acc": val["acc"], "val_loss": val["loss"]}


def _wrap(net: nn.Module, config: TrainConfig, context: DistContext, device: torch.device) -> nn.Module:
    """DDP (rebuilt whenever the trainable set changes) and torch.compile around the network."""
    model: nn.Module = net
    if context.enabled:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if config.compile else model


def _pick_stage_precision(
    trained: nn.Module,
    cut: int | None,
    trainable_from: int,
    train_set: Dataset,
    img_size: int,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    context: DistContext,
    progress: dict[str, Any],
) -> None:
    """--precision auto under bf16 on a CPU: each stage of `trained` computes in bf16 or fp32, whichever
    trains it faster here (`runtime.choose_stage_precision`, ~2 training steps' time). The choice
    is rank 0's under DDP and is kept in the resume state, so a resumed run computes as before.
    Not with --grad-checkpointing: memory comes first there, and fp32 stages store twice the bytes."""
    if not (config.precision == "auto" and device.type == "cpu" and dtype is torch.bfloat16):
        return
    if config.grad_checkpointing:
        return
    saved = progress.get("stage_precision")
    if saved and saved["trainable_from"] == trainable_from:
        choice = saved["full_precision"]
    else:
        if config.cache_frozen:  # a batch of stored features, as the loop feeds them
            example = train_set.features[0, : config.batch_size].float()
        else:
            example = torch.randn(config.batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        if config.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        task = f"{config.model} from part {trainable_from}{' on cached features' if config.cache_frozen else ''}"
        choice = choose_stage_precision(trained, example.to(device), dtype, task=task)
        if context.enabled:  # every process computes as rank 0 does
            ours = [float(full and context.is_main) for full in choice]
            choice = [flag > 0 for flag in all_reduce_sum(ours, context, device)]
        progress["stage_precision"] = {"trainable_from": trainable_from, "full_precision": choice}
    set_stage_precision(trained, choice)
    first = 1 + (cut or 0)
    log.info(
        "precision by stage, measured here: %s",
        ", ".join(f"{first + i} {'fp32' if full else 'bf16'}" for i, full in enumerate(choice)),
    )


def _log_plan(config: TrainConfig, lr: float, context: DistContext, dtype: torch.dtype | None) -> None:
    log.info(
        "fine-tuning %s with %s lr %.3g (%s schedule), batch %d x %d step(s) x %d process(es), %s, precision %s%s",
        config.finetune,
        config.optimizer,
        lr,
        config.schedule,
        config.batch_size,
        config.accum_steps,
        context.world_size,
        f"{config.epochs} epoch(s)" + (f" or {config.max_minutes:g} min" if config.max_minutes else ""),
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


def _stop_if_nonfinite(
    run_dir: Path, epoch: int, net: nn.Module, ema: AveragedModel | None, optimizer: torch.optim.Optimizer
) -> None:
    """Checked before every checkpoint write: a finite loss can hide NaN BN statistics or weights."""
    state = {"model": net.state_dict(), "ema": ema.state_dict() if ema else None, "optimizer": optimizer.state_dict()}
    bad = nonfinite_entries(state)
    if bad:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: {len(bad)} weights, statistics or optimizer values are not "
            f"finite (e.g. {bad[0].rstrip('.')}), so they were not saved. {_kept_files(run_dir)} "
            "Try a lower --lr, --clip-grad 1.0 or --precision fp32."
        )


def _any_process(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True if `flag` holds in any process, so that all of them stop together."""
    return all_reduce_sum([float(flag)], context, device)[0] > 0 if context.enabled else flag


def _eval_transform(net: EfficientNet, img_size: int) -> Any:
    return build_transforms(net.pretrained_cfg, train=False, img_size=img_size)


def _training_sets(
    net: EfficientNet, splits: DataSplits, img_size: int, config: TrainConfig, device: torch.device, flip: bool
) -> tuple[Dataset, Dataset | None, int | None]:
    """The training and validation sets the loop reads: augmented images and evaluation-transformed
    images, or with --cache-frozen the frozen prefix's stored outputs; and the number of frozen
    stages whose outputs are cached (None without the cache)."""
    if config.cache_frozen:
        cut = frozen_stage_count(first_trainable_part(net, config, 0))
        return (*build_feature_cache(net, cut, splits.train, splits.val, img_size, config, device, flip), cut)
    train_transform = build_transforms(
        net.pretrained_cfg, train=True, augment=config.augment, img_size=img_size, flip=flip
    )
    train_set = TransformedDataset(splits.train, train_transform, config.seed)
    val_set = TransformedDataset(splits.val, _eval_transform(net, img_size), config.seed) if splits.val else None
    return train_set, val_set, None


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
    try:
        from effnet.evaluation.report import write_report
    except ImportError:
        log.info("no report.html: effnet.evaluation.report is not available")
        return
    try:
        log.info("report: %s", write_report(run_dir, data=splits))
    except Exception as error:  # the run's files are complete; the report is a bonus
        log.warning("report.html not written (%s: %s); the run is otherwise complete", type(error).__name__, error)
