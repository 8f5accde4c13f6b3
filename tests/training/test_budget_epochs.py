"""`--max-minutes` without `--epochs`: the epochs are chosen from the measured step time so that the
schedule ends at the budget (simulated with a fake clock: the loop's logic, not a 10-minute run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effnet.training.config import TrainConfig
from effnet.training.schedule import BUDGET_PROBE_STEPS, DEFAULT_EPOCHS, BudgetEpochs, LRSchedule, epochs_for_budget


def _schedule(config: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return LRSchedule(optimizer, config, 0.1, steps_per_epoch)


def _simulate(
    config: TrainConfig,
    cache_s: float,
    step_s: float,
    steps_per_epoch: int,
    val_s: float,
    run_dir=False,
    slow_steps: int = 0,
    lrs: list[float] | None = None,
):
    """The engine's loop on a fake clock: the cache, then steps of `step_s` (the first `slow_steps`
    of them twice as long) and a validation pass of `val_s` per epoch, stopped by the epochs or by
    the clock as `engine._train` does; each step's lr is appended to `lrs`."""
    schedule = _schedule(config, steps_per_epoch)
    config, budget = BudgetEpochs.for_run(config, steps_per_epoch, val_items=100, train_items=1000)
    clock, step, epoch, last_lr = cache_s, 0, 0, None
    while epoch < config.epochs:
        for _ in range(steps_per_epoch):
            if config.max_minutes is not None and clock > config.max_minutes * 60:
                return config, schedule, clock, last_lr
            clock += step_s * (2 if step < slow_steps else 1)
            last_lr = schedule.step(step, clock / (config.max_minutes * 60) if config.max_minutes else 0.0)
            if lrs is not None:
                lrs.append(last_lr)
            step += 1
            config = budget.after_step(config, schedule, clock, step, run_dir)
        clock += val_s
        epoch += 1
        config = budget.after_epoch(config, schedule, clock, epoch, run_dir)
    return config, schedule, clock, last_lr


def test_epochs_for_budget_rounds_up_so_that_the_clock_ends_the_last_epoch() -> None:
    # 510 s left when stepping began, epochs of 20 steps x 2 s (+10% validation) = 44 s: 11.6 -> 12.
    assert epochs_for_budget(600, 90 + 16, 2.0, 8, 20, eval_share=0.1) == 12
    assert epochs_for_budget(600, 90 + 16 + 17, 2.0, 8, 20, eval_share=0.1) == 12  # 11.2: 12, not 11
    assert epochs_for_budget(600, 0, 2.0, 0, 30) == 10  # exactly 10 fit: no 11th
    assert epochs_for_budget(600, 599, 2.0, 0, 20) == 1  # never fewer than one
    with pytest.raises(ValueError, match="positive step time"):
        epochs_for_budget(600, 0, 0.0, 0, 20)


# Epochs by hand: the time left after the cache over an epoch's steps plus 1/30 for validation, rounded up,
# e.g. 510 s / (48 x 1.6 s x 31/30) = 6.4 -> 7. Three epochs would have ended at 330 s, 46 s and 820 s.
@pytest.mark.parametrize(
    ("cache_s", "step_s", "steps_per_epoch", "epochs"), [(90.0, 1.6, 48, 7), (30.0, 0.4, 12, 115), (200.0, 5.0, 40, 2)]
)
def test_ten_minute_budget_trains_nine_to_ten_minutes(
    cache_s: float, step_s: float, steps_per_epoch: int, epochs: int
) -> None:
    config = TrainConfig(max_minutes=10)
    val_s = step_s * steps_per_epoch / 30  # as the planner estimates it: 100 of 1000 items at 1/3 of a step
    final, schedule, clock, last_lr = _simulate(config, cache_s, step_s, steps_per_epoch, val_s)
    assert 9 * 60 <= clock <= 10 * 60 + step_s + val_s, clock
    assert final.epochs == epochs
    assert schedule.total_steps == final.epochs * steps_per_epoch
    assert last_lr < 0.1 * 0.02  # the cosine has annealed by the end: it ended at the budget, not before


