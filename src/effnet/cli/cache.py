"""`effnet cache`: what effnet keeps in its cache folder (`effnet.paths.cache_dir`), and clearing it.

Everything there can be made again (downloaded, extracted, decoded or measured anew), so clearing costs only
time. Only the folders effnet writes are ever deleted, never anything else under `$EFFNET_CACHE` (it may
point at a folder shared with other tools), and never the runs folder, whose trained weights cannot be made
again for free.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from effnet.paths import CACHE_ENV, RUNS_ENV, cache_dir, runs_dir

# name -> (path relative to the data folder or the cache root, what it holds)
PARTS = {
    "extracted": ("data", "extracted", "unpacked archives, one copy per archive version"),
    "decoded": ("data", "decoded", "decoded pixels of image folders"),
    "downloads": ("data", "", "torchvision's downloads (CIFAR, Flowers-102)"),
    "runtime": ("cache", "runtime", "per-machine speed measurements"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache",
        help="show the sizes of effnet's cache folder (downloads, extracted archives, decoded images, "
        "measurements) or clear it",
        description=f"The cache folder is ${CACHE_ENV}, else $XDG_CACHE_HOME/effnet, else ~/.cache/effnet (now "
        f"{cache_dir()}). Everything in it can be made again; runs (${RUNS_ENV}) are never touched.",
    )
    p.add_argument(
        "--clear",
        nargs="?",
        const="all",
        choices=("all", *PARTS),
        metavar="WHAT",
        help=f"delete one part ({', '.join(PARTS)}) or all of them (the default); runs in progress that read "
        "the cache should be stopped first",
    )
    p.add_argument("--data-dir", help=f"a data folder given to --data-dir elsewhere (default {cache_dir('data')})")
    p.set_defaults(func=cmd_cache)


def part_paths(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Where each part of the cache lives, for the default data folder or `data_dir`."""
    data = Path(data_dir) if data_dir else cache_dir("data")
    roots = {"data": data, "cache": cache_dir()}
    return {name: roots[root] / sub if sub else roots[root] for name, (root, sub, _) in PARTS.items()}


def folder_size(path: Path, skip: tuple[Path, ...] = ()) -> tuple[int, int]:
    """(bytes, files) under `path`, symbolic links not followed, the folders in `skip` left out."""
    total = files = 0
    if not path.is_dir():
        return 0, 0
    for entry in os.scandir(path):
        if Path(entry.path) in skip:
            continue
        if entry.is_dir(follow_symlinks=False):
            size, count = folder_size(Path(entry.path), skip)
            total, files = total + size, files + count
        elif entry.is_file(follow_symlinks=False):
            total, files = total + entry.stat(follow_symlinks=False).st_size, files + 1
    return total, files


def human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def clear(name: str, paths: dict[str, Path]) -> int:
    """Delete one part; returns the bytes freed. `downloads` is the data folder less the other parts."""
    nested = tuple(path for other, path in paths.items() if other != name)
    freed = folder_size(paths[name], nested)[0]
    if name != "downloads":
        shutil.rmtree(paths[name], ignore_errors=True)
        return freed
    for entry in paths[name].iterdir() if paths[name].is_dir() else []:
        if entry in nested:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return freed


def cmd_cache(args: argparse.Namespace) -> int:
    paths = part_paths(args.data_dir)
    if args.clear:
        names = list(PARTS) if args.clear == "all" else [args.clear]
        for name in names:
            print(f"cleared {name}: {human(clear(name, paths))} ({paths[name]})")
        return 0
    print(f"effnet cache: {cache_dir()}  (${CACHE_ENV} moves it)")
    total = 0
    for name, path in paths.items():
        size, files = folder_size(path, tuple(other for other in paths.values() if other != path))
        total += size
        print(f"  {name:10} {human(size):>9} {files:>8,} files  {path}  - {PARTS[name][2]}")
    print(f"  {'total':10} {human(total):>9}   (effnet cache --clear [WHAT] deletes; all of it can be made again)")
    runs = runs_dir()
    count = sum(1 for entry in runs.iterdir() if entry.is_dir()) if runs.is_dir() else 0
    print(f"runs: {runs}  ({count} folders; ${RUNS_ENV} moves it; not a cache: never cleared here)")
    return 0
