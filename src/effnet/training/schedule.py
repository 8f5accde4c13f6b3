"""Learning-rate schedules, per optimizer step: linear warmup, then cosine decay, a step decay, or
reduce-on-plateau of the validation accuracy.

With a wall-clock budget (`max_minutes`) the cosine follows whichever is further along, the steps or
the clock, so the LR has annealed when the budget ends instead of being cut off at a high value.

One small class instead of chaining torch's schedulers: warmup must compose with ReduceLROnPlateau,
which torch's SequentialLR cannot do, and each group keeps its own `lr_scale` (layer decay).
"""

from __future__ import annotations

import math

import torch

from effnet.training.config import TrainConfig


class LRSchedule:
    """lr of a group at step s = base_lr * group['lr_scale'] * warmup(s) * decay(s)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, base_lr: float, steps_per_epoch: int):
        self.optimizer, self.config, self.base_lr = optimizer, config, base_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = self.steps_per_epoch * config.epochs
        auto_warmup = math.ceil(0.05 * self.total_steps)
        self.warmup_steps = auto_warmup if config.warmup_steps is None else config.warmup_steps
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -math.inf, 0

    def factor(self, step: int, time_fraction: float = 0.0) -> float:
        config = self.config
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        floor = config.min_lr / self.base_lr if self.base_lr > 0 else 0.0
        if config.schedule == "cosine":
            progress = min(1.0, max(step / max(1, self.total_steps - 1), time_fraction))
            decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif config.schedule == "step":
            decay = config.step_gamma ** (step // (self.steps_per_epoch * config.step_epochs))
        else:
            decay = self.plateau_scale
        return warmup * max(decay, floor)

    def step(self, step: int, time_fraction: float = 0.0) -> float:
        """Set every group's lr for optimizer step `step` (`time_fraction`: share of the time budget
        used); returns the base lr used."""
        factor = self.factor(step, time_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_scale", 1.0) * factor
        return self.base_lr * factor

    def epoch_end(self, val_acc: float | None) -> None:
        """Plateau: multiply by plateau_factor after plateau_patience epochs without improvement."""
        if self.config.schedule != "plateau" or val_acc is None:
            return
        if val_acc > self.best:
            self.best, self.bad_epochs = val_acc, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.config.plateau_patience:
            self.plateau_scale *= self.config.plateau_factor
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], int(state["bad_epochs"])