def test_fixed_epochs_are_kept_and_the_earlier_limit_wins() -> None:
    final, _, clock, _ = _simulate(TrainConfig(max_minutes=10, epochs=2), 60.0, 1.0, 30, 3.0)
    assert final.epochs == 2 and clock == pytest.approx(60 + 2 * 33)  # epochs first
    final, _, clock, _ = _simulate(TrainConfig(max_minutes=1, epochs=50), 0.0, 1.0, 30, 3.0)
    assert final.epochs == 50 and 60 < clock <= 62  # the clock first
    final, schedule, _, _ = _simulate(TrainConfig(), 0.0, 1.0, 10, 1.0)
    assert final.epochs == DEFAULT_EPOCHS and schedule.total_steps == DEFAULT_EPOCHS * 10  # no budget: 3


def test_plan_waits_for_the_probe_and_is_saved(tmp_path: Path) -> None:
    config = TrainConfig(max_minutes=10)
    schedule = _schedule(config, 50)
    config, budget = BudgetEpochs.for_run(config, 50, val_items=0, train_items=1000)
    assert config.epochs == DEFAULT_EPOCHS
    for step in range(1, BUDGET_PROBE_STEPS + 1):  # the first step starts the timing
        config = budget.after_step(config, schedule, 100.0 + 2.0 * step, step, tmp_path)
    assert config.epochs == DEFAULT_EPOCHS and not (tmp_path / "config.yaml").exists()
    last = BUDGET_PROBE_STEPS + 1
    config = budget.after_step(config, schedule, 100.0 + 2.0 * last, last, tmp_path)
    # (600 - 118 + 9 * 2) s from the first step, 100 s an epoch: 5 epochs.
    assert config.epochs == 5 and schedule.total_steps == 250
    saved = TrainConfig.load(tmp_path / "config.yaml")
    assert saved.epochs == 5  # a resumed run keeps the plan: its schedule is built from it
    assert _schedule(saved, 50).total_steps == schedule.total_steps


def test_a_validation_between_probe_steps_does_not_count_as_training() -> None:
    """A --val-at-minutes pass inside the probe made one CIFAR-10 run plan 1 epoch instead of 2: the
    engine restarts the timing after it, so the step time is that of training steps (2 s here) and
    only the 60 s the pass took come off the budget."""
    plans = {}
    for restart in (False, True):
        config = TrainConfig(max_minutes=10)
        schedule = _schedule(config, 50)
        config, budget = BudgetEpochs.for_run(config, 50, val_items=0, train_items=1000)
        clock = 100.0
        for step in range(1, 3 * BUDGET_PROBE_STEPS):
            clock += 2.0
            config = budget.after_step(config, schedule, clock, step)
            if step == 5:  # after this step, a 60 s validation
                clock += 60.0
                if restart:
                    budget.restart_timing()
        plans[restart] = config.epochs
    # (600 - 100 - 60) s of 2 s steps from the first: 4.4 epochs of 100 s -> 5; timed with the pass, 5 s a step
    # (1.8 epochs of 250 s -> 2).
    assert plans == {False: 2, True: 5}


def test_epochs_faster_than_the_probe_get_more_epochs_and_the_budget_is_used() -> None:
    """A CIFAR-10 run on an AMX CPU timed its first steps at 1.03 s and then ran 0.66 s steps: the three
    planned epochs ended 8 of 45 minutes early. Re-planned after each epoch, the run goes on to the
    budget, and the lr only falls (no restart of the cosine) while the plan grows."""
    lrs: list[float] = []
    config = TrainConfig(max_minutes=45)
    final, schedule, clock, last_lr = _simulate(
        config, 630.0, 0.66, 703, 20.0, slow_steps=3 * BUDGET_PROBE_STEPS, lrs=lrs
    )
    assert 44 * 60 <= clock <= 45 * 60 + 0.66 + 20.0, clock / 60
    assert final.epochs > 3 and schedule.total_steps == final.epochs * 703
    assert last_lr < 0.1 * 0.02
    after_warmup = lrs[schedule.warmup_steps :]
    assert all(b <= a + 1e-12 for a, b in zip(after_warmup, after_warmup[1:], strict=False))
