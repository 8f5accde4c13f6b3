"""Where effnet keeps what it can make again: downloads, extracted archives, decoded images and the
per-machine measurements of `effnet.runtime`.

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
