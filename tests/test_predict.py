"""`effnet predict`: ImageNet labels from the offline pretrained Lite0, bad files reported while the good
ones are still predicted, JSON/CSV output, and the ONNX Runtime backend agreeing with PyTorch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from effnet.cli import main
from effnet.predict import collect_images

CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good photos, three broken files and a non-image file in a sub-folder."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpg", quality=92)
    (folder / "sub").mkdir()
    Image.fromarray(data.coffee()).save(folder / "sub" / "coffee.png")
    (folder / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    jpeg = (folder / "chelsea.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_collect_images_expands_folders_and_globs(photo_folder: Path) -> None:
    found, failures = collect_images([str(photo_folder / "*.jpg"), str(photo_folder / "sub"), "missing.png"])
    assert [p.name for p in found] == ["chelsea.jpg", "not_an_image.jpg", "truncated.jpg", "coffee.png"]
    assert [(f.path, f.reason) for f in failures] == [("missing.png", "no such file or folder")]


def test_predict_pretrained_lite0_with_bad_files(photo_folder: Path, tmp_path: Path, capsys) -> None:
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    status = main(
        ["predict", "efficientnet_lite0", str(photo_folder), "--top-k", "3", "--json", str(out_json),
         "--csv", str(out_csv), "--batch-size", "2"]
    )  # fmt: skip
    assert status == 1  # something failed, and the exit status says so
    result = json.loads(out_json.read_text())
    predicted = {Path(p["path"]).name: p["top"] for p in result["predictions"]}
    assert set(predicted) == {"chelsea.jpg", "coffee.png"}
    assert predicted["chelsea.jpg"][0]["label"] in CAT_LABELS
    assert predicted["coffee.png"][0]["label"] in {"espresso", "cup", "coffee mug"}
    for top in predicted.values():
        probabilities = [item["probability"] for item in top]
        assert len(top) == 3 and probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
    failed = {Path(f["path"]).name: f["reason"] for f in result["failures"]}
    assert set(failed) == {"not_an_image.jpg", "truncated.jpg", "empty.png"}
    assert "not an image" in failed["not_an_image.jpg"] and "truncated" in failed["truncated.jpg"]
    captured = capsys.readouterr()
    assert "chelsea.jpg" in captured.out and predicted["chelsea.jpg"][0]["label"] in captured.out
    for name in failed:
        assert str(photo_folder / name) in captured.err
    with open(out_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["path"]).name for r in rows] == [Path(p["path"]).name for p in result["predictions"]]
    assert rows[0]["label_1"] == result["predictions"][0]["top"][0]["label"]


def test_predict_onnxruntime_backend_matches_torch(photo_folder: Path, tmp_path: Path, caplog) -> None:
    image = str(photo_folder / "chelsea.jpg")
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        outputs[backend] = tmp_path / f"{backend}.json"
        with caplog.at_level("INFO", logger="effnet"):
            assert main(["predict", "efficientnet_lite0", image, "--backend", backend, "--img-size", "160",
                         "--json", str(outputs[backend])]) == 0  # fmt: skip
    assert "onnxruntime parity with PyTorch" in caplog.text and "max abs diff" in caplog.text
    torch_top, ort_top = (json.loads(outputs[b].read_text())["predictions"][0]["top"] for b in outputs)
    assert [t["label"] for t in torch_top] == [t["label"] for t in ort_top]
    for a, b in zip(torch_top, ort_top, strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_predict_rejects_unknown_model(photo_folder: Path, capsys) -> None:
    assert main(["predict", "no_such_model", str(photo_folder / "chelsea.jpg")]) == 1
    assert "effnet models" in capsys.readouterr().err


def test_predict_tta_averages_the_image_and_its_mirror(photo_folder: Path) -> None:
    import torch

    from effnet.inference import TorchEngine
    from effnet.predict import predict_files
    from effnet.trained import load_trained

    trained = load_trained("efficientnet_lite0")
    engine = TorchEngine(trained.model)
    seen: list[torch.Tensor] = []

    def recording(images: torch.Tensor) -> torch.Tensor:
        seen.append(images)
        return engine(images)

    path = photo_folder / "chelsea.jpg"
    mirrored = predict_files(trained, [path], recording, top_k=3, img_size=128, tta=True)[0][0]
    assert len(seen) == 2 and torch.equal(seen[1], seen[0].flip(3))
    expected = ((engine(seen[0]) + engine(seen[1])) / 2).softmax(1)[0].topk(3)
    assert [label for label, _ in mirrored.top] == [trained.label(i) for i in expected.indices.tolist()]
    assert [p for _, p in mirrored.top] == pytest.approx(expected.values.tolist())
