"""Careless and hostile input to the command line: one line naming the problem and the way out, a
non-zero exit, nothing lost, nothing non-finite saved. (Archives and folder scans: tests/data.)"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_model

from effnet.cli import main
from effnet.training import TrainConfig, fit
from effnet.training.checkpoint import load_state, nonfinite_entries
from effnet.training.engine import TrainingDiverged


@pytest.fixture(scope="module")
def finished_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete one-epoch run folder of the tiny model (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("finished")
    options = {"img_size": 32, "epochs": 1, "batch_size": 8, "val_split": 0.25, "workers": 0, "progress": False}
    options |= {"report": False, "precision": "fp32", "output": str(root / "run"), "data_dir": str(root / "data")}
    torch.set_num_threads(1)
    fit(tiny_model(), str(image_folder), **options)
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


class _RunsCode:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content", ["code", "empty", "truncated"])
def test_resume_of_a_damaged_or_hostile_state_is_one_line(finished_run, tmp_path, capsys, content):
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    state = run / "state.pt"
    data = {"code": pickle.dumps(_RunsCode(marker)), "empty": b"", "truncated": state.read_bytes()[:2000]}[content]
    state.write_bytes(data)
    assert main(["train", "--resume", str(run)]) == 1
    _one_line_error(capsys, str(state), "damaged or not a training state")
    assert not marker.exists()
    assert state.read_bytes() == data  # the refused file is left for the user to inspect


def test_damaged_checkpoints_are_one_line_in_every_command(finished_run, tmp_path, capsys, image_folder):
    run = _copy(finished_run, tmp_path)
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes(b"PK\x03\x04 not really a zip")
    image = next((image_folder / "test" / "red").iterdir())
    commands = {
        "eval": ["eval", str(run / "best.pt"), "--data", str(image_folder)],
        "predict": ["predict", str(run / "best.pt"), str(image)],
        "export": ["export", str(run / "best.pt"), "--output", str(tmp_path / "m.onnx")],
        "cam": ["cam", str(run / "best.pt"), str(image), "--output", str(tmp_path / "cam")],
    }
    for command, argv in commands.items():
        assert main(argv) == 1, command
        _one_line_error(capsys, f"effnet {command}: error:")
    assert not (tmp_path / "m.onnx").exists()


def test_a_folder_holding_any_run_file_is_not_written_into(finished_run, tmp_path, capsys, image_folder):
    run = _copy(finished_run, tmp_path)
    (run / "state.pt").unlink()
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    argv = ["train", "--data", str(image_folder), "--output", str(run), "--img-size", "32", "--epochs", "1"]
    assert main(argv) == 1
    _one_line_error(capsys, "already holds a run", "best.pt", "--overwrite")
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_overwrite_replaces_the_run(finished_run, tmp_path, image_folder):
    run = _copy(finished_run, tmp_path)
    (run / "metrics.csv").write_text("stale\n")
    options = {"img_size": 32, "epochs": 1, "batch_size": 8, "val_split": 0.25, "workers": 0, "progress": False}
    options |= {"report": False, "precision": "fp32", "data_dir": str(tmp_path / "data")}
    fit(tiny_model(), str(image_folder), output=str(run), overwrite=True, **options)
    assert (run / "metrics.csv").read_text().startswith("epoch,")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--img-size", "0"], "--img-size: must be a whole number >= 32"),
        (["train", "--img-size", "-5"], "--img-size: must be a whole number >= 32"),
        (["train", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["train", "--lr", "inf"], "--lr: must be a finite number > 0"),
        (["train", "--val-split", "1.5"], "--val-split: must be a finite number in [0, 1)"),
        (["train", "--batch-size", "0"], "--batch-size: must be a whole number >= 1"),
        (["train", "--epochs", "two"], "--epochs: expected a whole number >= 1"),
        (["train", "--workers", "-1"], "--workers"),
        (["predict", "efficientnet_b0", "x.jpg", "--batch-size", "0"], "--batch-size: must be"),
        (["predict", "efficientnet_b0", "x.jpg", "--top-k", "0"], "--top-k: must be a whole number >= 1"),
        (["eval", "efficientnet_b0", "--img-size", "0"], "--img-size: must be"),
        (["export", "efficientnet_b0", "--calibration", "0"], "--calibration: must be"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors_before_any_work(argv, needle, capsys, tmp_path):
    # The data named does not exist: had the option passed, the error would name the data instead.
    argv = argv + (["--data", str(tmp_path / "nowhere")] if argv[0] == "train" else [])
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    _one_line_error(capsys, needle)


@pytest.mark.parametrize(
    "field, value",
    [("img_size", 0), ("img_size", 16), ("lr", float("nan")), ("lr", -1.0), ("batch_size", 0), ("val_split", 1.0)],
)
def test_config_ranges_hold_in_the_python_api_too(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(data="digits", **{field: value}).validate()


def test_lr_nan_in_a_config_file_is_a_usage_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: digits\nlr: .nan\n")
    assert main(["train", "--config", str(recipe)]) == 2
    _one_line_error(capsys, "lr must be a finite number > 0")


def test_divergence_saves_nothing_non_finite_and_names_only_files_that_exist(image_folder, fast_options):
    run = Path(fast_options["output"])
    options = fast_options | {"epochs": 3, "lr": 1e6, "checkpoint_every": 1, "clip_grad": None, "ema": False}
    with pytest.raises(TrainingDiverged) as diverged:
        fit(tiny_model(), str(image_folder), **options)
    message = str(diverged.value)
    for name in ("state.pt", "best.pt", "last.pt"):
        assert (name in message) == (run / name).is_file(), message
    for name in ("best.pt", "last.pt"):
        if (run / name).is_file():
            saved = torch.load(run / name, map_location="cpu", weights_only=True)
            assert not nonfinite_entries(saved["state_dict"]), name
    if (run / "state.pt").is_file():
        state = load_state(run)  # refuses non-finite weights itself
        assert not nonfinite_entries({k: state[k] for k in ("model", "optimizer")})


def test_a_state_with_non_finite_weights_is_refused_on_resume(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    first = next(name for name, value in state["model"].items() if value.is_floating_point())
    state["model"][first] = torch.full_like(state["model"][first], float("nan"))
    torch.save(state, run / "state.pt")
    assert main(["train", "--resume", str(run)]) == 1
    _one_line_error(capsys, "non-finite weights", first)


def test_config_yaml_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    TrainConfig(data="digits", epochs=2).save(path)
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        TrainConfig(data="digits", epochs=5).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(monkeypatch, tmp_path, capsys):
    import effnet.training

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(effnet.training, "fit", broken)
    with pytest.raises(KeyError, match="a bug"):  # not an input error: the traceback is the report
        main(["train", "--data", "digits", "--epochs", "1"])
    monkeypatch.undo()
    missing = ["train", "--data", str(tmp_path / "nowhere"), "--epochs", "1"]
    assert main(missing) == 1
    _one_line_error(capsys, "nowhere")
    with pytest.raises(FileNotFoundError):  # --debug: a known error shows its traceback too
        main(["--debug", *missing])
    monkeypatch.setenv("EFFNET_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(missing)
