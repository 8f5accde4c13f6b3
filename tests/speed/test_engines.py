"""The fast inference engines agree with the plain model: the torch engine (batch norm folded,
channels-last) to fp32 rounding, OpenVINO (bf16 where the CPU has it) to bf16 rounding."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from effnet import create_model, inference, runtime
from effnet.inference import BF16_PARITY_TOLERANCE, TorchEngine, create_engine


@pytest.fixture(scope="module")
def model_and_images() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=10).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64) * 2 + 0.5)  # running statistics worth folding
    return model.eval(), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_torch_engine_matches_the_model(model_and_images) -> None:
    model, images = model_and_images
    with torch.no_grad():
        expected = model(images)
    assert expected.std() > 1e-3
    torch.testing.assert_close(TorchEngine(model)(images), expected, atol=1e-4, rtol=0)


class _FakeEngine:
    """An engine that takes `delay` seconds per call, for the chooser to time."""

    def __init__(self, label: str, delay: float) -> None:
        self.name, self.delay, self.parity = label, delay, None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.zeros(len(images), 10)


def test_auto_measures_the_candidates_keeps_the_fastest_and_remembers_it(
    model_and_images, monkeypatch, tmp_path, caplog
) -> None:
    model, _ = model_and_images
    monkeypatch.setenv("EFFNET_CACHE", str(tmp_path))
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "0")
    built: list[str] = []
    delays = {"f32": 0.001, None: 0.03}  # OpenVINO fast, torch slow in this fake world

    def fake_openvino(model, size, precision=None, converted=None):
        built.append(f"openvino {precision}")
        return _FakeEngine("openvino", delays["f32"])

    class FakeTorch(_FakeEngine):
        def __init__(self, model, device="cpu", dtype=None) -> None:
            built.append(f"torch {dtype}")
            super().__init__("torch", delays[None])

    monkeypatch.setattr(inference, "OpenVinoEngine", fake_openvino)
    monkeypatch.setattr(inference, "TorchEngine", FakeTorch)
    monkeypatch.setattr(inference, "convert_openvino", lambda model, size: "converted")
    monkeypatch.setattr(inference, "openvino_available", lambda: True)
    with caplog.at_level("INFO", logger="effnet"):
        engine = create_engine(model, backend="auto", img_size=64, batch_size=2)
    assert engine.name == "openvino"
    assert built == ["torch None", "openvino f32"]  # no bf16 candidate without native bf16
    assert any("the fastest measured here" in record.getMessage() for record in caplog.records)
    assert len(list(tmp_path.glob("runtime/choices-*.json"))) == 1
    built.clear()
    delays["f32"], delays[None] = 0.03, 0.001  # the machine's answer is kept: no new measurement
    assert create_engine(model, backend="auto", img_size=64, batch_size=2).name == "openvino"
    assert built == ["openvino f32"]
    monkeypatch.setenv("EFFNET_REMEASURE", "1")
    assert create_engine(model, backend="auto", img_size=64, batch_size=2).name == "torch"
    monkeypatch.setattr(inference, "openvino_available", lambda: False)
    built.clear()
    assert create_engine(model, backend="auto", img_size=64).name == "torch"
    assert built == ["torch None"]  # the only candidate: nothing to measure


def test_candidates_take_turns_so_a_slow_spell_does_not_pick_the_slower() -> None:
    """A slow spell covering the first four calls, then the machine at its speed: timed one after the
    other, the faster candidate would have had only slow calls; taking turns, both get quiet ones."""
    calls = 0

    def engine(delay: float):
        def call() -> None:
            nonlocal calls
            calls += 1
            time.sleep(delay * (4 if calls <= 4 else 1))

        return call

    best = runtime.interleaved_best_seconds({"fast": engine(0.01), "slow": engine(0.02)}, rounds=3)
    assert calls == 8  # one warm-up and three timed calls each
    assert best["fast"] < 0.8 * best["slow"], best
    assert best["fast"] < 0.02  # a quiet call, not one of the slow spell's (0.04)


def test_inference_candidates_follow_native_bf16(monkeypatch) -> None:
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "0")
    assert runtime.inference_candidates(True) == ["torch fp32", "openvino f32"]
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "1")
    assert runtime.inference_candidates(False) == ["torch fp32", "torch bf16"]
    assert "openvino bf16" in runtime.inference_candidates(True)


def test_a_forced_precision_leaves_only_the_backends_to_choose(monkeypatch) -> None:
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "1")
    assert runtime.inference_candidates(True, "fp32") == ["torch fp32", "openvino f32"]
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "0")
    assert runtime.inference_candidates(False, "bf16") == ["torch bf16"]  # forced: the user's call
    assert runtime.inference_candidates(True, "fp16") == runtime.inference_candidates(True)  # a GPU precision


def test_openvino_engine_matches_the_model_and_reports_parity(model_and_images) -> None:
    import openvino  # noqa: F401  (the [fast] extra: missing, it fails rather than skips)

    model, images = model_and_images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = create_engine(model, backend="openvino", img_size=64)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], [
        str(w.message) for w in caught
    ]  # the conversion prints none of torch.jit's deprecation notices
    logits = engine(images)
    with torch.no_grad():
        expected = model(images)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= BF16_PARITY_TOLERANCE * max(1.0, expected.abs().max().item())
    assert engine.parity is not None and engine.parity["batch"] == 3
    assert engine(images[:1]).shape == (1, 10)  # dynamic batch size


def test_parity_allows_a_difference_relative_to_the_largest_logit(caplog) -> None:
    """bf16 logits of a trained network (up to ~10) differ by ~0.1: within 5e-2 of 10, not of 1."""
    scale = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        scale.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 5.0], [-10.0, 0.0]]))
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    shifted = scale(images).detach() + 0.2
    with caplog.at_level("WARNING", logger="effnet"):
        report = inference.check_parity(scale, shifted, images, "bf16 backend", BF16_PARITY_TOLERANCE)
    assert report["allowed_diff"] == pytest.approx(0.5) and report["max_abs_diff"] == pytest.approx(0.2)
    assert "differs" not in caplog.text
    with caplog.at_level("WARNING", logger="effnet"):
        inference.check_parity(scale, shifted, images, "fp32 backend")
    assert "fp32 backend differs from PyTorch" in caplog.text
