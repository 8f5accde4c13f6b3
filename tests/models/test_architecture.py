"""The architecture against the paper and torchvision: parameter counts, MACs, structure."""

from __future__ import annotations

import pytest
import torch
import torchvision

import effnet
from effnet.models.spec import B0_STAGES
from effnet.profiling import count_macs, count_params

# torchvision's published parameter counts (1000 classes).
TORCHVISION_PARAMS = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
# The paper's Table 2 FLOPs (multiply-adds), in billions.
PAPER_GMACS = {"b0": 0.39, "b1": 0.70, "b2": 1.0, "b3": 1.8, "b4": 4.2, "b5": 9.9, "b6": 19, "b7": 37}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_counts_equal_torchvision(name: str) -> None:
    assert count_params(effnet.create_model(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"])
def test_macs_match_torchvision_and_paper(variant: str) -> None:
    ours = effnet.create_model(f"efficientnet_{variant}")
    resolution = ours.config.preprocess.input_size
    theirs = getattr(torchvision.models, f"efficientnet_{variant}")()
    macs = count_macs(ours, resolution)
    assert macs == count_macs(theirs, resolution)
    assert abs(macs / 1e9 - PAPER_GMACS[variant]) / PAPER_GMACS[variant] < 0.05


def test_b0_follows_table_1() -> None:
    model = effnet.create_model("efficientnet_b0")
    assert model.stem.conv.out_channels == 32 and model.stem.conv.stride == (2, 2)
    assert [len(stage) for stage in model.stages] == [1, 2, 2, 3, 3, 4, 1]
    for spec, stage in zip(B0_STAGES, model.stages, strict=True):
        first = stage[0]
        assert first.depthwise.conv.kernel_size == (spec.kernel, spec.kernel)
        assert first.depthwise.conv.stride == (spec.stride, spec.stride)
        assert first.project.conv.out_channels == spec.channels
        assert (first.expand is None) == (spec.expand_ratio == 1)
        # SE squeezes to a quarter of the block's *input* channels.
        assert first.se.reduce.out_channels == max(1, int(first.depthwise.conv.in_channels / spec.expand_ratio * 0.25))
    assert model.head.conv.out_channels == 1280
    assert isinstance(model.stem.act, torch.nn.SiLU)
    assert model.dropout.p == 0.2


def test_stochastic_depth_grows_linearly_to_rate() -> None:
    model = effnet.create_model("efficientnet_b0", drop_path_rate=0.3)
    blocks = [block for stage in model.stages for block in stage]
    rates = [block.drop_path.rate for block in blocks if block.has_residual]
    assert rates == sorted(rates) and 0 < rates[0] < rates[-1] < 0.3
    last = blocks[-2]  # the last block with a residual (the final 320-channel block has none)
    assert last.drop_path.rate == pytest.approx(0.3 * 14 / 16)


def test_lite_variants_have_no_se_relu6_and_fixed_stem_head() -> None:
    import timm

    for index, (resolution, first_last) in enumerate([(224, 1), (240, 1), (260, 1), (280, 1), (300, 1)]):
        name = f"efficientnet_lite{index}"
        model = effnet.create_model(name)
        assert model.config.preprocess.input_size == resolution
        assert model.stem.conv.out_channels == 32 and model.head.conv.out_channels == 1280
        assert len(model.stages[0]) == first_last and len(model.stages[-1]) == first_last
        assert all(block.se is None for stage in model.stages for block in stage)
        assert isinstance(model.stem.act, torch.nn.ReLU6)
        assert count_params(model) == count_params(timm.create_model(name))


def test_feature_maps_at_five_strides() -> None:
    model = effnet.create_model("efficientnet_b0").eval()
    x = torch.randn(1, 3, 224, 224)
    maps = model.forward_feature_maps(x)
    assert [m.shape[-1] for m in maps] == [112, 56, 28, 14, 7]
    assert [m.shape[1] for m in maps] == [info["channels"] for info in model.feature_info] == [16, 24, 40, 112, 320]
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8, 16, 32]
    assert model.forward_features(x).shape == (1, 1280, 7, 7)


def test_reset_classifier_and_headless_model() -> None:
    model = effnet.create_model("efficientnet_b0")
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert model.num_classes == 7
    model.reset_classifier(0)
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1280)


def test_pretrained_cfg_carries_preprocessing() -> None:
    cfg = effnet.create_model("efficientnet_b3").pretrained_cfg
    assert cfg["input_size"] == 300 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert effnet.create_model("efficientnet_b0", img_size=128).pretrained_cfg["input_size"] == 128


def test_tf_variants_use_same_padding_and_tf_batchnorm() -> None:
    model = effnet.create_model("tf_efficientnet_b0")
    assert model.config.padding == "same"
    assert model.stem.bn.eps == 1e-3
    # TF 'same' pads 0 on the top/left and 1 on the bottom/right for a 3x3 stride-2 conv on 224.
    out = model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert model.stem.conv.__class__.__name__ == "Conv2dSame"


def test_list_models_names() -> None:
    names = effnet.list_models()
    for index in range(8):
        assert f"efficientnet_b{index}" in names and f"tf_efficientnet_b{index}" in names
    for index in range(5):
        assert f"efficientnet_lite{index}" in names
