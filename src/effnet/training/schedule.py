"""Learning-rate schedules, per optimizer step: linear warmup, then cosine decay, a step decay, or
reduce-on-plateau of the validation accuracy.

With a wall-clock budget (`max_minutes`) the cosine follows whichever is further along, the steps or
the clock, so the LR has annealed when the budget ends instead of being cut off at a high value.

One small class instead of chaining torch's schedulers: warmup must compose with ReduceLROnPlateau,
which torch's SequentialLR cannot do, and each group keeps its own `lr_scale` (layer decay).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effnet.training.config import TrainConfig

log = logging.getLogger("effnet")
DEFAULT_EPOCHS = 3  # without max_minutes, or until the budget's epochs are chosen
BUDGET_PROBE_STEPS = 8  # optimizer steps timed (after the first, which pays one-off costs) to plan the budget
EVAL_COST = 1 / 3  # a forward pass of a batch, as a share of a training step (no backward, no update)


class LRSchedule:
    """lr of a group at step s = base_lr * group['lr_scale'] * warmup(s) * decay(s)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, base_lr: float, steps_per_epoch: int):
        self.optimizer, self.config, self.base_lr = optimizer, config, base_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.set_epochs(config.epochs or DEFAULT_EPOCHS)
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -math.inf, 0

    def set_epochs(self, epochs: int) -> None:
        """Plan `epochs` epochs: the cosine ends, and the automatic warmup (5%) is measured, on them."""
        self.total_steps = self.steps_per_epoch * epochs
        auto_warmup = math.ceil(0.05 * self.total_steps)
        self.warmup_steps = auto_warmup if self.config.warmup_steps is None else self.config.warmup_steps

    def extend(self, epochs: int) -> None:
        """Lengthen the plan to `epochs` epochs, keeping the warmup already under way."""
        self.total_steps = self.steps_per_epoch * epochs

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
        """The plateau's state. The planned length is not in it: it is the config's epochs (a budget's
        plan is written to config.yaml), which a resumed run may change."""
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], int(state["bad_epochs"])


def epochs_for_budget(
    budget_s: float, elapsed_s: float, step_s: float, steps_done: int, steps_per_epoch: int, eval_share: float = 0.0
) -> int:
    """The number of epochs whose schedule ends at the budget: the time left when the first step
    started, over an epoch's measured cost (its steps and `eval_share` of them for validation),
    rounded up. The clock then stops the last epoch at the budget with the LR annealed (the cosine
    follows the clock too), so the whole budget trains; rounding to the nearest epoch left up to half
    an epoch unused (a fifth of the budget at 3 epochs), and later epochs often run slower than the
    steps the plan timed."""
    if step_s <= 0 or steps_per_epoch < 1:
        raise ValueError(f"epochs_for_budget needs a positive step time and epoch, got {step_s} s, {steps_per_epoch}")
    since_first_step = budget_s - elapsed_s + steps_done * step_s
    epoch_s = step_s * steps_per_epoch * (1 + eval_share)
    return max(1, math.ceil(since_first_step / epoch_s - 1e-9))


