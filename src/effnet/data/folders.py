"""Image folders and archives of them.

Accepted layouts (class names are folder names, labels follow their sorted order):

    DIR/train/<class>/*   with optional DIR/val/<class>/* (or valid/, validation/) and DIR/test/<class>/*
    DIR/<class>/*         one pool, split here into train / val / test (stratified, seeded)

A folder holding nothing but one sub-folder is descended into (an archive's `cifar10/` top folder).
A `.tar`, `.tar.gz`/`.tgz` or `.zip` of such a tree is extracted once, safely, into
`data_dir/extracted/<name>-<key>/` (the key hashes the archive's name, size and mtime) and reused.

Decoding: a folder whose images fit in `max_memory_bytes` as uint8 RGB (1 GiB by default: CIFAR-10's
60,000 32x32 images take 184 MB) is decoded once into memory, and the decoded arrays are cached in
`data_dir/decoded/` keyed by every file's path, size and mtime, so the next run loads them in a few
seconds instead of decoding every JPEG again.
Larger folders are validated up front (every file decoded at reduced JPEG scale) and decoded lazily in
loader workers.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from effnet import paths
from effnet.data.archives import QUIET_BELOW, ArchiveLimits, extract_tar, extract_zip, verify_tree
from effnet.data.images import BadImageError, check_image, is_image_file, read_rgb
from effnet.data.splits import DataSplits, ImageSplit, check_policy, hwc_to_chw, stratified_split

logger = logging.getLogger("effnet")

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
VAL_FOLDER_NAMES = ("val", "valid", "validation")
MAX_MEMORY_BYTES = 1 << 30
DECODED_CACHE_VERSION = 2  # bump when the layout of the decoded cache files changes
LAYOUT_HELP = (
    "expected DIR/<class>/<image> (split into train/val/test here) or "
    "DIR/train/<class>/<image> with optional DIR/val/<class>/... and DIR/test/<class>/..."
)


def is_archive(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- archives


def extract_archive(archive: str | Path, data_dir: str | Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract `archive` once under `data_dir/extracted/` and return the folder; reuse it next time.

    Extraction goes to a temporary folder renamed into place at the end, so an interrupted
    extraction is never mistaken for a complete one. Every member is checked before anything is
    written and the tree again after (effnet.data.archives); `limits` (default: ArchiveLimits.from_env())
    bound the member count, size and compression ratio.
    """
    archive = Path(archive)
    stat = archive.stat()
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    target = Path(data_dir) / "extracted" / f"{name}-{_cache_key(archive.name, stat.st_size, stat.st_mtime_ns)}"
    if target.is_dir():
        logger.info("using %s, extracted earlier from %s", target, archive)
        _forget_older_copies(target, archive)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    started = time.perf_counter()
    try:
        limits = limits or ArchiveLimits.from_env()
        if archive.name.lower().endswith(".zip"):
            extract_zip(archive, staging, limits)
        else:
            extract_tar(archive, staging, limits)
        verify_tree(archive, staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process (e.g. another rank of a distributed run) finished extracting first.
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{archive}: cannot extract ({type(error).__name__}: {error})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("extracted %s to %s in %.1f s", archive, target, time.perf_counter() - started)
    _forget_older_copies(target, archive)
    return target


SOURCE_MARKER = ".effnet-source"  # in each extracted copy: the archive it came from


def _forget_older_copies(target: Path, archive: Path) -> None:
    """Record which archive `target` holds (in its hidden `.effnet-source`, which the folder scan
    ignores) and delete the copies extracted from earlier versions of the same archive (another size
    or mtime, so another key): without this every edit of an archive would leave a full extracted
    copy behind. Copies of other archives that share the name, and copies made before the record
    existed, are left alone."""
    source = str(archive.resolve())
    marker = target / SOURCE_MARKER
    if not marker.is_file() or marker.read_text(errors="replace") != source:
        marker.write_text(source)
    stem = target.name.rsplit("-", 1)[0]  # "<name>" of "<name>-<key>"
    for copy in target.parent.glob(f"{glob.escape(stem)}-*"):
        recorded = copy / SOURCE_MARKER
        if copy == target or not recorded.is_file() or recorded.read_text(errors="replace") != source:
            continue
        shutil.rmtree(copy, ignore_errors=True)
        logger.info("removed %s, extracted from an earlier version of %s", copy, archive)


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class FolderSplit:
    """The image files of one split folder: `files[i]` has label `labels[i]`."""

    files: list[str]
    labels: list[int]


def _class_folders(folder: Path) -> list[Path]:
    entries = _visible(folder)
    classes = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and is_image_file(p)]
    if loose:
        raise ValueError(
            f"{folder} has {len(loose)} images at its top level (e.g. {loose[0].name}) instead of one sub-folder "
            f"per class; {LAYOUT_HELP}"
        )
    if not classes:
        raise ValueError(f"{folder} has no class folders; {LAYOUT_HELP}")
    return classes


