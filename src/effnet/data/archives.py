"""Safe extraction of .tar/.tar.gz/.zip archives of image folders.

`tarfile`'s `filter="data"` alone is not enough: CVE-2025-4517 (a chain of symlinks whose resolved
path exceeds PATH_MAX, so `os.path.realpath` stops resolving) let a member escape it on Python up to
3.13.3, and Pythons before 3.11.4 have no filter at all. So every member is checked here first, against
a model of the tree built from the members seen so far: no absolute path or `..`, no member written
through a symlink, links only to targets inside the tree (resolved component by component), no
device, FIFO or other special file, and limits on the member count, total size and compression ratio
(zip and tar bombs). After extraction the whole tree is walked again and every link re-resolved on disk,
so nothing relies on a single check. A refused archive leaves nothing behind in the staging folder.
"""

from __future__ import annotations

import os
import shutil
import stat as stat_module
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MAX_LINK_HOPS = 40  # as Linux's ELOOP limit


@dataclass(frozen=True)
class ArchiveLimits:
    """Refuse archives beyond these (generous: ImageNet's train set is 1.28 M files, 140 GB, ratio ~1).
    Raise them with the environment variables EFFNET_MAX_ARCHIVE_MEMBERS, _BYTES and _RATIO."""

    max_members: int = 2_000_000
    max_bytes: int = 1 << 40  # 1 TiB uncompressed
    max_ratio: float = 200.0  # uncompressed / archive size; images compress ~1x, bombs 1000x and more

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        default = cls()
        values = {}
        for field, kind in (("max_members", int), ("max_bytes", int), ("max_ratio", float)):
            name = f"EFFNET_{field.upper().replace('MAX_', 'MAX_ARCHIVE_')}"
            text = os.environ.get(name)
            try:
                values[field] = kind(text) if text else getattr(default, field)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number; unset it or give one") from None
        return cls(**values)


def _limit_error(archive: Path, what: str, value: float, limit: float, variable: str) -> ValueError:
    return ValueError(
        f"{archive}: refused, {what} {value:,.0f} exceeds the limit of {limit:,.0f} (a decompression bomb?). "
        f"If the archive is trusted, raise the limit: {variable}={int(value) + 1}"
    )


