"""Runs that survive: SIGKILL mid-epoch then --resume ends with the weights of an uninterrupted run;
the command line; a 2-process gloo torchrun run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effnet.cli import main

HERE = Path(__file__).resolve().parent
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}  # see conftest.one_thread
RUN_SCRIPT = """
import sys
import torch
sys.path.insert(0, {here!r})
from training_helpers import tiny_model
from effnet.training import fit
resume = {resume!r}
if {kill!r}:  # SIGKILL itself inside the second epoch, about to write its second checkpoint there: the batches
    import os, signal  # since the first are lost and must be redone on resume (a poller from outside could
    import effnet.training.engine as engine  # miss the epoch on a fast machine)
    save_state, seen = engine.save_state, []
    def save_then_die(path, state):
        if state["progress"]["epoch"] >= 1 and (seen or state["progress"]["batches_done"] > 0):
            if seen:
                os.kill(os.getpid(), signal.SIGKILL)
            seen.append(path)
        save_state(path, state)
    engine.save_state = save_then_die
options = dict(img_size=32, epochs=3, batch_size=4, val_split=0.25, warmup_steps=2, workers=0, progress=False,
               precision="fp32", deterministic=True, checkpoint_every=2, ema=True, mixup=0.2, report=False,
               data_dir={data_dir!r})
options.update({extra!r})
if resume:
    fit(None, None, resume={output!r})
else:
    torch.manual_seed(0)
    fit(tiny_model(), {data!r}, output={output!r}, **options)
"""


# The cached path (`--cache-frozen`): features rebuilt on resume, views and shifts drawn per (seed, epoch, index).
CACHED = {"finetune": "last:4", "cache_frozen": True, "cache_shift": 1, "mixup": 0.0}


def _start(
    image_folder: Path, output: Path, resume: bool = False, extra: dict | None = None, kill: bool = False
) -> subprocess.Popen:
    script = RUN_SCRIPT.format(
        here=str(HERE),
        resume=resume,
        kill=kill,
        output=str(output),
        data=str(image_folder),
        data_dir=str(output.parent / "d"),
        extra=extra or {},
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ONE_THREAD
    )


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


@pytest.mark.parametrize("extra", [{}, CACHED], ids=["images", "cached"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(image_folder, tmp_path, extra):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = _start(image_folder, reference, extra=extra)  # runs alongside the one to be killed
    process = _start(image_folder, killed, extra=extra, kill=True)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed in its second epoch"
    assert torch.load(killed / "state.pt", weights_only=True)["progress"]["epoch"] == 1  # killed mid-epoch
    assert not (killed / "results.json").exists()

    _finish(uninterrupted)
    _finish(_start(image_folder, killed, resume=True, extra=extra))
    expected = torch.load(reference / "state.pt", weights_only=True)
    resumed = torch.load(killed / "state.pt", weights_only=True)
    for part in ("model", "ema"):
        for key, value in expected[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key} differs after resume"
    untimed = [{k: v for k, v in row.items() if not k.endswith(("_s", "_per_s"))} for row in expected["history"]]
    assert untimed == [{k: row[k] for k in untimed[0]} for row in resumed["history"]]
    assert (
        json.loads((reference / "results.json").read_text())["test_acc"]
        == json.loads((killed / "results.json").read_text())["test_acc"]
    )


def test_train_without_data_says_what_to_pass(capsys):
    assert main(["train"]) == 2
    printed = capsys.readouterr().out
    for hint in ("--data", "digits", "cifar10", "folder"):
        assert hint in printed


def test_cli_trains_then_resumes_with_more_epochs(image_folder, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="effnet")
    run = tmp_path / "run"
    common = ["--workers", "0", "--no-progress", "--precision", "fp32", "--no-report"]
    status = main(
        ["train", "--data", str(image_folder), "--model", "efficientnet_lite0", "--img-size", "32", "--epochs", "1",
         "--batch-size", "12", "--val-split", "0.25", "--output", str(run), "--data-dir", str(tmp_path / "d"), *common]
    )  # fmt: skip
    assert status == 0 and "test accuracy:" in capsys.readouterr().out
    assert "image size 32" in caplog.text
    assert main(["train", "--resume", str(run), "--epochs", "2", *common]) == 0
    assert "resuming" in caplog.text
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("2,")
    assert main(["train", "--resume", str(run), "--model", "efficientnet_b0"]) == 1
    assert "it trains 'efficientnet_lite0'" in capsys.readouterr().err


def test_torchrun_two_processes_gloo(image_folder, tmp_path):
    run = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "effnet", "train", "--data", str(image_folder), "--model", "efficientnet_lite0", "--img-size", "32",
        "--epochs", "1", "--batch-size", "6", "--val-split", "0.25", "--output", str(run), "--workers", "0",
        "--no-progress", "--precision", "fp32", "--data-dir", str(tmp_path / "d"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["test_images"] == 12  # the whole test set, counted once
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/1:") == 1 and result.stderr.count("test accuracy") == 1
    written = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "best.pt", "last.pt", "state.pt", "results.json", "report.html"} <= written
    assert not [name for name in written if name.startswith(".")], "a temporary file was left behind"
