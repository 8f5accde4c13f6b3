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
