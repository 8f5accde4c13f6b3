"""`effnet export`: ONNX (ONNX Runtime, max abs diff <= 1e-4, dynamic batch) for B0 and Lite0, and
TorchScript; preprocessing and class names travel in the file and in a sidecar JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import effnet
from effnet.cli import main
from effnet.export import read_onnx_metadata
from effnet.export.checked import export_model
from effnet.inference import OnnxRuntimeEngine
from effnet.models.checkpoint import save_model

CLASSES = ["ant", "bee", "cat", "dog"]


def b0_with_real_statistics() -> torch.nn.Module:
    """B0 whose BN running statistics come from data, so its logits are far from zero: a parity check
    on an untrained network's near-constant outputs would prove nothing."""
    model = effnet.create_model("efficientnet_b0", num_classes=len(CLASSES), img_size=64)
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def test_onnx_export_b0_parity_dynamic_batch_and_metadata(tmp_path: Path) -> None:
    model = b0_with_real_statistics()
    path, sidecar, parity = export_model(model, tmp_path / "b0.onnx", "onnx", CLASSES)
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    engine = OnnxRuntimeEngine(path)
    for batch in (1, 5):  # traced with 2
        images = torch.randn(batch, 3, 64, 64)
        expected = model(images).detach()
        assert expected.std() > 1e-2
        assert np.abs(engine(images).numpy() - expected.numpy()).max() <= 1e-4
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {node.op_type for node in graph.graph.node}
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert "Sigmoid" in ops and "Mul" in ops  # swish (x * sigmoid(x)) and the SE gate, as plain ops
    metadata = read_onnx_metadata(path)
    assert metadata["class_names"] == CLASSES and metadata["preprocess"]["input_size"] == 64
    assert metadata["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(sidecar.read_text()) == metadata


def test_export_cli_lite0_onnx_and_torchscript(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "lite0.pt"
    model = effnet.create_model("efficientnet_lite0", pretrained=True, img_size=96)
    save_model(checkpoint, model, [f"class {i}" for i in range(1000)])
    assert main(["export", str(checkpoint), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max abs diff ")[1].split(",")[0])
    assert diff <= 1e-4 and (tmp_path / "lite0.onnx").is_file() and (tmp_path / "lite0.onnx.json").is_file()

    target = tmp_path / "ts" / "lite0.pt"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--output", str(target)]) == 0
    extra = {"effnet.json": ""}
    loaded = torch.jit.load(str(target), _extra_files=extra)
    assert json.loads(extra["effnet.json"])["class_names"][1] == "class 1"
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model.eval()(images), atol=1e-5)


def test_safetensors_round_trip_and_create_model(tmp_path: Path) -> None:
    from effnet.export.neighbours import export_safetensors, load_safetensors

    model = b0_with_real_statistics()
    folder, parity = export_safetensors(model, tmp_path / "hub", CLASSES)
    assert parity["max_abs_diff"] <= 1e-4
    config = json.loads((folder / "config.json").read_text())
    assert config["class_names"] == CLASSES and config["preprocess"]["input_size"] == 64
    assert config["config"]["stem_channels"] == 32  # the architecture itself, not only its name
    images = torch.randn(2, 3, 64, 64)
    expected = model(images).detach()
    reloaded, meta = load_safetensors(folder)
    assert meta["class_names"] == CLASSES and reloaded.pretrained_cfg["input_size"] == 64
    assert (reloaded(images).detach() - expected).abs().max() <= 1e-4
    again = effnet.create_model("efficientnet_b0", num_classes=4, pretrained=folder / "model.safetensors")
    assert (again.eval()(images).detach() - expected).abs().max() <= 1e-4
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(effnet.models.weights.WeightsError, match="cannot read"):
        effnet.create_model("efficientnet_b0", pretrained=tmp_path / "bad" / "model.safetensors")


@pytest.mark.parametrize("fmt", ["timm", "torchvision"])
def test_timm_and_torchvision_load_our_export_strictly(tmp_path: Path, fmt: str) -> None:
    from effnet.export.neighbours import export_neighbour

    model = b0_with_real_statistics()
    path, sidecar, parity = export_neighbour(model, tmp_path / f"b0.{fmt}.pth", fmt, CLASSES)
    assert parity["max_abs_diff"] <= 1e-4 and json.loads(sidecar.read_text())["architecture"] == "efficientnet_b0"
    if fmt == "timm":
        import timm

        theirs = timm.create_model("efficientnet_b0", num_classes=4)
    else:
        import torchvision

        theirs = torchvision.models.efficientnet_b0(num_classes=4)
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        diff = (theirs.eval()(images) - model(images)).abs().max()
    assert diff <= 1e-4 and model(images).detach().std() > 1e-2


def test_tf_weights_go_to_timms_tf_twin_and_not_to_torchvision(tmp_path: Path, capsys) -> None:
    """Lite0 from the offline package carries TF padding and BN eps: timm's tf_efficientnet_lite0 is
    the same network, torchvision has none (the CLI says so, one line)."""
    checkpoint = tmp_path / "lite0.pt"
    save_model(checkpoint, effnet.create_model("efficientnet_lite0", pretrained=True, num_classes=3, img_size=96))
    assert main(["export", str(checkpoint), "--format", "timm"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in out and float(out.split("max abs diff ")[1].split(" ")[0]) <= 1e-4
    assert main(["export", str(checkpoint), "--format", "safetensors"]) == 0
    assert (tmp_path / "lite0-safetensors" / "model.safetensors").is_file()
    assert main(["export", str(checkpoint), "--format", "torchvision"]) == 1
    assert "torchvision has no model for efficientnet_lite0" in capsys.readouterr().err
