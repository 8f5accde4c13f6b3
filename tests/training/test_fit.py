"""`effnet.fit` end to end on a tiny model and a synthetic image folder: the run folder, every
option, freezing, NaN stop, mismatched resume, early stopping, the time budget."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from training_helpers import CLASSES, tiny_model, write_folder

import effnet
from effnet.models.checkpoint import load_model
from effnet.training import TrainConfig, TrainingDiverged, fit
from effnet.training.checkpoint import METRICS_COLUMNS, load_state


def test_fit_writes_the_run_folder(image_folder, fast_options, caplog):
    caplog.set_level(logging.INFO, logger="effnet")
    result = effnet.fit(tiny_model(), str(image_folder), **fast_options)
    run = Path(fast_options["output"])
    assert result.run_dir == run
    for name in ("config.yaml", "metrics.csv", "best.pt", "last.pt", "state.pt", "results.json", "train.log"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert set(METRICS_COLUMNS) <= set(rows[0])
    results = json.loads((run / "results.json").read_text())
    assert results["test_images"] == 12 and results["img_size"] == 32 and results["model"] == "tiny"
    assert 0 <= results["test_acc"] <= 1 and results["best_epoch"] in (1, 2)
    assert results == result.results and len(result.history) == 2
    model, meta = load_model(run / "best.pt")
    assert meta["class_names"] == sorted(CLASSES)
    assert meta["extra"] == {"data": str(image_folder), "img_size": 32, "seed": 0}
    assert meta["preprocess"]["input_size"] == 32
    assert TrainConfig.load(run / "config.yaml").epochs == 2
    assert "test accuracy" in (run / "train.log").read_text()
    state = torch.load(run / "state.pt", weights_only=True)  # loadable without unpickling code
    assert state["progress"]["epoch"] == 2


def test_pretrained_linear_probe_learns_the_colours(image_folder, fast_options):
    """The offline ImageNet Lite0 features separate the colour classes after a few head-only steps."""
    options = fast_options | {"img_size": 64, "epochs": 3, "batch_size": 12, "finetune": "head", "lr": 0.1}
    result = fit("efficientnet_lite0", str(image_folder), pretrained=True, **options)
    assert result.results["test_acc"] >= 0.9, result.history


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "rmsprop", "schedule": "plateau", "ema": True, "clip_grad": 1.0, "accum_steps": 2},
        {"optimizer": "adamw", "schedule": "step", "layer_decay": 0.8, "mixup": 0.2, "cutmix": 1.0},
        {"finetune": "gradual", "bn_freeze": "on", "label_smoothing": 0.0, "augment": "randaugment"},
        {"finetune": "last:2", "bn_freeze": "off", "precision": "bf16", "channels_last": False, "augment": "none"},
        {"deterministic": True, "seed": 3, "drop_rate": 0.0, "drop_path_rate": 0.0, "weight_decay": 0.0, "workers": 1},
        {"checkpoint_every": 1, "patience": 5, "min_lr": 1e-4, "momentum": 0.8, "on_bad_image": "skip"},
    ],
    ids=["rmsprop-plateau-ema", "adamw-step-mix", "gradual", "last2-bf16", "deterministic", "checkpoints"],
)
def test_options_run(image_folder, fast_options, options):
    result = fit(tiny_model(), str(image_folder), **(fast_options | options))
    assert len(result.history) == 2 and result.results["test_images"] == 12
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)
    saved = TrainConfig.load(Path(fast_options["output"]) / "config.yaml")
    assert all(getattr(saved, key) == value for key, value in options.items())


def test_head_mode_changes_only_the_classifier(image_folder, fast_options):
    """Linear probe: every backbone weight and BN running statistic is exactly as before."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, str(image_folder), **(fast_options | {"finetune": "head"}))
    after = {k: v.cpu() for k, v in result.model.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_gradual_unfreezes_after_the_head_epochs(image_folder, fast_options, caplog):
    caplog.set_level(logging.INFO, logger="effnet")
    model = tiny_model()
    stem = model.stem.conv.weight.detach().clone()
    fit(model, str(image_folder), **(fast_options | {"finetune": "gradual", "epochs": 1}))
    assert torch.equal(model.stem.conv.weight.detach().cpu(), stem)
    log = (Path(fast_options["output"]) / "train.log").read_text()
    assert "epoch 1: training 99 of" in log  # the classifier only: 32 * 3 + 3 parameters


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, fast_options):
    run = Path(fast_options["output"])
    fit(tiny_model(), str(image_folder), **(fast_options | {"epochs": 1}))
    good = (run / "state.pt").read_bytes(), (run / "last.pt").read_bytes()
    with pytest.raises(TrainingDiverged, match=r"keeps the last finite checkpoint \(state.pt, best.pt, last.pt\)"):
        fit(None, None, resume=run, epochs=3, lr=1e30, clip_grad=None)
    assert (run / "state.pt").read_bytes() == good[0] and (run / "last.pt").read_bytes() == good[1]
    assert load_state(run)["progress"]["epoch"] == 1
    assert "run failed: the loss became" in (run / "train.log").read_text()