class _Tree:
    """The tree the members seen so far would create: path tuple -> 'dir', 'file' or a link target."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.entries: dict[tuple[str, ...], str | tuple[str, ...]] = {}

    def refuse(self, name: str, why: str) -> ValueError:
        return ValueError(f"{self.archive}: unsafe archive member {name!r} refused: {why}; the archive is not used")

    def parts(self, name: str) -> tuple[str, ...]:
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\0" in name:
            raise self.refuse(name, "absolute path")
        parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
        if ".." in parts:
            raise self.refuse(name, "'..' in its path")
        if not parts:
            raise self.refuse(name, "empty path")
        return parts

    def add(self, name: str, kind: str | tuple[str, ...]) -> tuple[str, ...]:
        parts = self.parts(name)
        before = self.entries.get(parts)
        if before is not None and (before != kind or isinstance(kind, tuple)):
            raise self.refuse(name, "the path is defined twice, as different kinds of entry")
        for depth in range(1, len(parts)):
            if isinstance(self.entries.get(parts[:depth]), tuple):
                raise self.refuse(name, f"it is written through the symlink {'/'.join(parts[:depth])!r}")
        self.entries[parts] = kind
        return parts

    def resolve(self, parts: tuple[str, ...], name: str) -> tuple[str, ...]:
        """`parts` with every link replaced by its target; refused when it leaves the tree."""
        pending, resolved, hops = list(parts), [], 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if not resolved:
                    raise self.refuse(name, "its link target leaves the extraction folder")
                resolved.pop()
                continue
            entry = self.entries.get((*resolved, part))
            if isinstance(entry, tuple):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise self.refuse(name, f"more than {MAX_LINK_HOPS} links in a chain")
                pending, resolved = list(entry) + pending, []  # targets are stored from the top of the tree
            else:
                resolved.append(part)
        return tuple(resolved)

    def link_target(self, link: tuple[str, ...], target: str, name: str) -> tuple[str, ...]:
        if target.startswith(("/", "\\")) or "\0" in target:
            raise self.refuse(name, f"absolute link target {target!r}")
        relative = tuple(p for p in target.replace("\\", "/").split("/") if p not in ("", "."))
        self.resolve((*link[:-1], *relative), name)
        return (*link[:-1], *relative)

    def check_links(self) -> None:
        """Every link again against the whole tree: a later member may have turned a name into a link."""
        for parts, entry in list(self.entries.items()):
            if isinstance(entry, tuple):
                self.resolve(entry, "/".join(parts))


def check_tar(archive: Path, tar: tarfile.TarFile, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    """All members of `tar`, each checked (see the module docstring); raises ValueError naming the first bad one."""
    tree, members, total = _Tree(archive), [], 0
    for member in tar:
        members.append(member)
        if len(members) > limits.max_members:
            raise _limit_error(archive, "the member count", len(members), limits.max_members,
                               "EFFNET_MAX_ARCHIVE_MEMBERS")  # fmt: skip
        if member.isdir():
            tree.add(member.name, "dir")
        elif member.isreg():
            tree.add(member.name, "file")
            total += member.size
        elif member.issym():
            parts = tree.parts(member.name)
            tree.add(member.name, tree.link_target(parts, member.linkname, member.name))
        elif member.islnk():
            target = tree.parts(member.linkname)
            if tree.entries.get(target) != "file" or tree.resolve(target, member.name) != target:
                raise tree.refuse(member.name, f"hard link to {member.linkname!r}, not a regular file of the archive")
            tree.add(member.name, "file")
        else:
            raise tree.refuse(member.name, "a device, FIFO or other special file")
        _check_size(archive, total, limits)
    tree.check_links()
    return members


def _check_size(archive: Path, total: int, limits: ArchiveLimits) -> None:
    if total > limits.max_bytes:
        raise _limit_error(archive, "the uncompressed size in bytes", total, limits.max_bytes,
                           "EFFNET_MAX_ARCHIVE_BYTES")  # fmt: skip
    ratio = total / max(archive.stat().st_size, 1)
    if ratio > limits.max_ratio:
        raise _limit_error(archive, "the compression ratio", ratio, limits.max_ratio, "EFFNET_MAX_ARCHIVE_RATIO")


# Progress bars for the phases that can take more than a few seconds, kept off for small inputs.
QUIET_BELOW = {"delay": 2.0, "mininterval": 1.0}


def extract_tar(archive: Path, destination: Path, limits: ArchiveLimits) -> None:
    with tarfile.open(archive) as tar:
        members = check_tar(archive, tar, limits)
        options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        try:  # member by member, for a progress bar: CIFAR's 60,000 files take a minute or more
            for member in tqdm(members, desc=f"extracting {archive.name}", unit="file", leave=False, **QUIET_BELOW):
                tar.extract(member, destination, **options)
        except tarfile.FilterError as error:
            raise ValueError(f"{archive}: unsafe archive member refused ({error}); the archive is not used") from None


def extract_zip(archive: Path, destination: Path, limits: ArchiveLimits) -> None:
    """Zip members are written here, not by `extractall`, so that no member can grow past its declared size."""
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        if len(infos) > limits.max_members:
            raise _limit_error(archive, "the member count", len(infos), limits.max_members,
                               "EFFNET_MAX_ARCHIVE_MEMBERS")  # fmt: skip
        tree = _Tree(archive)
        for info in infos:
            tree.add(info.filename, "dir" if info.is_dir() else "file")
        _check_size(archive, sum(info.file_size for info in infos), limits)
        for info in infos:
            path = destination.joinpath(*tree.parts(info.filename))
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as source, path.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
                if target.tell() > info.file_size:
                    raise ValueError(f"{archive}: member {info.filename!r} is larger than it declares; refused")


def verify_tree(archive: Path, destination: Path) -> None:
    """After extraction: every path under `destination` is a folder, a regular file or a link that
    resolves inside it, and no file is hard-linked to one outside. Raises ValueError otherwise."""
    root = destination.resolve()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat_module.S_ISLNK(mode):
                _resolve_on_disk(archive, root, Path(path).relative_to(root))
            elif not (stat_module.S_ISREG(mode) or stat_module.S_ISDIR(mode)):
                raise ValueError(f"{archive}: extraction produced a special file {path}; the archive is not used")
    _check_hard_links(archive, root)


def _check_hard_links(archive: Path, root: Path) -> None:
    """A file with more names than the tree holds has one outside it (a hard link that escaped)."""
    counts: dict[tuple[int, int], list[int]] = {}
    for parent, _, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(parent, name))
            if stat_module.S_ISREG(info.st_mode) and info.st_nlink > 1:
                entry = counts.setdefault((info.st_dev, info.st_ino), [0, info.st_nlink])
                entry[0] += 1
    for inside, links in counts.values():
        if links > inside:
            raise ValueError(f"{archive}: an extracted file is hard-linked outside the extraction folder; refused")


def _resolve_on_disk(archive: Path, root: Path, relative: Path) -> None:
    """Resolve `relative` under `root` one component at a time with `os.readlink` (no `realpath`, which
    gives up silently on over-long paths); raise when any step leaves `root`."""
    pending, resolved, hops = list(relative.parts), [], 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise ValueError(f"{archive}: the link {relative} points outside the extraction folder; refused")
            resolved.pop()
            continue
        path = root.joinpath(*resolved, part)
        try:
            is_link = path.is_symlink()
        except OSError as error:  # ENAMETOOLONG and the like: refuse rather than guess
            raise ValueError(f"{archive}: the link {relative} cannot be resolved ({error}); refused") from None
        if not is_link:
            resolved.append(part)
            continue
        hops += 1
        target = os.readlink(path)
        if hops > MAX_LINK_HOPS or os.path.isabs(target):
            raise ValueError(f"{archive}: the link {relative} points outside the extraction folder; refused")
        pending = list(Path(target).parts) + pending
