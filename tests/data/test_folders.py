"""Image folders and archives: layouts, wrong layouts, bad images, lazy decoding, the decoded cache."""

from __future__ import annotations

import logging
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effnet.data import load_data, read_rgb
from effnet.data.folders import extract_archive

CLASSES = ("cat", "dog", "owl")


def make_image(path: Path, value: int, size=(12, 10)) -> None:
    """A uniform width x height RGB image of `value` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def make_tree(root: Path, splits=("train",), per_class=6, classes=CLASSES) -> Path:
    for split in splits:
        base = root / split if split else root
        for label, name in enumerate(classes):
            for i in range(per_class):
                suffix = ".png" if i % 2 else ".jpg"
                make_image(base / name / f"{i}{suffix}", value=40 * label + i)
    return root


def test_single_pool_is_split_three_ways_stratified(tmp_path):
    root = make_tree(tmp_path / "pool", splits=("",), per_class=10)
    data = load_data(root, data_dir=tmp_path / "cache", val_split=0.2, seed=0)
    assert data.class_names == list(CLASSES)
    for split, expected in ((data.train, 6), (data.val, 2), (data.test, 2)):
        assert np.bincount(split.targets, minlength=3).tolist() == [expected] * 3
    paths = data.train.paths + data.val.paths + data.test.paths
    assert len(set(paths)) == 30  # disjoint and complete
    image, label = data.val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12)
    assert data.val.paths[0].split(os.sep)[-2] == CLASSES[label]


def test_train_val_test_folders_are_used_as_given(tmp_path):
    root = make_tree(tmp_path / "tree", splits=("train", "val", "test"), per_class=4)
    data = load_data(root, data_dir=tmp_path / "cache")
    assert [len(data.train), len(data.val), len(data.test)] == [12, 12, 12]
    assert all("/val/" in p for p in data.val.paths)


def test_val_is_carved_from_train_when_missing(tmp_path):
    root = make_tree(tmp_path / "tree", splits=("train", "test"), per_class=10)
    data = load_data(root, data_dir=tmp_path / "cache", val_split=0.1)
    assert [len(data.train), len(data.val), len(data.test)] == [27, 3, 30]
    assert not set(data.train.paths) & set(data.val.paths)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_is_extracted_once_and_reused(tmp_path, kind, caplog):
    tree = make_tree(tmp_path / "src" / "mydata", splits=("train", "test"), per_class=4)
    archive = tmp_path / f"mydata.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in sorted(tree.rglob("*")):
                zipped.write(path, path.relative_to(tree.parent))
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tree, arcname="mydata")
    data = load_data(archive, data_dir=tmp_path / "cache")
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 12
    extracted = list((tmp_path / "cache" / "extracted").iterdir())
    assert len(extracted) == 1
    marker = extracted[0] / "mydata" / "train" / "cat" / "0.jpg"
    mtime = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="effnet"):
        again = load_data(archive, data_dir=tmp_path / "cache")
    assert "extracted earlier" in caplog.text
    assert marker.stat().st_mtime_ns == mtime
    assert again.test.targets == data.test.targets


def test_unsafe_archive_members_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../../escaped.txt")
    with pytest.raises(ValueError, match="unsafe"):
        extract_archive(evil, tmp_path / "cache")
    zipped_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped_path, "w") as zipped:
        zipped.writestr("../escaped.txt", "x")
    with pytest.raises(ValueError, match="unsafe"):
        extract_archive(zipped_path, tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_images_at_top_level_are_a_layout_error(tmp_path):
    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.jpg", value=i)
    with pytest.raises(ValueError, match=r"top level.*DIR/<class>/<image>"):
        load_data(tmp_path / "flat", data_dir=tmp_path / "cache")


def test_a_lone_class_folder_is_not_mistaken_for_a_wrapper(tmp_path):
    make_tree(tmp_path / "one", splits=("",), per_class=3, classes=("cat",))
    with pytest.raises(ValueError, match="only one class folder"):
        load_data(tmp_path / "one", data_dir=tmp_path / "cache")


def test_no_class_folders_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_data(tmp_path / "empty", data_dir=tmp_path / "cache")


def test_empty_class_folder_in_train_is_an_error(tmp_path):
    root = make_tree(tmp_path / "tree", splits=("train",), per_class=3)
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="without images.*zebra"):
        load_data(root, data_dir=tmp_path / "cache")


def test_class_missing_from_val_is_a_warning_naming_it(tmp_path, caplog):
    root = make_tree(tmp_path / "tree", splits=("train",), per_class=3)
    make_tree(root, splits=("val",), per_class=2, classes=("cat", "owl"))
    (root / "val" / "dog").mkdir()  # empty in val: counts as missing
    with caplog.at_level(logging.WARNING, logger="effnet"):
        data = load_data(root, data_dir=tmp_path / "cache")
    assert "missing" in caplog.text and "dog" in caplog.text
    assert data.class_names == list(CLASSES) and sorted(set(data.val.targets)) == [0, 2]


def test_class_in_val_but_not_in_train_is_an_error(tmp_path):
    root = make_tree(tmp_path / "tree", splits=("train",), per_class=3)
    make_tree(root, splits=("val",), per_class=2, classes=("cat", "yak"))
    with pytest.raises(ValueError, match="not in the training folder: yak"):
        load_data(root, data_dir=tmp_path / "cache")


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a data set name"):
        load_data(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- bad images


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def test_convertible_modes_become_rgb(tmp_path):
    gray = read_rgb(_save(Image.new("L", (4, 3), 77), tmp_path / "gray.png"))
    assert gray.shape == (3, 4, 3) and (gray == 77).all()

    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: composited onto white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black: mid gray
    out = read_rgb(_save(rgba, tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 2].tolist() == [200, 0, 0]
    assert 120 <= out[0, 1, 0] <= 135

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert read_rgb(_save(palette, tmp_path / "palette.png"))[0, 0].tolist() == [10, 20, 30]

    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 255]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    out = read_rgb(_save(sixteen, tmp_path / "deep.png"))
    assert out[..., 0].tolist() == [[0, 100], [255, 255]]

    upright = Image.new("RGB", (20, 10))
    exif = upright.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    assert read_rgb(_save(upright, tmp_path / "phone.jpg", exif=exif)).shape == (20, 10, 3)

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    out = read_rgb(_save(cmyk, tmp_path / "cmyk.jpg"))
    assert out[..., 0].min() > 200 and out[..., 1:].max() < 60


def _bad_files(folder: Path) -> dict[str, str]:
    """One file of each unusable kind, by name -> the words its reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.jpg").write_text("this is not a picture")
    (folder / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    full = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), folder / "t.jpg")
    full.write_bytes(full.read_bytes()[:400])
    png = _save(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)), folder / "t.png")
    png.write_bytes(png.read_bytes()[:300])
    (folder / "empty.jpg").write_bytes(b"")
    return {"text.jpg": "not an image", "random.png": "not an image", "t.jpg": "truncated", "t.png": "truncated"}


