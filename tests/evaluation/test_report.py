"""report.html: written by the training loop, self-contained, and rendered by headless Chromium into a
non-blank page whose text holds the test accuracy."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from effnet.cli import main

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium not installed (apt-get install chromium; .ci/run installs it)")


def test_report_is_self_contained(tiny_run) -> None:
    page = (tiny_run / "report.html").read_text()  # written by fit() at the end of training
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page), "external reference in report.html"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 6  # curves, 2 confusion matrices, top losses, reliability, samples
    for encoded in images:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            assert np.asarray(image.convert("L"), dtype=float).std() > 5
    evaluation = json.loads((tiny_run / "eval" / "eval.json").read_text())
    for name in evaluation["per_class"]:
        assert f"<td>{name['class']}</td>" in page


def test_report_renders_in_headless_chromium(tiny_run, tmp_path) -> None:
    browser = chromium()
    assert main(["report", str(tiny_run)]) == 0
    report = tiny_run / "report.html"
    evaluation = json.loads((tiny_run / "eval" / "eval.json").read_text())
    flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1280,2000", f"--screenshot={screenshot}", report.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    dom = subprocess.run(
        [*flags, "--dump-dom", report.as_uri()], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    accuracy = f"{100 * evaluation['top1']:.2f}%"
    assert f"{accuracy} test top-1" in " ".join(text.split())
