"""`effnet models`, `summary` and `scale` print what they promise."""

from __future__ import annotations

import pytest

from effnet.cli import main


def test_scale_prints_multipliers_and_constraint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "--phi", "1"]) == 0
    out = capsys.readouterr().out
    assert "258px" in out and "1.9203" in out and "-4.0%" in out and "params 9,109,994" in out


def test_summary_totals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "efficientnet_b0"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 5,288,548" in out and "stages.5.3" in out and "(1, 1280, 7, 7)" in out
    assert "MACs: 0.386 G" in out


def test_models_lists_variants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--filter", "lite", "--no-macs"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite4" in out and "4,652,008" in out


def test_unknown_model_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "efficientnet_b42"]) == 1
    assert "Valid names" in capsys.readouterr().err