@pytest.fixture
def tree_with_bad_images(tmp_path) -> Path:
    root = make_tree(tmp_path / "tree", splits=("train", "test"), per_class=6)
    _bad_files(root / "train" / "dog")
    # Convertible images are kept.
    _save(Image.new("L", (9, 9), 10), root / "train" / "owl" / "gray.png")
    _save(Image.new("RGBA", (9, 9), (1, 2, 3, 4)), root / "train" / "owl" / "rgba.png")
    _save(Image.new("P", (9, 9), 3), root / "train" / "owl" / "palette.gif")
    _save(Image.fromarray(np.full((9, 9), 5000, np.uint16)), root / "train" / "owl" / "deep.png")
    _save(Image.new("CMYK", (9, 9), (1, 2, 3, 4)), root / "test" / "owl" / "cmyk.jpg")
    return root


@pytest.mark.parametrize("max_memory_bytes", [1 << 30, 0], ids=["in_memory", "lazy"])
def test_bad_images_fail_listing_all(tree_with_bad_images, tmp_path, max_memory_bytes):
    with pytest.raises(ValueError) as error:
        load_data(tree_with_bad_images, data_dir=tmp_path / "cache", max_memory_bytes=max_memory_bytes)
    message = str(error.value)
    assert "5 unusable image file(s)" in message and "on_bad_image='skip'" in message
    for name in ("text.jpg", "random.png", "t.jpg", "t.png", "empty.jpg"):
        assert os.sep + name in message


@pytest.mark.parametrize("max_memory_bytes", [1 << 30, 0], ids=["in_memory", "lazy"])
def test_bad_images_skipped_and_reported_once(tree_with_bad_images, tmp_path, caplog, max_memory_bytes):
    with caplog.at_level(logging.WARNING, logger="effnet"):
        data = load_data(
            tree_with_bad_images, data_dir=tmp_path / "c", on_bad_image="skip", max_memory_bytes=max_memory_bytes
        )
    assert data.train.in_memory == (max_memory_bytes > 0)
    reasons = {Path(path).name: reason for path, reason in data.bad_images}
    for name, words in _bad_files(tmp_path / "expected").items():
        assert words in reasons[name]
    assert caplog.text.count("skipping 5 unusable") == 1
    kept = [Path(p).name for p in data.train.paths + data.val.paths]
    assert {"gray.png", "rgba.png", "palette.gif", "deep.png"} <= set(kept)
    assert not set(reasons) & set(kept)
    assert len(data.train) + len(data.val) == 18 + 4 and len(data.test) == 19
    for split in data.splits().values():
        for i in range(len(split)):
            image, _ = split[i]
            assert image.dtype == torch.uint8 and image.shape[0] == 3