class _Scan:
    """One walk over a data folder: each directory and file is seen once (by device and inode), so a
    link loop or a link to a parent neither hangs the scan nor duplicates images across splits; a link
    that leaves the data folder is refused."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.seen: set[tuple[int, int]] = set()
        self.skipped: list[str] = []

    def first_visit(self, path: str) -> bool:
        if os.path.islink(path) and not Path(os.path.realpath(path)).is_relative_to(self.root):
            raise ValueError(
                f"{path} is a link to {os.path.realpath(path)}, outside the data folder {self.root}; "
                "copy the files into the folder or point --data at the folder they are in"
            )
        info = os.stat(path)
        key = (info.st_dev, info.st_ino)
        if key in self.seen:
            self.skipped.append(path)
            return False
        self.seen.add(key)
        return True

    def image_files(self, folder: Path) -> tuple[list[str], list[str]]:
        """Image files below `folder` (recursively, sorted) and the other files that were ignored."""
        images, ignored, pending = [], [], [str(folder)] if self.first_visit(str(folder)) else []
        while pending:
            parent = pending.pop()
            with os.scandir(parent) as entries:
                entries = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
            for entry in entries:
                if not os.path.exists(entry.path) or not self.first_visit(entry.path):
                    continue  # a dangling link, or a folder or file already seen
                if entry.is_dir():
                    pending.append(entry.path)
                else:
                    (images if is_image_file(entry.name) else ignored).append(entry.path)
        return sorted(images), ignored


def _scan_split(folder: Path, class_names: list[str] | None, scan: _Scan) -> tuple[FolderSplit, list[str], list[str]]:
    """Files of one split folder. With `class_names` (val/test), classes must be a subset of them and
    empty class folders count as missing classes; in the training folder they are an error."""
    found = {p.name: p for p in _class_folders(folder)}
    is_train = class_names is None
    if is_train:
        class_names = sorted(found)
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ValueError(f"{folder} has classes that are not in the training folder: {', '.join(unknown)}")
    split, ignored, empty = FolderSplit([], []), [], []
    for label, name in enumerate(class_names):
        if name not in found:
            continue
        images, others = scan.image_files(found[name])
        ignored += others
        if not images:
            empty.append(name)
        split.files += images
        split.labels += [label] * len(images)
    if empty and is_train:
        raise ValueError(f"class folders without images in {folder}: {', '.join(empty)}; remove them or add images")
    return split, list(class_names), ignored


def find_layout(root: Path) -> tuple[Path, dict[str, Path]]:
    """The data root (after descending single sub-folders) and its split folders by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    while True:
        entries = _visible(root)
        only = entries[0] if len(entries) == 1 and entries[0].is_dir() else None
        # Descend into a wrapper folder (an archive's top folder), not into a lone class folder.
        if only is None or only.name in ("train", *VAL_FOLDER_NAMES, "test") or any(map(is_image_file, _visible(only))):
            break
        root = only
    if not (root / "train").is_dir():
        return root, {}
    folders = {"train": root / "train"}
    for name in VAL_FOLDER_NAMES:
        if (root / name).is_dir():
            folders["val"] = root / name
            break
    if (root / "test").is_dir():
        folders["test"] = root / "test"
    return root, folders


# ----------------------------------------------------------------------------------------------- decoding


# Decoded images in memory: one N x 3 x H x W tensor when all share a size, else a list of 3 x H x W.
ImageStore = torch.Tensor | list[torch.Tensor]


def _decode_all(files: list[str], max_bytes: int) -> tuple[list[np.ndarray] | None, dict[str, str]]:
    """Decode every file in order (HxWx3 arrays); give up (None) once the total exceeds `max_bytes`.

    Sequential on purpose: small JPEGs decode barely faster in two processes on a small machine, and
    the decoded cache makes every later run fast anyway.
    """
    arrays: list[np.ndarray] = []
    bad: dict[str, str] = {}
    total = 0
    for path in tqdm(files, desc="decoding images", unit="img", leave=False, **QUIET_BELOW):
        try:
            array = read_rgb(path)
        except BadImageError as error:
            bad[path] = error.reason
            continue
        total += array.nbytes
        if total > max_bytes:
            return None, {}
        arrays.append(array)
    return arrays, bad


