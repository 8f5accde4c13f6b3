"""Compound scaling as a pure function."""

from __future__ import annotations

import json

import pytest

import effnet
from effnet.models.scaling import round_filters, round_repeats
from effnet.profiling import count_macs


def test_round_filters_reference_rule() -> None:
    assert round_filters(32, 1.0) == 32
    assert round_filters(32, 1.1) == 32  # 35.2 -> nearest multiple of 8 is 32, >= 90% of 35.2
    assert round_filters(1280, 1.1) == 1408
    assert round_filters(40, 1.2) == 48
    assert round_filters(16, 0.5) == 8
    # Never below 90% of the scaled value: 10 rounds to 8 by nearest multiple, but 8 < 0.9 * 10.
    assert round_filters(10, 1.0) == 16
    for channels in (16, 24, 40, 80, 112, 192, 320, 1280):
        for width in (0.25, 0.5, 1.0, 1.1, 1.37, 2.0, 3.3):
            value = round_filters(channels, width)
            assert value % 8 == 0 and value >= 0.9 * channels * width


def test_round_repeats_is_ceil() -> None:
    assert round_repeats(1, 1.1) == 2
    assert round_repeats(4, 1.0) == 4
    assert round_repeats(3, 3.1) == 10


def test_compound_scale_phi_one_paper_coefficients() -> None:
    result = effnet.compound_scale(1)
    assert result.depth_multiplier == pytest.approx(1.2)
    assert result.width_multiplier == pytest.approx(1.1)
    assert result.resolution == 258
    assert result.flops_base == pytest.approx(1.920, abs=5e-4)
    assert result.constraint_error == pytest.approx(-0.04, abs=1e-3)
    assert result.config.preprocess.input_size == 258


def test_compound_scale_phi_zero_is_b0() -> None:
    assert effnet.compound_scale(0).config.stages == effnet.get_config("efficientnet_b0").stages


def test_fractional_phi_and_custom_coefficients_build(tmp_path) -> None:
    model = effnet.create_model("efficientnet", phi=2.5)
    expected = effnet.compound_scale(2.5)
    assert model.config.preprocess.input_size == expected.resolution == round(224 * 1.15**2.5)
    # FLOPs grow with phi, and roughly as (alpha*beta^2*gamma^2)^phi.
    small = count_macs(effnet.create_model("efficientnet", phi=0.5), effnet.compound_scale(0.5).resolution)
    large = count_macs(model, expected.resolution)
    assert large > small
    custom = effnet.compound_scale(1, alpha=1.4, beta=1.0, gamma=1.0)
    assert custom.depth_multiplier == pytest.approx(1.4) and custom.resolution == 224
    assert [s.channels for s in custom.config.stages] == [16, 24, 40, 80, 112, 192, 320]
    file = tmp_path / "coefficients.json"
    file.write_text(json.dumps({"alpha": 1.1, "beta": 1.2, "gamma": 1.05}))
    from_file = effnet.create_model("efficientnet", phi=1, coefficients=str(file))
    assert from_file.config.preprocess.input_size == round(224 * 1.05)
    assert from_file.head.conv.out_channels == round_filters(1280, 1.2)


def test_compound_scale_rejects_shrinking() -> None:
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        effnet.compound_scale(1, alpha=0.9)
    with pytest.raises(ValueError, match="phi must be >= 0"):
        effnet.compound_scale(-1)
    with pytest.raises(ValueError, match="needs phi"):
        effnet.create_model("efficientnet")


def test_official_variants_match_their_table() -> None:
    from effnet.models.spec import EFFICIENTNET_COEFFICIENTS

    for name, (width, depth, resolution, dropout) in EFFICIENTNET_COEFFICIENTS.items():
        config = effnet.get_config(name)
        assert config.preprocess.input_size == resolution and config.drop_rate == dropout
        assert config.head_channels == round_filters(1280, width)
        assert [s.repeats for s in config.stages] == [round_repeats(r, depth) for r in (1, 2, 2, 3, 3, 4, 1)]
