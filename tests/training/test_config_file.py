"""`effnet train --config RUN/config.yaml` repeats that run (same settings, same results), and a run
started without --output or --data-dir leaves the current folder untouched."""

from __future__ import annotations

import json

import yaml

from effnet.cli import main


def settings(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_run_from_another_runs_config_repeats_it(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFNET_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("EFFNET_CACHE", str(tmp_path / "cache"))
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    first = tmp_path / "first"
    flags = ["--model", "efficientnet_lite0", "--img-size", "32", "--epochs", "1", "--batch-size", "12"]
    flags += ["--val-split", "0.25", "--workers", "0", "--no-progress", "--precision", "fp32", "--no-report"]
    assert main(["train", "--data", str(image_folder), *flags, "--output", str(first)]) == 0
    # The file names the first run's folder as its output: the repeat gets its own default folder.
    assert main(["train", "--config", str(first / "config.yaml")]) == 0
    assert "run folder: " + str(tmp_path / "runs") in capsys.readouterr().out
    (second,) = (tmp_path / "runs").iterdir()
    assert {**settings(second), "output": None} == {**settings(first), "output": None}
    assert settings(first)["data_dir"] == str(tmp_path / "cache" / "data")
    for name in ("results.json", "metrics.csv"):
        assert (second / name).is_file()
    ours, theirs = (json.loads((run / "results.json").read_text()) for run in (first, second))
    for key in ("test_acc", "test_loss", "best_val_acc"):
        assert ours[key] == theirs[key], key
    assert list(here.iterdir()) == [], "a file landed in the current folder"
