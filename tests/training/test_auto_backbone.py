"""`--model auto`: the strongest installed backbone with enough epochs in the budget, timed here."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from effnet.data import load_data
from effnet.training import backbone, fit
from effnet.training.backbone import MIN_EPOCHS, BackboneCost, pick
from effnet.training.config import ConfigError, TrainConfig

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def cost(name: str, top1: float, fixed_s: float, epoch_s: float) -> BackboneCost:
    return BackboneCost(name, 192, top1, fixed_s, epoch_s)


def test_pick_takes_the_strongest_backbone_that_still_gets_enough_epochs():
    budget = 600.0
    lite0 = cost("efficientnet_lite0", 75.1, 60, 60)  # 9 epochs
    lite1 = cost("efficientnet_lite1", 76.7, 100, 500 / MIN_EPOCHS)  # exactly MIN_EPOCHS
    lite2 = cost("efficientnet_lite2", 77.6, 150, 200)  # 2.25 epochs: too few
    assert pick([lite0, lite1, lite2], budget) is lite1
    assert pick([lite0, lite1, lite2], 10 * budget) is lite2  # a long budget affords the strongest
    assert pick([lite2, lite1, lite0], budget / 4) is lite0  # none has enough: the one with the most epochs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give --max-minutes"),
        ({"max_minutes": 5, "pretrained": "weights.pth"}, "drop the --pretrained file"),
        ({"max_minutes": 5, "img_size": 128}, "drop --finetune and --img-size"),
        ({"max_minutes": 5, "finetune": "full"}, "drop --finetune and --img-size"),
    ],
)
def test_auto_model_settings_that_cannot_work_are_refused_before_any_work(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="auto", **options).validate()


def test_costs_are_timed_for_the_cheapest_and_scaled_for_the_others(image_folder, caplog):
    caplog.set_level(logging.INFO, logger="effnet")
    splits = load_data(str(image_folder), val_split=0.25)
    config = TrainConfig(model="auto", max_minutes=5)
    sources = {name: backbone.offline_sources()[name] for name in LITE[:2]}
    lite0, lite1 = backbone.estimate_costs(sources, config, splits, torch.device("cpu"))
    assert "timing efficientnet_lite0 on your images; efficientnet_lite1 scaled" in caplog.text
    assert (lite0.img_size, lite1.img_size) == (192, 208)  # 6/7 of the models' 224 and 240
    assert lite0.fixed_s > 0 and lite0.epoch_s > 0
    # Lite1 at 208 px does 1.5-2x Lite0's multiply-adds at 192, in the prefix and in the rest alike.
    assert 1.3 < lite1.fixed_s / lite0.fixed_s < 2.5 and 1.3 < lite1.epoch_s / lite0.epoch_s < 2.5


def test_fit_auto_trains_the_chosen_backbone_and_records_it(image_folder, fast_options, monkeypatch, caplog):
    """The choice (measurements replaced: they have their own test) is logged, trained and saved, so
    a resumed run and the checkpoints name the backbone, not 'auto'."""
    caplog.set_level(logging.INFO, logger="effnet")
    costs = {"efficientnet_lite0": (75.1, 1.0, 1.0), "efficientnet_lite1": (76.7, 1.0, 1e6)}
    monkeypatch.setattr(backbone, "offline_sources", lambda: dict.fromkeys(costs))
    monkeypatch.setattr(backbone, "estimate_costs", lambda names, *_: [cost(name, *costs[name]) for name in names])
    options = {k: v for k, v in fast_options.items() if k not in ("img_size",)}
    result = fit("auto", str(image_folder), **options | {"max_minutes": 5, "batch_size": 8})
    assert result.model.config.name == "efficientnet_lite0"
    saved = yaml.safe_load((Path(fast_options["output"]) / "config.yaml").read_text())
    assert saved["model"] == "efficientnet_lite0" and saved["pretrained"] is True and saved["img_size"] == 192
    assert "--model auto: efficientnet_lite0, the strongest with" in caplog.text


def test_units_without_a_cache_time_the_whole_model_on_images(image_folder):
    """Without --cache-frozen nothing is cut off: the step reads images, so it must run the stem too."""
    splits = load_data(str(image_folder), val_split=0.25)
    recipe = TrainConfig(model="efficientnet_lite0", pretrained=True, img_size=64, batch_size=8)
    recipe = recipe.replace(finetune="last:5", cache_frozen=False)
    units = backbone.measure_units("efficientnet_lite0", recipe, splits, torch.device("cpu"))
    assert units.view_s > 0 and units.step_s > 0
