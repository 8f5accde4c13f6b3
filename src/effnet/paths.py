"""Where effnet keeps what it can make again (downloads, extracted archives, decoded images and the
per-machine measurements of `effnet.runtime`: `cache_dir`), and the outputs made without `--output`
(`runs_dir`).

The field's convention (torch hub, Hugging Face, timm) is a per-user cache folder, overridable by an
environment variable, so that nothing lands in whatever folder the user happens to stand in.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EFFNET_CACHE"


def cache_dir(*parts: str) -> Path:
    """`$EFFNET_CACHE`, else `$XDG_CACHE_HOME/effnet`, else `~/.cache/effnet`, joined with `parts`.

    Only the path is computed: callers create the folders they write into."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "effnet") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "effnet")
    return Path(root).joinpath(*parts)


RUNS_ENV = "EFFNET_RUNS"


def runs_dir(*parts: str) -> Path:
    """Where outputs go when no `--output` is given: `$EFFNET_RUNS`, else `$XDG_DATA_HOME/effnet/runs`,
    else `~/.local/share/effnet/runs`, joined with `parts`.

    Not the cache folder: runs (trained weights, reports) cannot be made again for free, so clearing
    the cache must never delete them; and not the current folder, where files would land unasked.
    `EFFNET_RUNS=runs` gives the timm/Lightning habit of a folder beside the user back."""
    root = os.environ.get(RUNS_ENV)
    if not root:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = xdg or os.path.join(os.path.expanduser("~"), ".local", "share")
        root = os.path.join(base, "effnet", "runs")
    return Path(root).joinpath(*parts)
