"""Hostile archives and folders: nothing is written outside the extraction folder, links neither loop
nor duplicate images, bombs are refused by their limits. Every archive is built here, in tmp_path."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effnet.data import load_data
from effnet.data.archives import ArchiveLimits
from effnet.data.folders import extract_archive


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(data_dir, outside): extraction goes below data_dir; nothing may ever appear in outside."""
    (tmp_path / "box" / "data").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tmp_path / "box" / "data", tmp_path / "outside"


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(archive: Path, data_dir: Path, outside: Path, match: str, limits: ArchiveLimits | None = None):
    with pytest.raises(ValueError, match=match):
        extract_archive(archive, data_dir, *([limits] if limits else []))
    assert everything_under(outside) == []
    extracted = data_dir / "extracted"
    assert not extracted.exists() or list(extracted.iterdir()) == []  # staging removed, nothing kept


def test_path_max_symlink_chain_cannot_escape(tmp_path):
    """CVE-2025-4517's proof of concept: nested long folders and links whose resolved path exceeds
    PATH_MAX, so realpath (and filter="data" on Python <= 3.13.3) stops resolving, then links through it."""
    data_dir, outside = sandbox(tmp_path)
    archive = tmp_path / "poc.tar"
    comp, steps, path = "d" * 247, "abcdefghijklmnop", ""
    escape_up = "../" * (len(Path(tmp_path / "box" / "data" / "extracted").parts) + 4)
    with tarfile.open(archive, "w") as tar:
        for step in steps:
            add(tar, os.path.join(path, comp), tarfile.DIRTYPE)
            add(tar, os.path.join(path, step), tarfile.SYMTYPE, link=comp)
            path = os.path.join(path, comp)
        chain = os.path.join(*steps)
        add(tar, os.path.join(chain, "l" * 254), tarfile.SYMTYPE, link="../" * len(steps))
        add(tar, "escape", tarfile.SYMTYPE, link=os.path.join(chain, "l" * 254, escape_up + str(outside)[1:]))
        add(tar, "escape/pwned.txt", data=b"outside!")
        add(tar, "flink", tarfile.LNKTYPE, link="escape/pwned.txt")
    assert_refused(archive, data_dir, outside, "unsafe archive member")


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([("/abs.txt", tarfile.REGTYPE, "")], "absolute path"),
        ([("ds/../../up.txt", tarfile.REGTYPE, "")], r"'\.\.'"),
        ([("ds/out", tarfile.SYMTYPE, "../../outside")], "leaves the extraction folder"),
        ([("ds/out", tarfile.SYMTYPE, "/etc")], "absolute link target"),
        ([("ds/x", tarfile.SYMTYPE, "."), ("ds/x/y.txt", tarfile.REGTYPE, "")], "through the symlink"),
        ([("ds/hard", tarfile.LNKTYPE, "etc/passwd")], "hard link"),
        ([("ds/fifo", tarfile.FIFOTYPE, "")], "special file"),
        ([("ds/dev", tarfile.CHRTYPE, "")], "special file"),
        ([("ds/self", tarfile.SYMTYPE, "self")], "links in a chain"),
        # A name that becomes a link after a link through it was accepted: checked again at the end.
        ([("ds/l", tarfile.SYMTYPE, "sub/../.."), ("ds/sub", tarfile.SYMTYPE, ".")], "leaves"),
        ([("ds", tarfile.DIRTYPE, ""), ("ds", tarfile.SYMTYPE, "."), ("ds/f.txt", tarfile.REGTYPE, "")], "twice"),
    ],
)
def test_unsafe_tar_members_are_refused_before_extraction(tmp_path, members, why):
    data_dir, outside = sandbox(tmp_path)
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        add(tar, "ds/a/ok.png", data=png_bytes(1))
        for name, kind, link in members:
            add(tar, name, kind, data=b"x" if kind == tarfile.REGTYPE else b"", link=link)
    assert_refused(archive, data_dir, outside, why)