def test_resume_refuses_another_model_or_other_classes(image_folder, fast_options, tmp_path):
    run = Path(fast_options["output"])
    fit(tiny_model(), str(image_folder), **(fast_options | {"epochs": 1}))
    with pytest.raises(ValueError, match="it trains 'tiny', not 'efficientnet_b0'"):
        fit("efficientnet_b0", None, resume=run)
    other = write_folder(tmp_path / "other", {"train": 8}, seed=1)
    (other / "train" / "blue").rename(other / "train" / "cyan")
    with pytest.raises(ValueError, match="trained on 3 classes"):
        fit(None, str(other), resume=run)
    with pytest.raises(FileNotFoundError, match="state.pt not found"):
        fit(None, None, resume=tmp_path)


def test_new_run_never_overwrites_an_old_one(image_folder, fast_options):
    fit(tiny_model(), str(image_folder), **(fast_options | {"epochs": 1}))
    with pytest.raises(ValueError, match="already holds a run"):
        fit(tiny_model(), str(image_folder), **fast_options)


def test_early_stopping(image_folder, fast_options):
    """With a negligible lr nothing improves after epoch 1, so patience 1 stops after epoch 2 of 6."""
    options = fast_options | {"epochs": 6, "lr": 1e-30, "patience": 1, "ema": False}
    result = fit(tiny_model(), str(image_folder), **options)
    assert result.results["stop_reason"].startswith("early stopping")
    assert len(result.history) == 2 and result.results["best_epoch"] == 1


def test_time_budget_stops_cleanly_and_resumes(image_folder, fast_options):
    run = Path(fast_options["output"])
    result = fit(tiny_model(), str(image_folder), **(fast_options | {"max_minutes": 1e-9}))
    assert result.results["stop_reason"].startswith("time budget")
    assert result.results["test_images"] == 12 and (run / "results.json").is_file()
    resumed = fit(None, None, resume=run, max_minutes=None)
    assert resumed.results["stop_reason"] == "completed" and resumed.history[-1]["epoch"] == 2


