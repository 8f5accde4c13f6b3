"""`--cache-frozen`: the cached views are the frozen prefix's outputs, training on them equals
training the whole model with that prefix frozen, and only the suffix changes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_model

from effnet.data import build_transforms, load_data
from effnet.models.frozen import split_at_stage
from effnet.training import TrainConfig, cached, engine, fit
from effnet.training.cached import CachedFeatures, build_feature_cache
from effnet.training.finetune import freeze, resolve_auto, set_train_mode


def test_views_are_a_pure_function_of_seed_epoch_and_index() -> None:
    features = torch.arange(3 * 50, dtype=torch.float32).reshape(3, 50, 1, 1, 1)
    data = CachedFeatures(features, torch.zeros(50, dtype=torch.long), seed=1)
    picks = {epoch: [int(data[i][0]) // 50 for i in range(50) if data.set_epoch(epoch) is None] for epoch in (0, 1)}
    data.set_epoch(0)
    assert [int(data[i][0]) // 50 for i in range(50)] == picks[0]
    assert picks[0] != picks[1] and set(picks[0]) == {0, 1, 2}  # every view is used
    assert all(int(data[i][0]) % 50 == i for i in range(50))  # item i is always image i


def test_shifted_views_are_translations_with_repeated_edges() -> None:
    grid = torch.arange(36, dtype=torch.float32).reshape(1, 1, 1, 6, 6)  # one view of one image
    data = CachedFeatures(grid, torch.zeros(1, dtype=torch.long), seed=0, shift=2)
    seen = set()
    for epoch in range(60):
        data.set_epoch(epoch)
        moved = data[0][0][0]
        # Find the shift: the interior of the moved grid equals the original grid offset by (down, right).
        matches = [
            (down, right)
            for down in range(-2, 3)
            for right in range(-2, 3)
            if torch.equal(moved[2:4, 2:4], grid[0, 0, 0, 2 - down : 4 - down, 2 - right : 4 - right])
        ]
        assert len(matches) == 1
        down, right = matches[0]
        seen.add((down, right))
        original = grid[0, 0, 0]
        rows = (torch.arange(6) - down).clamp(0, 5)
        columns = (torch.arange(6) - right).clamp(0, 5)
        assert torch.equal(moved, original[rows][:, columns])  # edges repeated, nothing wrapped around
        data.set_epoch(epoch)
        assert torch.equal(data[0][0][0], moved)  # the same draw again
    assert len(seen) > 15  # most of the 25 shifts occur in 60 epochs
    assert torch.equal(CachedFeatures(grid, torch.zeros(1, dtype=torch.long))[0][0], grid[0, 0])  # shift 0: as stored


@pytest.mark.parametrize(("side", "shift"), [(24, 2), (28, 2), (14, 1), (7, 1), (48, 4)])
def test_default_shift_is_a_twelfth_of_the_feature_map(side, shift) -> None:
    assert cached.default_shift(side) == shift


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_cached_views_are_the_prefix_outputs_of_the_plain_and_mirrored_image(image_folder, engine, monkeypatch):
    if engine == "openvino":
        import openvino  # noqa: F401  (the [fast] extra: missing, it fails rather than skips)
    else:
        monkeypatch.setattr("effnet.inference.openvino_available", lambda: False)
    torch.manual_seed(0)
    model = tiny_model().eval()
    splits = load_data(str(image_folder), val_split=0.25, seed=0)
    train, val = build_feature_cache(
        model, 3, splits.train, splits.val, 32, TrainConfig(cache_views=3, workers=0), torch.device("cpu")
    )
    assert train.features.shape[:2] == (3, len(splits.train)) and train.features.dtype == torch.bfloat16
    assert val is not None and val.features.shape[:2] == (1, len(splits.val))
    assert train.shift == cached.default_shift(train.features.shape[-1]) and val.shift == 0  # validation: as stored
    plain = build_transforms(model.pretrained_cfg, train=False, img_size=32)
    images = torch.stack([plain(splits.train[i][0]) for i in range(4)])
    prefix = split_at_stage(model, 3)[0]
    for view, batch in ((0, images), (1, torch.flip(images, dims=[3]))):
        expected = prefix(batch)
        error = (train.features[view, :4].float() - expected).norm() / expected.norm()
        assert error < 0.05, (view, float(error))  # bf16 tolerance
    assert (train.features[2] != train.features[0]).any()  # an augmented draw, not a copy of the plain view
    assert train.labels.tolist() == [splits.train[i][1] for i in range(len(splits.train))]


@pytest.mark.parametrize("precision, expected", [("auto", "bf16"), ("fp32", "fp32")])
def test_a_forced_precision_holds_for_the_cache_prefix(precision, expected, monkeypatch) -> None:
    """On a CPU with native bf16 the prefix is measured among bf16 and fp32 engines, unless the run's
    --precision says which (bf16 features differ from fp32 ones by several percent)."""
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "1")
    monkeypatch.setattr("effnet.inference.openvino_available", lambda: False)
    monkeypatch.setattr(
        "effnet.runtime.interleaved_best_seconds", lambda calls, rounds: {"torch fp32": 2.0, "torch bf16": 1.0}
    )
    prefix = split_at_stage(tiny_model().eval(), 3)[0]
    engine = cached.prefix_engine(prefix, 32, torch.device("cpu"), f"test prefix {precision}", precision)
    assert engine.precision == expected


def test_training_on_features_gives_the_whole_models_gradients() -> None:
    """One step on cached features is one step of the whole model with its prefix frozen. In float64:
    the whole model's prefix runs its batch norms folded into the convolutions (grad is enabled),
    the cached prefix runs them plainly (no_grad), and in fp32 the two roundings differ by ~1e-5."""
    torch.manual_seed(0)
    model = tiny_model().double()
    freeze(model, 4)  # stem + stages 1-3 frozen: the prefix of 3 stages
    set_train_mode(model, 4, "auto")
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    state = torch.get_rng_state()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    prefix, suffix = cached.split_at_stage(model, 3)[0], cached.trainable_suffix(model, 3)
    features = prefix(x)
    torch.set_rng_state(state)  # the same stochastic-depth draws
    torch.nn.functional.cross_entropy(suffix(features), y).backward()
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and not any(name.startswith(("stem", "stages.0")) for name in got)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_fit_with_cache_frozen_trains_only_the_suffix_and_tests_the_whole_model(
    image_folder, fast_options, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="effnet")
    # The cache can outlast a tiny mark, which is then skipped (test_budget_epochs covers that): keep it
    # ahead so the mid-epoch validation on cached features runs whatever this machine's speed.
    monkeypatch.setattr(engine, "_pending_checks", lambda run: list(run.config.val_at_minutes))
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = fast_options | {"finetune": "last:4", "cache_frozen": True, "cache_views": 2, "cache_shift": 1}
    options["val_at_minutes"] = [1e-4]
    result = fit(model, str(image_folder), **options)
    after = {k: v.cpu() for k, v in result.model.state_dict().items()}
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not k.startswith(("stem", "stages.0", "stages.1", "stages.2")) for k in changed)
    assert any(k.startswith("stages.3") for k in changed)
    results = json.loads((Path(fast_options["output"]) / "results.json").read_text())
    assert results["test_images"] == 12 and results["test_acc"] is not None
    assert len(results["val_at_minutes"]) == 1 and 0 <= results["val_at_minutes"][0]["val_acc"] <= 1
    log = (Path(fast_options["output"]) / "train.log").read_text()
    assert "cached the frozen stem + 3 stage(s): 2 view(s)" in log and "shifted by up to 1 cell(s)" in log


def test_mixup_with_the_cache_mixes_the_stored_features(image_folder, fast_options, caplog, monkeypatch):
    """Manifold mixup at the cut: the mixer sees the prefix's features (stage 3's channels), never
    3-channel images, and training on the mixed features still changes the suffix only."""
    caplog.set_level(logging.INFO, logger="effnet")
    seen = []
    original = engine.make_batch_mixer

    def recording_mixer(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        mixer = original(*args, **kwargs)

        def mix(images, labels, step):  # noqa: ANN001, ANN202
            seen.append(images.shape[1])
            return mixer(images, labels, step)

        return mix

    monkeypatch.setattr(engine, "make_batch_mixer", recording_mixer)
    model = tiny_model()
    prefix_channels = cached.split_at_stage(model, 3)[0](torch.zeros(1, 3, 32, 32)).shape[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = fast_options | {"finetune": "last:4", "cache_frozen": True, "cache_views": 1, "mixup": 0.4}
    result = fit(model, str(image_folder), **options)
    assert seen and set(seen) == {prefix_channels} and prefix_channels != 3
    after = {k: v.cpu() for k, v in result.model.state_dict().items()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and not any(k.startswith(("stem", "stages.0", "stages.1", "stages.2")) for k in changed)
    assert "mix the cached features" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"finetune": "full"}, "finetune last:N"),
        ({"finetune": "head"}, "finetune last:N"),
        ({"finetune": "last:2", "bn_freeze": "off"}, "bn_freeze"),
        ({"finetune": "last:2", "cache_views": 0}, "cache_views"),
        ({"finetune": "last:2", "cache_shift": -1}, "cache_shift"),
    ],
)
def test_cache_frozen_rejects_settings_it_cannot_honour(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(cache_frozen=True, **options)


def test_val_at_minutes_must_be_positive():
    with pytest.raises(ValueError, match="val_at_minutes"):
        TrainConfig(val_at_minutes=[0.0])


@pytest.mark.parametrize(
    ("settings", "device", "finetune", "cache"),
    [
        ({"pretrained": True}, "cpu", "last:4", True),
        ({"pretrained": True}, "cuda", "full", False),
        ({"pretrained": False}, "cpu", "full", False),
        ({"pretrained": True, "mixup": 0.2}, "cpu", "last:4", False),  # mixup asks to mix images: no cache
        ({"pretrained": True, "mixup": 0.2, "cache_frozen": True}, "cpu", "last:4", True),  # features, if asked
        ({"pretrained": True, "finetune": "last:2"}, "cpu", "last:2", False),  # asked for: no silent cache
        ({"pretrained": True, "finetune": "last:2", "cache_frozen": True}, "cpu", "last:2", True),
        ({"pretrained": True, "cache_frozen": False}, "cpu", "last:4", False),
    ],
)
def test_auto_finetune_resolves_to_a_concrete_mode(settings, device, finetune, cache):
    resolved = resolve_auto(TrainConfig(**settings), torch.device(device), native_size=224)
    assert (resolved.finetune, resolved.cache_frozen) == (finetune, cache)


def test_the_cpu_recipe_trains_at_six_sevenths_of_the_resolution_without_dropout_unless_told():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    recipe = resolve_auto(TrainConfig(pretrained=True), cpu, native_size=224)
    assert (recipe.img_size, recipe.drop_rate, recipe.drop_path_rate) == (192, 0.0, 0.0)
    assert resolve_auto(TrainConfig(pretrained=True), cpu, native_size=300).img_size == 256
    told = resolve_auto(TrainConfig(pretrained=True, img_size=224, drop_rate=0.3), cpu, native_size=224)
    assert (told.img_size, told.drop_rate, told.drop_path_rate) == (224, 0.3, 0.0)
    for other in (TrainConfig(pretrained=True), TrainConfig(pretrained=True, finetune="last:4")):
        for device in (cpu, gpu):
            if other.finetune == "auto" and device == cpu:
                continue
            kept = resolve_auto(other, device, native_size=224)
            assert (kept.img_size, kept.drop_rate, kept.drop_path_rate) == (None, None, None)


def test_the_cache_stores_as_many_views_as_fit_in_memory_and_refuses_when_none_fit(caplog):
    prefix = split_at_stage(tiny_model(), 3)[0]
    view = prefix(torch.zeros(1, 3, 32, 32))[0].numel() * 2  # bytes per image and view, bf16
    need = view * (4 * 100 + 10)  # 4 views of 100 training images, 1 of 10 validation images
    assert cached.views_that_fit(prefix, 32, 4, 100, 10, memory=int(need / cached.MEMORY_SHARE) + 8) == 4
    with caplog.at_level(logging.WARNING, logger="effnet"):
        assert cached.views_that_fit(prefix, 32, 4, 100, 10, memory=int(need / cached.MEMORY_SHARE) - 8) == 3
    assert "3 view(s) per image instead of 4" in caplog.text
    with pytest.raises(ValueError, match="--no-cache-frozen"):
        cached.views_that_fit(prefix, 32, 4, 100, 10, memory=int(view * 100 / cached.MEMORY_SHARE))
    assert cached.available_memory() is None or cached.available_memory() > 0


def test_cache_frozen_with_auto_on_a_gpu_is_refused():
    with pytest.raises(ValueError, match="finetune last:N"):
        resolve_auto(TrainConfig(pretrained=True, cache_frozen=True), torch.device("cuda"), native_size=224)
