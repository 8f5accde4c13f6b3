"""`effnet export RUN --int8`: an int8 ONNX file calibrated on the run's training images, measured
against fp32 on its test split (top-1 both ways, agreement, sizes, img/s, stored in the file and a
sidecar); `effnet eval` and `effnet predict` run it; swish and SE stay float in the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression

import effnet
import effnet.export.int8 as int8
from effnet.cli import main
from effnet.data import TransformedDataset, build_transforms, load_data
from effnet.export import read_onnx_metadata
from effnet.models.checkpoint import save_model

SIZE = 64


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A run folder like `effnet train` writes: Lite0's ImageNet features with a classifier fitted on
    digits (logistic regression on the pooled features), so fp32 accuracy is real and int8 can lose it."""
    folder = tmp_path_factory.mktemp("int8_run")
    data = load_data("digits", data_dir=folder / "data")
    model = effnet.create_model("efficientnet_lite0", pretrained=True, num_classes=10, img_size=SIZE).eval()
    transform = build_transforms(model.pretrained_cfg, train=False)
    train = TransformedDataset(data.train, transform)
    images = torch.stack([train[i][0] for i in range(600)])
    labels = np.array([train[i][1] for i in range(600)])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True).numpy()
    head = LogisticRegression(max_iter=300, C=0.5).fit(features, labels)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head.coef_).float())
        model.classifier.bias.copy_(torch.from_numpy(head.intercept_).float())
    save_model(folder / "best.pt", model, data.class_names)
    config = {"model": "efficientnet_lite0", "data": "digits", "data_dir": str(folder / "data"), "seed": 0}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.slow  # ~1 min: two ONNX exports, calibration, 179 test images twice
def test_export_int8_cli_measures_and_stores_the_cost(digits_run: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(int8, "THROUGHPUT_SECONDS", 1.0)
    assert main(["export", str(digits_run), "--int8", "--calibration", "64"]) == 0
    out = capsys.readouterr().out
    path = digits_run / "best.int8.onnx"
    assert path.is_file() and (digits_run / "best.fp32.onnx").is_file() and "top-1 fp32" in out
    report = read_onnx_metadata(path)["int8"]
    assert report == json.loads(Path(f"{path}.json").read_text())["int8"]
    assert report["split"] == "test" and report["images"] == 179 and report["calibration_images"] == 64
    assert report["fp32_top1"] > 0.8  # the fitted head is a real classifier
    # The head (logistic regression at 64 px, ~85% top-1) has many near-tied logits, which rounding may
    # reorder: agreement was 0.89-0.96 across CPU kinds (0.85 on AVX2 with 8-bit weights, saturating).
    assert abs(report["int8_top1"] - report["fp32_top1"]) <= 0.05 and report["agreement"] >= 0.87
    assert report["weight_bits"] == (8 if int8.has_vnni() else 7)
    assert 3.0 <= report["fp32_bytes"] / report["int8_bytes"] <= 4.5  # int8 weights, fp32 scales and biases
    assert report["fp32_images_per_s"] > 0 and report["int8_images_per_s"] > 0 and report["cpu"]
    graph = onnx.load(str(path)).graph
    weights = {init.name: init.data_type for init in graph.initializer}
    conv_weights = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    quantised = [name for name in conv_weights if name.endswith("weight_quantized")]  # biases are int32
    assert len(quantised) > 30 and all(weights[name] == onnx.TensorProto.INT8 for name in quantised)

    # eval and predict run the int8 file on ONNX Runtime and give the top-1 the export measured
    assert main(["eval", str(path), "--data", "digits", "--data-dir", str(digits_run / "data"),
                 "--output", str(digits_run / "eval-int8")]) == 0  # fmt: skip
    result = json.loads((digits_run / "eval-int8" / "eval.json").read_text())
    assert result["backend"] == "onnxruntime" and result["top1"] == pytest.approx(report["int8_top1"], abs=1e-9)
    from PIL import Image

    image = digits_run / "seven.png"
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(image)
    assert main(["predict", str(path), str(image), "--top-k", "1"]) == 0


@pytest.mark.slow
def test_swish_and_se_stay_float_in_an_int8_b0(tmp_path: Path, monkeypatch) -> None:
    """B0's Sigmoid and Mul (swish, SE gate) run in fp32 between int8 convolutions."""
    monkeypatch.setattr(int8, "THROUGHPUT_SECONDS", 0.2)
    data = load_data("digits", data_dir=tmp_path / "data")
    model = effnet.create_model("efficientnet_b0", num_classes=10, img_size=SIZE)
    model.train()
    with torch.no_grad():  # BN statistics from data, so activations have realistic ranges
        model(torch.stack([TransformedDataset(data.train, build_transforms(model.pretrained_cfg, train=False))[i][0]
                           for i in range(64)]))  # fmt: skip
    path, report = int8.export_int8(model.eval(), tmp_path / "b0.int8.onnx", data, data.class_names, calibration=32)
    graph = onnx.load(str(path)).graph
    produced_by = {output: node.op_type for node in graph.node for output in node.output}
    sigmoids = [node for node in graph.node if node.op_type == "Sigmoid"]
    assert len(sigmoids) >= 16 + 16 + 2  # swish in every block, stem and head, and one SE gate per block
    assert all(produced_by.get(node.input[0]) in ("DequantizeLinear", "Conv", "Gemm", "Add") for node in sigmoids)
    assert {node.op_type for node in graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "Mul"}
    assert report.agreement >= 0.5 and report.images == 179
