"""`effnet bench`: one small training comparison end to end, and bad peers named clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effnet import benchmark
from effnet.cli import main


def test_bench_train_writes_images_per_second_and_ratios(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--mode", "train", "--img-size", "32", "--batch-size", "2", "--rounds", "2", "--warmup", "0"]
    assert main([*args, "--against", "timm", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    figures, pilots = written["results"], written["pilots_images_per_second"]
    settings = {"fp32 contiguous", "fp32 channels_last", "bf16 contiguous", "bf16 channels_last"}
    assert set(pilots) == {f"timm {setting}" for setting in settings}  # every setting of the peer was tried
    timed = set(figures) - {"ours"}
    assert "ours" in figures and timed and timed <= set(pilots)
    fastest_pilot = max(pilots.values())
    kept = {name for name in pilots if pilots[name] * benchmark.SCREEN_FACTOR >= fastest_pilot}
    assert timed == kept  # exactly the settings the pilot did not rule out are timed
    for name in timed:
        ours, peer = figures["ours"]["images_per_second"], figures[name]["images_per_second"]
        assert ours > 0 and peer > 0 and len(figures[name]["seconds"]) == 2
        assert figures[name]["ours_ratio"] == pytest.approx(ours / peer)
    printed = capsys.readouterr().out
    best = max(timed, key=lambda name: figures[name]["images_per_second"])
    assert f"against the peers' best measured setting ({best})" in printed
    assert "AVX" in printed or "threads" in printed  # the CPU kind heads the figures


def test_bench_rejects_an_unknown_peer(capsys) -> None:
    assert main(["bench", "--against", "keras"]) == 1
    assert "unknown peer 'keras'" in capsys.readouterr().err