def test_compile_flag_goes_through_torch_compile(image_folder, fast_options, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    fit(tiny_model(), str(image_folder), **(fast_options | {"compile": True, "epochs": 1}))
    assert compiled


def test_tensorboard_logs_or_says_what_to_install(image_folder, fast_options):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            fit(tiny_model(), str(image_folder), **(fast_options | {"tensorboard": True, "epochs": 1}))
    else:
        fit(tiny_model(), str(image_folder), **(fast_options | {"tensorboard": True, "epochs": 1}))
        assert list((Path(fast_options["output"]) / "tensorboard").glob("events.*"))


def test_model_by_name_is_built_at_the_requested_size_for_the_classes(image_folder, fast_options):
    result = fit("efficientnet_lite0", str(image_folder), **(fast_options | {"epochs": 1, "batch_size": 12}))
    assert result.model.pretrained_cfg["input_size"] == 32 and result.model.num_classes == 3
    assert result.run_dir.name == "run"


def test_pretrained_model_for_new_classes_starts_from_a_zero_head_and_fast_bn(image_folder, fast_options):
    options = fast_options | {"epochs": 1, "lr": 1e-30, "batch_size": 12}  # the lr must be > 0: the head barely moves
    result = fit("efficientnet_lite0", str(image_folder), pretrained=True, **options)
    head = result.model.classifier
    assert head.weight.abs().max() < 1e-20 and head.bias.abs().max() < 1e-20
    assert result.model.config.bn_momentum == 0.1 and result.model.head.bn.momentum == 0.1


def test_test_accuracy_with_flip_tta_is_reported_beside_the_single_view(image_folder, fast_options, tmp_path):
    results = effnet.fit(tiny_model(), str(image_folder), **fast_options).results
    assert results["test_acc_tta"] is not None and 0 <= results["test_acc_tta"] <= 1  # flips on: TTA reported
    without = fast_options | {"tta": False, "output": str(tmp_path / "no-tta")}
    assert effnet.fit(tiny_model(), str(image_folder), **without).results["test_acc_tta"] is None


def test_tta_metrics_average_the_logits_of_each_image_and_its_mirror():
    from effnet.training.engine import evaluate

    class LeftMinusRight(torch.nn.Module):
        """Class 0 scores the left half's brightness, class 1 the right half's: mirroring swaps them."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            half = x.shape[3] // 2
            return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3)) + 0.01], dim=1)

    images = torch.rand(10, 3, 4, 4)
    labels = torch.zeros(10, dtype=torch.long)
    images[:, :, :, :2] += 1.0  # left half brighter: class 0 is right for a single view ...
    dataset = torch.utils.data.TensorDataset(images, labels)
    config = TrainConfig(batch_size=4, workers=0, channels_last=False)
    metrics = evaluate(LeftMinusRight(), dataset, config, torch.device("cpu"), None, tta=True)
    assert metrics["acc"] == 1.0 and metrics["n"] == 10
    assert metrics["tta_acc"] == 0.0  # ... and the mirror average is the same for both classes but the 0.01
    assert "tta_acc" not in evaluate(LeftMinusRight(), dataset, config, torch.device("cpu"), None)


def test_auto_precision_measures_each_stage_once_and_a_resume_keeps_the_choice(image_folder, fast_options, monkeypatch):
    import effnet.training.engine as engine

    pattern = [True, False, True, False, False, True, False]
    calls = []
    monkeypatch.setattr(engine, "autocast_dtype", lambda device, precision: torch.bfloat16)  # as on a bf16 CPU

    def choose(model, example, dtype, task=None):
        assert task  # named, so the measurement is kept for this machine
        calls.append((tuple(example.shape), dtype))
        return pattern

    monkeypatch.setattr(engine, "choose_stage_precision", choose)
    run = Path(fast_options["output"])
    options = fast_options | {"precision": "auto", "max_minutes": 1e-9}
    result = fit(tiny_model(), str(image_folder), **options)
    assert calls == [((8, 3, 32, 32), torch.bfloat16)]  # a training batch of the run's size
    assert [stage.full_precision for stage in result.model.stages] == pattern
    assert load_state(run)["progress"]["stage_precision"]["full_precision"] == pattern

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a resumed run re-measured the stage precision")

    monkeypatch.setattr(engine, "choose_stage_precision", must_not_measure)
    resumed = fit(None, None, resume=run, max_minutes=None)
    assert [stage.full_precision for stage in resumed.model.stages] == pattern
    # An explicit --precision is taken as given, and --grad-checkpointing keeps bf16 (memory first): no measuring.
    explicit = fast_options | {"precision": "bf16", "epochs": 1, "output": str(run) + "-bf16"}
    fit(tiny_model(), str(image_folder), **explicit)
    lean = fast_options | {"precision": "auto", "grad_checkpointing": True, "epochs": 1, "output": str(run) + "-ckpt"}
    assert not any(stage.full_precision for stage in fit(tiny_model(), str(image_folder), **lean).model.stages)