def test_unsafe_zip_members_are_refused(tmp_path):
    data_dir, outside = sandbox(tmp_path)
    for name in ("../../outside/up.txt", "/abs.txt", "C:/windows.txt"):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("ds/a/ok.png", png_bytes(1))
            zipped.writestr(name, b"x")
        assert_refused(archive, data_dir, outside, "unsafe archive member")


def test_limits_on_members_size_and_ratio_name_the_limit(tmp_path):
    data_dir, outside = sandbox(tmp_path)
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(20):
            add(tar, f"ds/a/{i}.txt", data=b"x" * 100)
    few, small = ArchiveLimits(max_members=10), ArchiveLimits(max_bytes=1000)
    assert_refused(archive, data_dir, outside, "member count.*EFFNET_MAX_ARCHIVE_MEMBERS", few)
    assert_refused(archive, data_dir, outside, "uncompressed size.*EFFNET_MAX_ARCHIVE_BYTES", small)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("ds/a/zeros.bin", bytes(50_000_000))
    assert_refused(bomb, data_dir, outside, "compression ratio.*EFFNET_MAX_ARCHIVE_RATIO")
    gz_bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(gz_bomb, "w:gz") as tar:
        add(tar, "ds/a/zeros.bin", data=bytes(50_000_000))
    assert_refused(gz_bomb, data_dir, outside, "compression ratio")
    # The way out the message names works.
    os.environ["EFFNET_MAX_ARCHIVE_RATIO"] = "1e9"
    try:
        assert (extract_archive(bomb, data_dir) / "ds" / "a" / "zeros.bin").stat().st_size == 50_000_000
    finally:
        del os.environ["EFFNET_MAX_ARCHIVE_RATIO"]


def test_link_loop_in_an_archive_neither_duplicates_nor_hangs(tmp_path):
    archive = tmp_path / "loop.tar"
    with tarfile.open(archive, "w") as tar:
        for label in "ab":
            for i in range(6):
                add(tar, f"ds/{label}/{i}.png", data=png_bytes(40 * i + (label == "b")))
        add(tar, "ds/a/loop", tarfile.SYMTYPE, link=".")
        add(tar, "ds/b/up", tarfile.SYMTYPE, link="..")
    data = load_data(str(archive), data_dir=tmp_path / "data", val_split=0.2, seed=0)
    paths = [p for split in (data.train, data.val, data.test) for p in split.paths]
    assert len(paths) == 12 and len({os.path.realpath(p) for p in paths}) == 12


def test_folder_link_leaving_the_data_folder_is_refused(tmp_path):
    root = tmp_path / "photos"
    for label in "ab":
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.png").write_bytes(png_bytes(i + 10 * (label == "b")))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(png_bytes(99))
    (root / "a" / "more").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside the data folder"):
        load_data(str(root), data_dir=tmp_path / "data", val_split=0)


def test_a_link_into_another_split_does_not_copy_its_images(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "test"):
        for label in "ab":
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                (root / split / label / f"{i}.png").write_bytes(png_bytes(i + 50 * (split == "test")))
    (root / "train" / "a" / "peek").symlink_to(root / "test" / "a")
    data = load_data(str(root), data_dir=tmp_path / "data", val_split=0.25)
    train = {os.path.realpath(p) for p in data.train.paths + data.val.paths}
    assert not train & {os.path.realpath(p) for p in data.test.paths}


def test_decompression_bomb_header_is_a_bad_image_not_a_traceback(tmp_path):
    root = tmp_path / "ds"
    for label in "ab":
        (root / label).mkdir(parents=True)
        for i in range(4):
            (root / label / f"{i}.png").write_bytes(png_bytes(i + 9 * (label == "b")))
    header = bytearray(png_bytes(0))
    header[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height, with their CRC
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    (root / "a" / "bomb.png").write_bytes(bytes(header))
    with pytest.raises(ValueError, match=r"(?s)unusable image.*bomb\.png"):
        load_data(str(root), data_dir=tmp_path / "data", val_split=0)
    data = load_data(str(root), data_dir=tmp_path / "data", val_split=0, on_bad_image="skip")
    assert len(data.train) == 8