def test_file_vanishing_mid_run_fails_naming_it_or_is_skipped(tmp_path, caplog):
    root = make_tree(tmp_path / "tree", splits=("train",), per_class=4)
    for policy in ("fail", "skip"):
        data = load_data(root, data_dir=tmp_path / "cache", on_bad_image=policy, max_memory_bytes=0, val_split=0)
        assert not data.train.in_memory and data.val is None
        victim = data.train.paths[1]
        saved = Path(victim).read_bytes()
        Path(victim).unlink()
        try:
            if policy == "fail":
                with pytest.raises(RuntimeError, match=f"{victim}.*unreadable"):
                    data.train[1]
            else:
                with caplog.at_level(logging.WARNING, logger="effnet"):
                    image, label = data.train[1]
                    data.train[1]
                assert torch.equal(image, data.train[2][0]) and label == data.train.targets[2]
                assert caplog.text.count(victim) == 1
        finally:
            Path(victim).write_bytes(saved)


def test_decoded_cache_is_reused_and_invalidated_by_changes(tmp_path):
    root = make_tree(tmp_path / "tree", splits=("train", "test"), per_class=3)
    first = load_data(root, data_dir=tmp_path / "cache")
    caches = list((tmp_path / "cache" / "decoded").glob("*.npz"))
    assert len(caches) == 2
    again = load_data(root, data_dir=tmp_path / "cache")
    assert torch.equal(torch.stack(list(again.test.images)), torch.stack(list(first.test.images)))
    make_image(root / "test" / "cat" / "0.jpg", value=250)
    changed = load_data(root, data_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 3
    assert int(changed.test[0][0].float().mean()) > 240


def test_real_cifar10_archive_layout(cifar10_archive):
    """The shared CIFAR-10 copy has the layout load_data expects (read from the archive listing: fast)."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(cifar10_archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[0] == "cifar10":
                counts[parts[1], parts[2]] = counts.get((parts[1], parts[2]), 0) + 1
    classes = sorted({name for _, name in counts})
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert all(counts["train", name] == 5000 and counts["test", name] == 1000 for name in classes)


def test_lazy_folder_loads_identically_in_workers(tmp_path):
    from effnet.data import TransformedDataset, build_transforms, make_loader
    from effnet.data.loading import auto_num_workers

    root = make_tree(tmp_path / "tree", splits=("train",), per_class=4)
    data = load_data(root, data_dir=tmp_path / "cache", max_memory_bytes=0, val_split=0)
    preprocess = {"input_size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    dataset = TransformedDataset(data.train, build_transforms(preprocess, train=True), seed=0)
    assert auto_num_workers(dataset) >= 1 and auto_num_workers(TransformedDataset(load_data("digits").train, None)) == 0
    batches = [make_loader(dataset, 5, shuffle=True, seed=0, num_workers=n) for n in ("auto", 0)]
    for (a, la), (b, lb) in zip(*batches, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_flowers102_uses_official_splits_lazily(tmp_path, monkeypatch):
    from torchvision import datasets

    images = []
    for i in range(6):
        make_image(tmp_path / "jpg" / f"image_{i:05d}.jpg", value=i * 30, size=(20, 16))
        images.append(tmp_path / "jpg" / f"image_{i:05d}.jpg")

    class FakeFlowers:
        classes = ["rose", "tulip"]

        def __init__(self, root, split, download):
            picked = {"train": [0, 1, 2, 3], "val": [4], "test": [5]}[split]
            self._image_files = [images[i] for i in picked]
            self._labels = [i % 2 for i in picked]

    monkeypatch.setattr(datasets, "Flowers102", FakeFlowers)
    data = load_data("flowers102", data_dir=tmp_path)
    assert [len(data.train), len(data.val), len(data.test)] == [4, 1, 1] and data.class_names == ["rose", "tulip"]
    assert not data.train.in_memory and data.train.sizes[0] == (16, 20)
    image, label = data.test[0]
    assert image.shape == (3, 16, 20) and abs(int(image.float().mean()) - 150) <= 2 and label == 1


def test_large_jpegs_decode_at_reduced_scale_keeping_min_side(tmp_path):
    from effnet.data import ImageSplit

    photo = _save(Image.new("RGB", (2400, 2100), (30, 60, 90)), tmp_path / "photo.jpg")
    assert read_rgb(photo).shape == (2100, 2400, 3)
    assert read_rgb(photo, min_side=512).shape == (525, 600, 3)  # 1/4 scale; 1/8 would be < 512
    assert read_rgb(_save(Image.new("RGB", (900, 700)), tmp_path / "small.jpg"), min_side=512).shape == (700, 900, 3)
    image, _ = ImageSplit([0], paths=[str(photo)])[0]
    assert image.shape == (3, 1050, 1200) and abs(image[2].float().mean().item() - 90) < 3


def test_memory_limit_decides_between_in_memory_and_lazy(tmp_path):
    root = make_tree(tmp_path / "tree", splits=("",), per_class=4)  # 12 images of 12 x 10 pixels
    decoded = 12 * 12 * 10 * 3
    kwargs = {"data_dir": tmp_path / "cache", "val_split": 0}
    assert load_data(root, max_memory_bytes=decoded, **kwargs).train.in_memory
    assert not load_data(root, max_memory_bytes=decoded - 1, **kwargs).train.in_memory
