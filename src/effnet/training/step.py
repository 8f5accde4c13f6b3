"""The one training step: forward, loss, backward and (every `accum_steps` batches) the update.

`fit` runs it on every batch, `effnet bench` times it (for our default path and for the peers), the
search calibrates its budget with it and the comparison measures its memory: a figure about
training speed or memory is then a figure about what `effnet train` runs. What the step needs
(the model, optimizer, loss, precision, scaler, clipping, EMA) travels as one `Step`; `make_step`
builds it from a `TrainConfig` exactly as `fit` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from effnet.profiling import random_batch
from effnet.runtime import autocast
from effnet.training.config import TrainConfig
from effnet.training.finetune import build_optimizer, param_groups


class NonFiniteLoss(ArithmeticError):
    """The loss of a batch is NaN or infinite (in any process); nothing was back-propagated."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"the loss became {loss}")
        self.loss = loss


def _local(flag: bool) -> bool:
    return flag


@dataclass
class Step:
    """What a training step reads and updates. `model` computes the logits (the network, its
    trainable suffix on cached features, or either wrapped by DDP or torch.compile); `params` is the
    module whose parameters are clipped and averaged (the unwrapped network)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: nn.Module | None = None
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    dtype: torch.dtype | None = None  # autocast dtype; None computes in fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    clip_grad: float | None = None
    accum_steps: int = 1
    ema: AveragedModel | None = None
    any_process: Callable[[bool], bool] = _local  # under DDP: true if true in any process

    def __post_init__(self) -> None:
        self.params = self.params or self.model
        self.scaler = self.scaler or torch.amp.GradScaler("cpu", enabled=False)


def train_step(step: Step, images: torch.Tensor, targets: torch.Tensor, update: bool = True) -> tuple:
    """One batch: returns (logits, loss). With `update` (the last batch of an accumulation), clip,
    step the optimizer, clear the gradients and update the EMA. Raises NonFiniteLoss before the
    backward pass when the loss is not finite, so the weights stay those of the last good step."""
    with autocast(images.device, step.dtype):
        logits = step.model(images)
        loss = step.criterion(logits.float(), targets)
    if step.any_process(not bool(torch.isfinite(loss))):
        raise NonFiniteLoss(loss.item())
    step.scaler.scale(loss / step.accum_steps).backward()
    if update:
        if step.clip_grad:
            step.scaler.unscale_(step.optimizer)
            nn.utils.clip_grad_norm_(step.params.parameters(), step.clip_grad)
        step.scaler.step(step.optimizer)
        step.scaler.update()
        step.optimizer.zero_grad(set_to_none=True)
        if step.ema is not None:
            step.ema.update_parameters(step.params)
    return logits, loss


def make_step(
    net: nn.Module,
    config: TrainConfig,
    lr: float,
    dtype: torch.dtype | None,
    device: torch.device,
    model: nn.Module | None = None,
    any_process: Callable[[bool], bool] = _local,
) -> Step:
    """The step `fit` runs for `config` on `net` (optimizer with its parameter groups, label
    smoothing, fp16 scaler, clipping, accumulation, EMA); `model` is what computes (default `net`)."""
    return Step(
        model=model or net,
        optimizer=build_optimizer(param_groups(net, config), config, lr),
        params=net,
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        dtype=dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype is torch.float16),
        clip_grad=config.clip_grad,
        accum_steps=config.accum_steps,
        ema=make_ema(net, config.ema_decay) if config.ema else None,
        any_process=any_process,
    )


def make_ema(net: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of weights and BN statistics, with timm's warm-up
    (decay = min(decay, (1 + n) / (10 + n))) so short runs are not dominated by the start."""

    def update(average: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        rate = 1 - torch.clamp((1 + count) / (10 + count), max=decay)
        return average + (current - average) * rate.to(average.dtype) if average.is_floating_point() else current

    return AveragedModel(net, avg_fn=update, use_buffers=True)


def fixed_batch_step(step: Step, batch_size: int, img_size: int, num_classes: int) -> partial:
    """`train_step` on one random batch, as a call without arguments for the timers and memory
    probes (images on the model's device in its weights' memory format, as `fit` feeds them)."""
    images = random_batch(step.params, batch_size, img_size)
    labels = torch.randint(0, num_classes, (batch_size,), generator=torch.Generator().manual_seed(0))
    return partial(train_step, step, images, labels.to(images.device))
