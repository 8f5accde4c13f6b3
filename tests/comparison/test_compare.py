"""`effnet compare`: the published figures come out, the Table 2 pairing is the documented one,
and a measured run writes a table, Markdown, CSV and non-blank plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from effnet.cli import main
from effnet.comparison import measure
from effnet.comparison.finetune import TorchvisionAsEfficientNet
from effnet.comparison.measure import CompareRow, add_ratios, compare_models
from effnet.comparison.zoo import ALL_MODELS, DEFAULT_MODELS, describe, resolve_models
from effnet.models.spec import PreprocessConfig


@pytest.fixture(scope="module")
def cost_rows() -> dict[str, CompareRow]:
    rows = compare_models(["efficientnet_b0", "resnet50", "alexnet"], costs_only=True)
    return {row.name: row for row in rows}


@pytest.mark.parametrize(("name", "params", "gmacs"), [("resnet50", 25_557_032, 4.09), ("alexnet", 61_100_840, 0.71)])
def test_costs_match_torchvision_published_figures(
    cost_rows: dict[str, CompareRow], name: str, params: int, gmacs: float
) -> None:
    row = cost_rows[name]
    published = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta
    assert row.params == params == published["num_params"]
    assert round(row.macs / 1e9, 2) == gmacs
    assert row.macs / 1e9 == pytest.approx(published["_ops"], abs=5e-4)  # torchvision rounds to 3 decimals
    assert row.resolution == 224
    assert row.top1 == published["_metrics"]["ImageNet-1K"]["acc@1"]
    assert row.top1_source.endswith("IMAGENET1K_V1")


def test_b0_is_cheaper_than_resnet50_and_is_its_table2_partner(cost_rows: dict[str, CompareRow]) -> None:
    b0, resnet = cost_rows["efficientnet_b0"], cost_rows["resnet50"]
    assert b0.params < resnet.params and b0.macs < resnet.macs
    assert (b0.top1, b0.top1_source) == (77.1, "Tan & Le 2019, Table 2")
    # The paper's Table 2 pairs ResNet-50 (76.0%) with B0: 4.9x the params, 11x the FLOPs.
    assert resnet.reference == "efficientnet_b0"
    assert resnet.params_ratio == pytest.approx(resnet.params / b0.params)
    assert 4.5 < resnet.params_ratio < 5.2 and 10 < resnet.macs_ratio < 11.5
    assert b0.reference == "efficientnet_b0" and b0.macs_ratio == 1.0


def _row(name: str, top1: float | None, macs: int, images_per_s: float | None = None) -> CompareRow:
    family = "efficientnet" if name.startswith("efficientnet_b") else "torchvision"
    return CompareRow(name, family, 224, top1, "", params=macs * 10, macs=macs, images_per_s=images_per_s)


def test_reference_is_the_cheapest_efficientnet_at_least_as_accurate() -> None:
    b0, b1 = _row("efficientnet_b0", 77.1, 400, 20.0), _row("efficientnet_b1", 79.1, 700, 10.0)
    tie, between, beyond, unknown = (
        _row("tie", 77.1, 4000, 40.0),
        _row("between", 78.0, 7000),
        _row("beyond", 90.0, 100),
        _row("unknown", None, 100),
    )
    rows = [b1, tie, between, beyond, unknown, b0]  # order of the rows must not matter
    add_ratios(rows)
    assert tie.reference == "efficientnet_b0" and tie.macs_ratio == 10.0 and tie.speed_ratio == 2.0
    assert between.reference == "efficientnet_b1" and between.params_ratio == 10.0 and between.speed_ratio is None
    assert beyond.reference == "" and beyond.macs_ratio is None
    assert unknown.reference == "" and unknown.params_ratio is None


def test_model_selection_and_native_resolutions() -> None:
    assert "efficientnet_b5" not in DEFAULT_MODELS and "resnet152" in DEFAULT_MODELS
    assert resolve_models(None) == DEFAULT_MODELS and resolve_models("all") == ALL_MODELS
    assert "efficientnet_b7" in ALL_MODELS
    assert resolve_models("resnet50, efficientnet_b0,resnet50") == ["resnet50", "efficientnet_b0"]
    with pytest.raises(ValueError, match="resnet51"):
        resolve_models("resnet50,resnet51")
    assert describe("inception_v3").resolution == 299 and describe("efficientnet_b3").resolution == 300
    assert describe("convnext_tiny").top1 is not None  # any torchvision classifier, with its metadata


def _is_nonblank_png(path: Path) -> bool:
    image = matplotlib.image.imread(path)[..., :3]
    non_white = (image < 0.9).any(axis=-1).mean()
    return image.shape[0] > 200 and image.shape[1] > 200 and non_white > 0.01


def test_measured_run_writes_table_markdown_csv_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--models", "efficientnet_b0,mobilenet_v3_small", "--output", str(tmp_path)]
    assert main([*args, "--batch-size", "2", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{torch.get_num_threads()} threads" in out and "GMAC/s" in out and "mobilenet_v3_small" in out

    with open(tmp_path / "compare.csv") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["efficientnet_b0", "mobilenet_v3_small"]
    for row in rows.values():
        assert float(row["latency_ms"]) > 0 and float(row["images_per_s"]) > 0
        assert float(row["training_mb"]) > float(row["inference_mb"]) > 0
        assert float(row["gmacs_per_s"]) == pytest.approx(float(row["images_per_s"]) * int(row["macs"]) / 1e9)
        assert int(row["threads"]) == torch.get_num_threads() and row["batch_size"] == "2"
    assert rows["mobilenet_v3_small"]["reference"] == "efficientnet_b0"

    markdown = (tmp_path / "compare.md").read_text()
    assert "| model | res | top-1 |" in markdown and "| efficientnet_b0 | 224 | 77.1 |" in markdown
    for plot in ("top1_vs_macs.png", "top1_vs_params.png", "top1_vs_throughput.png"):
        assert _is_nonblank_png(tmp_path / plot), plot


def test_torchvision_model_wrapped_for_fit_keeps_its_function() -> None:
    network = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = network(images)
    wrapped = trainable_model_from(network)
    with torch.no_grad():
        assert torch.equal(wrapped.eval()(images), expected)
    parts = [wrapped.stem, *wrapped.stages, wrapped.head, wrapped.classifier]  # what fit freezes and groups
    assert sum(p.numel() for part in parts for p in part.parameters()) == sum(p.numel() for p in wrapped.parameters())
    assert wrapped.num_classes == 5 and wrapped.pretrained_cfg["input_size"] == 224
    wrapped.reset_classifier(3)
    assert wrapped(images).shape == (2, 3)


def trainable_model_from(network: torch.nn.Module) -> TorchvisionAsEfficientNet:
    return TorchvisionAsEfficientNet("mobilenet_v3_small", network, PreprocessConfig())


def _write_colour_folder(root: Path, per_class: dict[str, int], size: int = 24) -> Path:
    """root/<split>/<class>/*.png, the class being the brightest channel."""
    generator = np.random.default_rng(0)
    for split, count in per_class.items():
        for channel, name in enumerate(["red", "green", "blue"]):
            (root / split / name).mkdir(parents=True)
            for number in range(count):
                pixels = generator.integers(0, 90, (size, size, 3), dtype=np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(root / split / name / f"{number}.png")
    return root


def test_finetune_runs_each_model_and_a_rerun_skips_finished_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _write_colour_folder(tmp_path / "colours", {"train": 8, "test": 2})
    args = ["compare", "--finetune", str(data), "--models", "efficientnet_lite0,mobilenet_v3_small"]
    args += ["--budget-minutes", "2", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0"]
    args += ["--output", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    assert main(args) == 0
    folder = tmp_path / "out" / "finetune"
    results = {
        name: json.loads((folder / f"{name}.json").read_text()) for name in ("efficientnet_lite0", "mobilenet_v3_small")
    }
    assert results["efficientnet_lite0"]["init"] == "ImageNet"  # offline weights from the lite0 package
    assert results["mobilenet_v3_small"]["init"] == "scratch"
    for name, result in results.items():
        assert 0 <= result["test_acc"] <= 1 and result["train_images_per_s"] > 0 and result["img_size"] == 32
        assert 0 < result["train_time_s"] <= result["wall_time_s"] and 0 < result["epochs"] <= 1
        config = yaml.safe_load((folder / "runs" / name / "config.yaml").read_text())
        assert config["max_minutes"] == 2 and config["model"] == name
    assert "| efficientnet_lite0 | ImageNet |" in (tmp_path / "out" / "finetune.md").read_text()
    assert _is_nonblank_png(tmp_path / "out" / "finetune.png")

    finished = {path: path.stat().st_mtime_ns for path in folder.glob("*.json")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="effnet"):
        assert main(args) == 0
    assert caplog.text.count("done before") == 2
    assert not (folder / "runs" / "mobilenet_v3_small" / "report.html").exists()
    assert {path: path.stat().st_mtime_ns for path in folder.glob("*.json")} == finished


def test_a_failing_model_is_left_out_and_the_others_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_cost_row = measure.cost_row

    def cost_row(name: str, model: torch.nn.Module | None = None) -> CompareRow:
        if name == "vgg16":
            raise RuntimeError("the measuring process died (out of memory?)")
        return real_cost_row(name, model)

    monkeypatch.setattr(measure, "cost_row", cost_row)
    assert main(["compare", "--costs-only", "--models", "vgg16,alexnet", "--output", str(tmp_path)]) == 1
    with open(tmp_path / "compare.csv") as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == ["alexnet"]
    assert "vgg16 left out: the measuring process died" in caplog.text