def _estimated_bytes(files: list[str], sample: int = 64) -> float:
    """Decoded size of all `files`, extrapolated from the headers of an evenly spaced sample, so that
    folders far too large for memory go lazy at once instead of after decoding a gigabyte."""
    picked = files[:: max(1, len(files) // sample)]
    pixels = []
    for path in picked:
        try:
            with Image.open(path) as image:
                pixels.append(image.width * image.height)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # judged properly when decoded (a decompression bomb is listed as a bad image)
    return 3 * float(np.mean(pixels)) * len(files) if pixels else 0.0


def _decode_cached(files: list[str], cache_dir: Path, max_bytes: int) -> tuple[ImageStore | None, dict, bool]:
    """`_decode_all` with the result cached in `cache_dir`, keyed by every file's path, size and mtime.

    Returns (images or None when too large, bad files, whether the cache was used).
    """
    stats = [os.stat(path) for path in files]
    key = _cache_key(DECODED_CACHE_VERSION, files, [(s.st_size, s.st_mtime_ns) for s in stats])
    cache = cache_dir / f"{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            shapes = stored["shapes"]
            if int(shapes.prod(axis=1).sum()) > max_bytes:
                return None, {}, False
            return _unpack(stored["pixels"], shapes), json.loads(str(stored["bad"])), True
    if _estimated_bytes(files) > max_bytes:
        return None, {}, False
    arrays, bad = _decode_all(files, max_bytes)
    if arrays is None:
        return None, bad, False
    images = _to_chw(arrays)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=cache_dir)
    with os.fdopen(fd, "wb") as handle:
        if isinstance(images, torch.Tensor):
            pixels = images.numpy().reshape(-1)
        else:
            pixels = np.concatenate([image.numpy().reshape(-1) for image in images] or [np.zeros(0, np.uint8)])
        shapes = np.array([tuple(image.shape) for image in images], dtype=np.int64).reshape(-1, 3)
        np.savez(handle, pixels=pixels, shapes=shapes, bad=json.dumps(bad))
    os.replace(tmp, cache)
    return images, bad, False


def _to_chw(arrays: list[np.ndarray]) -> ImageStore:
    """One N x 3 x H x W tensor when all images share a size (fast batching), else a list of 3 x H x W.
    numpy does the copying: torch ops here would compete for threads with whatever else runs."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
    return [hwc_to_chw(a) for a in arrays]


def _unpack(pixels: np.ndarray, shapes: np.ndarray) -> ImageStore:
    pixels = torch.from_numpy(pixels)
    if len(shapes) and (shapes == shapes[0]).all():
        return pixels.view(len(shapes), *shapes[0].tolist())
    sizes = shapes.prod(axis=1).tolist()
    return [chunk.view(*shape) for chunk, shape in zip(pixels.split(sizes), shapes.tolist(), strict=True)]


def _validate_lazily(files: list[str]) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Sizes of the good files and reasons for the bad ones; JPEGs decoded at reduced scale."""
    sizes, bad = [], {}
    for path in tqdm(files, desc="checking images", unit="img", leave=False, **QUIET_BELOW):
        try:
            sizes.append(check_image(path))
        except BadImageError as error:
            bad[path] = error.reason
    return sizes, bad


def _build_split(
    folder_split: FolderSplit, cache_dir: Path, max_bytes: int, on_bad_image: str
) -> tuple[ImageSplit, dict[str, str]]:
    files = folder_split.files
    started = time.perf_counter()
    images, bad, cached = _decode_cached(files, cache_dir, max_bytes)
    keep = [i for i, path in enumerate(files) if path not in bad]
    targets = [folder_split.labels[i] for i in keep]
    paths = [files[i] for i in keep]
    if images is not None:
        split = ImageSplit(targets, images=images, paths=paths, on_bad_image=on_bad_image)
        how = "loaded the decoded" if cached else "decoded"
        logger.info("%s %d images into memory in %.1f s", how, len(files), time.perf_counter() - started)
        return split, bad
    sizes, bad = _validate_lazily(files)
    keep = [i for i, path in enumerate(files) if path not in bad]
    logger.info(
        "%d images are too large to hold in memory (> %d MB decoded); validated them in %.1f s, "
        "they are decoded in loader workers",
        len(files),
        max_bytes >> 20,
        time.perf_counter() - started,
    )
    split = ImageSplit(
        [folder_split.labels[i] for i in keep], paths=[files[i] for i in keep], sizes=sizes, on_bad_image=on_bad_image
    )
    return split, bad


def report_bad_images(bad: list[tuple[str, str]], on_bad_image: str, source: str) -> None:
    """Fail with all bad files listed, or log them once when skipping."""
    if not bad:
        return
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    if on_bad_image == "fail":
        raise ValueError(
            f"{len(bad)} unusable image file(s) in {source}:\n{listing}\n"
            "Fix or remove them, or pass on_bad_image='skip' (--on-bad-image skip) to leave them out."
        )
    logger.warning("skipping %d unusable image file(s) in %s:\n%s", len(bad), source, listing)


def load_image_folder(
    path: str | Path,
    data_dir: str | Path | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    on_bad_image: str = "fail",
    max_memory_bytes: int = MAX_MEMORY_BYTES,
) -> DataSplits:
    """Load an image folder or an archive of one (layouts in the module docstring).

    A single pool `DIR/<class>/*` is split, per class, into train / val / test with `val_split` of the
    images in val and another `val_split` in test (80/10/10 by default); with `DIR/train` and `DIR/test`
    but no val folder, val is carved from train. Classes missing from val or test are logged as a
    warning; a class in val or test that has no training folder is an error.
    """
    check_policy(on_bad_image)
    source = str(path)
    data_dir = Path(data_dir) if data_dir is not None else paths.cache_dir("data")
    if is_archive(path):
        path = extract_archive(path, data_dir)
    root, folders = find_layout(Path(path).resolve())
    if not folders:
        folders = {"pool": root}
    scan = _Scan(root)
    scanned, class_names, ignored = _scan_splits(folders, scan)
    if scan.skipped:
        logger.warning(
            "%d folder(s) or file(s) reached a second time through links were scanned once only (e.g. %s)",
            len(scan.skipped),
            scan.skipped[0],
        )
    if ignored:
        logger.info("ignored %d files that are not images by extension (e.g. %s)", len(ignored), ignored[0])

    cache_dir = Path(data_dir) / "decoded"
    splits: dict[str, ImageSplit] = {}
    bad: dict[str, str] = {}
    for name, folder_split in scanned.items():
        splits[name], split_bad = _build_split(folder_split, cache_dir, max_memory_bytes, on_bad_image)
        bad.update(split_bad)
    bad_list = sorted(bad.items())
    report_bad_images(bad_list, on_bad_image, source)

    train, val, test = _train_val_test(splits, val_split, seed)
    empty = [class_names[c] for c in range(len(class_names)) if c not in set(train.targets)]
    if empty:
        raise ValueError(f"no usable training images left for classes: {', '.join(empty)}")
    return DataSplits(train, val, test, class_names, source=source, bad_images=bad_list)


def _scan_splits(folders: dict[str, Path], scan: _Scan) -> tuple[dict[str, FolderSplit], list[str], list[str]]:
    """Each split folder's image files; the first split's class folders name the classes."""
    first, *others = folders
    scanned: dict[str, FolderSplit] = {}
    scanned[first], class_names, ignored = _scan_split(folders[first], None, scan)
    if len(class_names) < 2:
        raise ValueError(f"{folders[first]} has only one class folder ({class_names[0]}); a classifier needs two")
    for name in others:
        found, _, more = _scan_split(folders[name], class_names, scan)
        ignored += more
        if not found.files:
            logger.warning("%s has no images; it is not used", folders[name])
            continue
        scanned[name] = found
        missing = sorted(set(class_names) - {class_names[i] for i in found.labels})
        if missing:
            logger.warning("classes missing from %s (not evaluated there): %s", folders[name], ", ".join(missing))
    return scanned, class_names, ignored


def _train_val_test(
    splits: dict[str, ImageSplit], val_split: float, seed: int
) -> tuple[ImageSplit, ImageSplit | None, ImageSplit | None]:
    """A pool is carved into all three; a train folder without a val folder gives up `val_split` of it."""
    if "pool" in splits:
        return tuple(carve(splits["pool"], [val_split, val_split], seed))
    train, val, test = splits["train"], splits.get("val"), splits.get("test")
    if val is None:
        train, val = carve(train, [val_split], seed)
    return train, val, test


def carve(split: ImageSplit, fractions: list[float], seed: int) -> list[ImageSplit | None]:
    """[rest, part for fractions[0], ...], stratified and seeded; a 0 fraction gives None."""
    parts = stratified_split(split.targets, fractions, seed)
    result: list[ImageSplit | None] = [split.subset(parts[0])]
    for fraction, indices in zip(fractions, parts[1:], strict=True):
        result.append(split.subset(indices) if fraction > 0 else None)
    return result
