"""One training step for everything that trains or times training: `fit` runs `train_step` on every
batch, and `effnet bench`, the comparison's memory probe and the search's calibration run the very
same function, so a figure about training speed is a figure about what `effnet train` runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from training_helpers import tiny_model

from effnet import benchmark
from effnet.search import planning
from effnet.training import engine, step
from effnet.training.config import TrainConfig
from effnet.training.step import NonFiniteLoss, Step, fixed_batch_step, make_step, train_step


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda model: benchmark.ours_training(model, 4, 32),
        lambda model: benchmark.plain_training(model, 4, 32, benchmark.Setting("fp32", True)),
        lambda model: benchmark.ours_at_setting(model, "train", 4, 32, benchmark.Setting("fp32", False)),
        lambda model: planning._calibration_step(model, 4, 3),
    ],
    ids=["bench ours", "bench peer", "bench ours at a setting", "search calibration"],
)
def test_timed_steps_run_the_one_train_step(make):
    model = tiny_model()
    call = make(model)
    assert call.func is step.train_step
    before = _weights(model)
    logits, loss = call()
    assert logits.shape == (4, 3) and math.isfinite(loss.item())
    assert _changed(before, model), "the timed call did not update the weights"


def test_bench_ours_is_the_step_fit_builds():
    """The bench's "ours default" step has what `make_step` gives `fit` from the default config."""
    config = TrainConfig()
    call = benchmark.ours_training(tiny_model(), 4, 32)
    timed: Step = call.args[0]
    assert type(timed.optimizer) is type(make_step(tiny_model(), config, 1e-3, None, torch.device("cpu")).optimizer)
    assert timed.criterion.label_smoothing == config.label_smoothing
    assert (timed.ema is not None) == config.ema


def test_fit_trains_every_batch_through_train_step(monkeypatch, image_folder, fast_options):
    calls = []

    def counted(one: Step, images: torch.Tensor, targets: torch.Tensor, update: bool = True) -> tuple:
        calls.append(update)
        return train_step(one, images, targets, update)

    monkeypatch.setattr(engine, "train_step", counted)
    result = engine.fit(tiny_model(), str(image_folder), **(fast_options | {"accum_steps": 2}))
    assert len(calls) == 2 * (36 // 8), "fit trained some batches outside train_step (2 epochs, 36 images)"
    assert calls == [False, True] * 4, "an optimizer update per accumulation of 2 batches"
    assert result.history[-1]["train_loss"] > 0


def test_accumulation_equals_one_big_batch():
    """Two half batches with accum_steps=2 update the weights as one full batch does."""
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    start, results = tiny_model().eval(), []  # eval: no dropout or drop path, BN by running statistics
    for accum in (1, 2):
        model = copy.deepcopy(start)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        one = Step(model, sgd, accum_steps=accum)
        for half in range(accum):
            part = slice(half * 8 // accum, (half + 1) * 8 // accum)
            train_step(one, images[part], targets[part], update=half == accum - 1)
        results.append(_weights(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_before_the_backward_pass():
    model = tiny_model()
    one = Step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = _weights(model)
    images = torch.full((2, 3, 32, 32), float("nan"))
    with pytest.raises(NonFiniteLoss):
        train_step(one, images, torch.zeros(2, dtype=torch.long))
    assert not _changed(before, model)
    assert all(p.grad is None for p in model.parameters()), "nothing may be back-propagated"


def test_ema_follows_the_weights_after_each_update():
    model = tiny_model()
    config = TrainConfig(ema=True, ema_decay=0.5)
    built = make_step(model, config, 0.1, None, torch.device("cpu"))
    average = _weights(built.ema.module)
    fixed_batch_step(built, 4, 32, 3)()
    assert _changed(average, built.ema.module), "the EMA did not move after an update"
