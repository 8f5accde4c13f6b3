"""One small interface for running a classifier: `create_engine(model, backend)` returns a callable
that maps a float batch (N, 3, H, W), already preprocessed, to logits (N, classes) on the CPU.

`eval` and `predict` go through it, so every backend is measured and checked the same way. A
non-torch backend is verified against PyTorch on its first batch (top-1 agreement and max abs
difference, logged), because a silently wrong export is worse than a slow one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

log = logging.getLogger("effnet")

BACKENDS = ("auto", "torch", "onnxruntime")
PARITY_TOLERANCE = 1e-4


class Engine(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchEngine:
    """The model itself, in eval mode, without autograd."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float().cpu()


class OnnxRuntimeEngine:
    """An ONNX file run by ONNX Runtime on the CPU. With `reference` (the PyTorch model it came
    from) the first batch is also run through PyTorch and the two are compared."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, reference: nn.Module | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise RuntimeError("backend 'onnxruntime' needs ONNX Runtime: pip install 'effnet[export]'") from error
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.reference = reference
        self.parity: dict[str, float] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.from_numpy(self.session.run(None, {self.input_name: images.float().cpu().numpy()})[0])
        if self.reference is not None and self.parity is None:
            self.parity = check_parity(self.reference, logits, images, self.name)
        return logits


def check_parity(reference: nn.Module, logits: torch.Tensor, images: torch.Tensor, backend: str) -> dict[str, float]:
    """Compare a backend's logits with PyTorch's on the same batch; log and return the figures."""
    with torch.inference_mode():
        expected = reference.eval()(images.to(next(reference.parameters()).device)).float().cpu()
    report = {
        "max_abs_diff": float((logits - expected).abs().max()),
        "top1_agreement": float((logits.argmax(1) == expected.argmax(1)).float().mean()),
        "batch": int(images.shape[0]),
    }
    log.info(
        "%s parity with PyTorch on %d images: top-1 agreement %.1f%%, max abs diff %.2e (tolerance %.0e)",
        backend,
        report["batch"],
        100 * report["top1_agreement"],
        report["max_abs_diff"],
        PARITY_TOLERANCE,
    )
    if report["max_abs_diff"] > PARITY_TOLERANCE:
        log.warning("%s differs from PyTorch by more than %.0e", backend, PARITY_TOLERANCE)
    return report


def create_engine(
    model: nn.Module | str | Path,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    img_size: int | None = None,
) -> Engine:
    """An `Engine` for `model` (a module, or the path of an exported .onnx file).

    backend: 'torch', 'onnxruntime' (a module is exported to a temporary ONNX file first, at
    `img_size`, with a dynamic batch size) or 'auto' (the backend that fits: ONNX Runtime for an
    .onnx file, PyTorch for a module).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(model, (str, Path)):
        if backend == "torch":
            raise ValueError(f"{model} is an exported ONNX file: use --backend onnxruntime (or auto)")
        return OnnxRuntimeEngine(model)
    if backend in ("auto", "torch"):
        return TorchEngine(model, device)
    from effnet.export import export_onnx

    size = img_size or model.config.preprocess.input_size
    with tempfile.TemporaryDirectory(prefix="effnet-onnx-") as folder:
        # ONNX Runtime reads the whole file when the session is made; the file can go afterwards.
        path = export_onnx(model.cpu().eval(), Path(folder) / "model.onnx", img_size=size)
        return OnnxRuntimeEngine(path, reference=model)
