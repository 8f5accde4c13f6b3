"""`pip install .` into a fresh venv (no extras, nothing else) gives a working `effnet`: the plots module
(scipy) imports, and `--version` and every command's `--help` run from a folder that stays empty.

Two to four minutes on this 2-core machine (pip installs torch, scipy, matplotlib... from the local wheel
cache), too long for every run of the suite: it runs with EFFNET_TEST_CLEAN_INSTALL=1 (before a release, or
after a change of dependencies); the import scan of tests/test_ecosystem.py guards the same in every run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from effnet import __version__

ROOT = Path(__file__).resolve().parents[1]


def copy_source(destination: Path) -> Path:
    """The files a build reads, so that the build's own files (build/, *.egg-info) land outside the checkout."""
    shutil.copytree(ROOT / "src", destination / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, destination / name)
    return destination


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.environ.get("EFFNET_TEST_CLEAN_INSTALL"), reason="set EFFNET_TEST_CLEAN_INSTALL=1 (minutes)")
def test_pip_install_in_a_clean_venv(tmp_path):
    source = copy_source(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, effnet = venv / "bin" / "python", venv / "bin" / "effnet"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(python), "-m", "pip", "install", "-q", str(source)]
    install = subprocess.run(pip, capture_output=True, text=True, env=env, timeout=840)
    assert install.returncode == 0, install.stderr[-3000:]
    here = tmp_path / "cwd"
    here.mkdir()

    def run(*command: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, cwd=here, env=env, timeout=120)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        return done.stdout

    run(str(python), "-c", "import effnet.evaluation.plots, effnet.cli.cache")
    assert run(str(effnet), "--version").strip() == f"effnet {__version__}"
    commands = re.findall(r"^    ([a-z]+)\s", run(str(effnet), "--help"), flags=re.MULTILINE)
    assert {"train", "eval", "export", "cache"} <= set(commands)
    for command in commands:
        assert "usage: effnet" in run(str(effnet), command, "--help")
    assert list(here.iterdir()) == []
