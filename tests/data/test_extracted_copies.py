"""One extracted copy per archive: a new version of an archive replaces the copy of the old one."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from effnet.data.folders import extract_archive


def make_archive(path: Path, files: dict[str, bytes]) -> Path:
    source = path.parent / f"{path.name}-src"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname="photos")
    return path


def test_a_changed_archive_replaces_its_old_copy_only(tmp_path):
    data_dir = tmp_path / "data"
    archive = make_archive(tmp_path / "photos.tar.gz", {"a/1.txt": b"one"})
    twin = make_archive((tmp_path / "elsewhere").joinpath("photos.tar.gz"), {"b/2.txt": b"two"})
    first = extract_archive(archive, data_dir)
    assert extract_archive(archive, data_dir) == first  # unchanged: reused
    other = extract_archive(twin, data_dir)  # same name, another archive: its own copy, kept
    make_archive(archive, {"a/1.txt": b"one, edited"})
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    second = extract_archive(archive, data_dir)
    assert second != first and not first.exists()
    assert (second / "photos" / "a" / "1.txt").read_bytes() == b"one, edited"
    assert other.is_dir() and (other / "photos" / "b" / "2.txt").is_file()
    assert sorted(p.name for p in (data_dir / "extracted").iterdir()) == sorted([second.name, other.name])