@dataclass
class BudgetEpochs:
    """`max_minutes` without `epochs`: times the BUDGET_PROBE_STEPS optimizer steps after the first this
    process takes (after the feature cache and any precision probe, which the budget has paid already)
    and then plans the schedule to end at the budget. `eval_share`: validation's cost per training step."""

    budget_s: float | None
    steps_per_epoch: int
    eval_share: float = 0.0
    chosen: int | None = None
    _start: tuple[int, float] | None = field(default=None, repr=False)  # (step, elapsed s) timing began
    _epoch_began: tuple[int, float] | None = field(default=None, repr=False)  # (step, elapsed s) of the epoch's timing
    _planned_epoch_s: float = field(default=0.0, repr=False)

    @classmethod
    def for_run(
        cls, config: TrainConfig, steps_per_epoch: int, val_items: int, train_items: int
    ) -> tuple[TrainConfig, BudgetEpochs]:
        """The config to start with (epochs None becomes DEFAULT_EPOCHS until the plan) and the planner;
        validation passes over `val_items` at EVAL_COST of a training step per item."""
        planned = config.epochs is None and config.max_minutes is not None
        share = EVAL_COST * val_items / max(1, train_items)
        planner = cls(config.max_minutes * 60 if planned else None, steps_per_epoch, share)
        return config.replace(epochs=config.epochs or DEFAULT_EPOCHS), planner

    def restart_timing(self) -> None:
        """Forget the steps timed so far: something other than training ran between them (a
        --val-at-minutes validation), and the plan must rest on the cost of training steps alone."""
        self._start = None

    def after_step(
        self, config: TrainConfig, schedule: LRSchedule, elapsed_s: float, step: int, run_dir: Path | bool = False
    ) -> TrainConfig:
        """Call after optimizer step `step` (a 1-based count); returns the config, with its epochs set
        once they are chosen (and saved as `run_dir`/config.yaml when given, so that a resumed run
        keeps them; False on the processes that do not write the run folder)."""
        if self.budget_s is None or self.chosen is not None:
            return config
        if self._epoch_began is None:
            self._epoch_began = (step, elapsed_s)
        if self._start is None:
            self._start = (step, elapsed_s)
        if step < self._start[0] + BUDGET_PROBE_STEPS:
            return config
        step_s = (elapsed_s - self._start[1]) / (step - self._start[0])
        self.chosen = epochs_for_budget(self.budget_s, elapsed_s, step_s, step, self.steps_per_epoch, self.eval_share)
        schedule.set_epochs(self.chosen)
        self._planned_epoch_s = step_s * self.steps_per_epoch * (1 + self.eval_share)
        log.info(
            "budget of %g min: %.2f s per step, %d steps per epoch: %d epoch(s) end the schedule at the budget",
            self.budget_s / 60,
            step_s,
            self.steps_per_epoch,
            self.chosen,
        )
        return _with_epochs(config, self.chosen, run_dir)

    def after_epoch(
        self,
        config: TrainConfig,
        schedule: LRSchedule,
        elapsed_s: float,
        epochs_done: int,
        run_dir: Path | bool = False,
    ) -> TrainConfig:
        """Call at the end of each whole epoch (`epochs_done` so far). Where epochs run faster than the
        steps the plan timed (a run's first steps are slow: allocations, kernel choice, a cold cache),
        plan more of them, so that the clock, not the plan, ends the run at the budget. Only while the
        plan has epochs ahead: the cosine follows the clock whenever it is further along, so
        lengthening the plan then leaves the LR where it was; at the plan's end it has annealed, and
        lengthening it would raise the LR again."""
        if self.budget_s is None or self.chosen is None or self._epoch_began is None:
            return config
        began_step, began_s = self._epoch_began
        steps = epochs_done * self.steps_per_epoch - began_step  # the first epoch's is timed from its first step's end
        self._epoch_began = (epochs_done * self.steps_per_epoch, elapsed_s)
        if epochs_done >= self.chosen or steps <= 0 or elapsed_s <= began_s:
            return config
        epoch_s = (elapsed_s - began_s) * self.steps_per_epoch / steps
        wanted = epochs_done + math.ceil((self.budget_s - elapsed_s) / epoch_s - 1e-9)
        if wanted <= self.chosen:
            return config
        log.info(
            "budget of %g min: an epoch took %.0f s, not the %.0f s planned: %d epochs, not %d, end at the budget",
            self.budget_s / 60,
            epoch_s,
            self._planned_epoch_s,
            wanted,
            self.chosen,
        )
        self.chosen = wanted
        schedule.extend(wanted)
        return _with_epochs(config, wanted, run_dir)


def _with_epochs(config: TrainConfig, epochs: int, run_dir: Path | bool) -> TrainConfig:
    """`config` planned for `epochs`, saved as `run_dir`/config.yaml when given (a resumed run keeps them)."""
    config = config.replace(epochs=epochs)
    if run_dir:
        config.save(Path(run_dir) / "config.yaml")
    return config
