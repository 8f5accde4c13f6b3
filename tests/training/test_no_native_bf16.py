"""On a CPU without native bf16 (AVX2: PyTorch emulates bf16 there, and its bf16 depthwise
convolution is two orders of magnitude slower than fp32) no default path may compute in bf16:
not the feature cache's prefix, not training, not evaluation or prediction. The CPU kind is forced
through `EFFNET_NATIVE_BF16`, so this runs on any machine. (The counter-check with native bf16 forced
on, which showed the spy seeing bf16, built OpenVINO bf16 engines in the pytest process and made a later
fork segfault; it is left out until that is understood, see the issue-15 note.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_model

from effnet import runtime
from effnet.data import load_data
from effnet.evaluation.evaluate import evaluate
from effnet.inference import create_engine
from effnet.training import fit


class AutocastSpy:
    """Records the dtype of every autocast region entered (through `torch.autocast`) and of every
    convolution input, while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.autocast: list[torch.dtype] = []
        self.conv_inputs: set[torch.dtype] = set()
        spy = self
        original = torch.autocast

        class Recording(original):
            def __enter__(self):
                if self._enabled:
                    spy.autocast.append(self.fast_dtype)
                return super().__enter__()

        monkeypatch.setattr(torch, "autocast", Recording)
        original_conv = torch.nn.functional.conv2d

        def conv2d(input, *args, **kwargs):
            spy.conv_inputs.add(torch.bfloat16 if torch.is_autocast_enabled("cpu") else input.dtype)
            return original_conv(input, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
        monkeypatch.setattr(torch.nn.modules.conv.F, "conv2d", conv2d)

    @property
    def saw_bf16(self) -> bool:
        return torch.bfloat16 in self.autocast or torch.bfloat16 in self.conv_inputs


def _default_run(image_folder: Path, fast_options: dict, native: str, monkeypatch, tmp_path: Path) -> AutocastSpy:
    monkeypatch.setenv("EFFNET_NATIVE_BF16", native)
    monkeypatch.setenv("EFFNET_CACHE", str(tmp_path / f"cache-{native}"))
    spy = AutocastSpy(monkeypatch)
    options = fast_options | {"precision": "auto", "finetune": "last:4", "cache_frozen": True, "cache_views": 2}
    options["output"] = str(tmp_path / f"run-{native}")
    result = fit(tiny_model(), str(image_folder), **options)
    splits = load_data(str(image_folder), data_dir=fast_options["data_dir"], val_split=0.25)
    evaluate(result.model, splits.test, list(splits.class_names), img_size=32, backend="auto", batch_size=4)
    create_engine(result.model, "auto", img_size=32, batch_size=4)(torch.randn(2, 3, 32, 32))
    return spy


def _choices(tmp_path: Path, native: str) -> list[str]:
    files = list((tmp_path / f"cache-{native}" / "runtime").glob("choices-*.json"))
    return [answer for file in files for answer in json.loads(file.read_text()).values()]


def test_without_native_bf16_no_default_path_computes_in_bf16(image_folder, fast_options, monkeypatch, tmp_path):
    spy = _default_run(image_folder, fast_options, "0", monkeypatch, tmp_path)
    assert not runtime.cpu_supports_bf16()
    assert spy.conv_inputs == {torch.float32}, spy.conv_inputs
    assert spy.autocast == [], spy.autocast
    choices = _choices(tmp_path, "0")
    assert choices and not any("bf16" in str(choice) for choice in choices), choices


def test_the_emulated_avx2_environment_is_recognised(monkeypatch) -> None:
    monkeypatch.delenv("EFFNET_NATIVE_BF16", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = runtime.cpu_info()
    assert info.isa == "AVX2" and not info.native_bf16
    assert "no native bf16" in info.describe()
