"""`effnet bench`: one small training comparison end to end, and bad peers named clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effnet.cli import main


def test_bench_train_writes_images_per_second_and_ratios(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--mode", "train", "--img-size", "32", "--batch-size", "2", "--rounds", "2", "--warmup", "0"]
    assert main([*args, "--against", "timm", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["results"]
    assert set(figures) == {"ours", "timm"}
    ours, timm = figures["ours"]["images_per_second"], figures["timm"]["images_per_second"]
    assert ours > 0 and timm > 0 and len(figures["timm"]["seconds"]) == 2
    assert figures["timm"]["ours_ratio"] == pytest.approx(ours / timm)
    printed = capsys.readouterr().out
    assert "ours/this" in printed and "timm (bf16 channels_last)" in printed


def test_bench_rejects_an_unknown_peer(capsys) -> None:
    assert main(["bench", "--against", "keras"]) == 1
    assert "unknown peer 'keras'" in capsys.readouterr().err
