"""TrainConfig, freezing, frozen BatchNorm, parameter groups, optimizers and LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from training_helpers import tiny_model

from effnet.training.config import TrainConfig, default_lr, parse_finetune
from effnet.training.finetune import (
    build_optimizer,
    first_trainable_part,
    freeze,
    model_parts,
    param_groups,
    set_train_mode,
)
from effnet.training.schedule import LRSchedule


def test_config_round_trips_through_yaml(tmp_path):
    config = TrainConfig(data="digits", epochs=7, finetune="last:2", lr=0.01, workers=0, img_size=64)
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"optimizer": "adam"}, "sgd, rmsprop, adamw"),
        ({"finetune": "last:0"}, "last:N"),
        ({"finetune": "top"}, "head, last:N"),
        ({"schedule": "linear"}, "cosine"),
        ({"batch_size": 0}, "batch_size"),
        ({"layer_decay": 1.5}, "layer_decay"),
        ({"precision": "fp8"}, "fp32"),
    ],
)
def test_config_rejects_bad_values_naming_the_choices(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig().replace(epoch=3)


def test_parse_finetune_and_default_lr():
    assert parse_finetune("last:3") == ("last", 3)
    assert parse_finetune("gradual") == ("gradual", 0)
    assert default_lr("sgd", 128) == pytest.approx(2 * default_lr("sgd", 64))


def test_parts_cover_every_parameter_once():
    model = tiny_model()
    in_parts = [id(p) for part in model_parts(model) for p in part.parameters()]
    assert sorted(in_parts) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize(
    "mode, epoch, first",
    [("head", 0, 9), ("last:2", 0, 6), ("last:20", 0, 0), ("full", 0, 0), ("gradual", 0, 9), ("gradual", 1, 0)],
)
def test_first_trainable_part(mode, epoch, first):
    assert first_trainable_part(tiny_model(), TrainConfig(finetune=mode, gradual_head_epochs=1), epoch) == first


def test_freeze_head_leaves_only_the_classifier_trainable():
    model = tiny_model()
    freeze(model, first_trainable_part(model, TrainConfig(finetune="head"), 0))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("bn_freeze", ["auto", "on", "off"])
def test_bn_statistics_follow_bn_freeze(bn_freeze):
    model = tiny_model()
    first = first_trainable_part(model, TrainConfig(finetune="last:1"), 0)  # stage 7, head, classifier
    freeze(model, first)
    set_train_mode(model, first, bn_freeze)
    frozen_bn = model.stages[0][0].depthwise.bn
    trained_bn = model.stages[6][0].depthwise.bn
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    frozen_changed = not torch.equal(before[0], frozen_bn.running_mean)
    trained_changed = not torch.equal(before[1], trained_bn.running_mean)
    assert frozen_changed == (bn_freeze == "off")
    assert trained_changed == (bn_freeze != "on")


def test_no_weight_decay_on_bn_and_bias_and_layer_decay_scales():
    model = tiny_model()
    groups = param_groups(model, TrainConfig(weight_decay=0.1, layer_decay=0.5))
    for group in groups:
        for param in group["params"]:
            assert (group["weight_decay"] == 0.0) == (param.ndim <= 1)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(model.classifier.weight)] == 1.0
    assert scale_of[id(model.head.conv.weight)] == 0.5
    assert scale_of[id(model.stem.conv.weight)] == 0.5**9
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_bn_and_bias_unchanged_by_weight_decay_alone():
    """With zero gradients, only weight decay moves weights: conv weights shrink, BN/bias do not."""
    model = tiny_model()
    optimizer = build_optimizer(param_groups(model, TrainConfig(weight_decay=0.5)), TrainConfig(), lr=0.1)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    bn_weight, conv_weight = model.stem.bn.weight.clone(), model.stem.conv.weight.clone()
    classifier_bias = model.classifier.bias.clone()
    optimizer.step()
    assert torch.equal(model.stem.bn.weight, bn_weight)
    assert torch.equal(model.classifier.bias, classifier_bias)
    assert not torch.equal(model.stem.conv.weight, conv_weight)


def test_optimizers_use_the_documented_settings():
    model = nn.Linear(2, 2)
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0, "weight_decay": 0.0}]
    sgd = build_optimizer(groups, TrainConfig(optimizer="sgd"), 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    rmsprop = build_optimizer(groups, TrainConfig(optimizer="rmsprop"), 0.1)
    assert (rmsprop.defaults["alpha"], rmsprop.defaults["momentum"], rmsprop.defaults["eps"]) == (0.9, 0.9, 1e-3)
    assert isinstance(build_optimizer(groups, TrainConfig(optimizer="adamw"), 0.1), torch.optim.AdamW)


def _schedule(**options) -> LRSchedule:
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1.0)
    return LRSchedule(optimizer, TrainConfig(epochs=4, **options), base_lr=1.0, steps_per_epoch=10)


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    schedule = _schedule(warmup_steps=5, min_lr=0.01)
    assert schedule.step(0) == pytest.approx(0.2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(0))))
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * schedule.step(0))
    assert schedule.step(4) > schedule.step(3)
    assert schedule.step(39) == pytest.approx(0.01)


def test_step_schedule_and_plateau():
    step = _schedule(schedule="step", warmup_steps=0, step_epochs=1, step_gamma=0.5)
    assert [step.step(s) for s in (0, 10, 25)] == [1.0, 0.5, 0.25]
    plateau = _schedule(schedule="plateau", warmup_steps=0, plateau_patience=1, plateau_factor=0.1)
    for acc in (0.5, 0.6, 0.6, 0.6):
        plateau.epoch_end(acc)
    assert plateau.step(30) == pytest.approx(0.1)
    restored = _schedule(schedule="plateau", warmup_steps=0)
    restored.load_state_dict(plateau.state_dict())
    assert restored.step(30) == pytest.approx(0.1)


def test_cosine_follows_the_time_budget_when_it_is_further_along():
    schedule = _schedule(warmup_steps=0)
    assert schedule.step(1, time_fraction=1.0) == pytest.approx(0.0)
    assert schedule.step(20, time_fraction=0.1) == pytest.approx(schedule.step(20))
