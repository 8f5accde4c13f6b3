"""One small interface for running a classifier: `create_engine(model, backend)` returns a callable
that maps a float batch (N, 3, H, W), already preprocessed, to logits (N, classes) on the CPU.

`eval` and `predict` go through it, so every backend is measured and checked the same way. A
non-torch backend is verified against PyTorch on its first batch (top-1 agreement and max abs
difference, logged), because a silently wrong export is worse than a slow one.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from effnet import runtime

log = logging.getLogger("effnet")

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# Parity tolerances relative to the largest logit (at least 1): fp32 backends reorder sums and agree
# to ~1e-5 of it; bf16 keeps 8 bits of mantissa, so its logits agree to about 1% of their range.
PARITY_TOLERANCE = 1e-4
BF16_PARITY_TOLERANCE = 5e-2


class Engine(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchEngine:
    """The model in eval mode, without autograd, batch norms folded into the convolutions and
    channels-last (`runtime.prepare_inference_model`): the same logits within fp32 rounding, or
    within bf16 rounding under `dtype=torch.bfloat16` (autocast; chosen by `runtime` only where
    the CPU computes bf16 natively)."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.model = runtime.prepare_inference_model(model, self.device)
        self.dtype = dtype
        self.precision = runtime.DTYPE_NAMES[dtype]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        with runtime.autocast(self.device, self.dtype):
            return self.model(images).float().cpu()


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


class OpenVinoEngine:
    """The model converted to OpenVINO and compiled for the CPU at `precision` ("f32" or "bf16";
    default: bf16 only where the CPU computes it natively). `converted` reuses an earlier
    conversion of the same model (`convert_openvino`), which takes longer than compiling. The first
    batch is also run through PyTorch and the two are compared."""

    name = "openvino"

    def __init__(self, model: nn.Module, img_size: int, precision: str | None = None, converted=None) -> None:
        ov = _openvino()
        self.reference = model.cpu().eval()
        self.precision = precision or ("bf16" if runtime.cpu_supports_bf16() else "f32")
        self.bf16 = self.precision == "bf16"
        converted = converted if converted is not None else convert_openvino(self.reference, img_size)
        compiled = ov.Core().compile_model(
            converted, "CPU", {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        )
        self.request = compiled.create_infer_request()
        self.parity: dict[str, float] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.request.infer({0: images.float().cpu().contiguous().numpy()})
        logits = torch.from_numpy(outputs[0].copy())
        if self.parity is None:
            tolerance = BF16_PARITY_TOLERANCE if self.bf16 else PARITY_TOLERANCE
            self.parity = check_parity(self.reference, logits, images, self.name, tolerance)
        return logits


def _openvino():
    try:
        import openvino
    except ImportError as error:
        raise RuntimeError("backend 'openvino' needs OpenVINO: pip install 'effnet[fast]'") from error
    return openvino


def convert_openvino(model: nn.Module, img_size: int):
    """`model` as an OpenVINO model with a dynamic batch of `img_size` images (traced by OpenVINO's
    PyTorch frontend; its tracer warnings are about constants that are constant at a fixed size)."""
    ov = _openvino()
    example = torch.zeros(1, 3, img_size, img_size)
    started = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")  # the frontend's own calls
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        converted = ov.convert_model(model.cpu().eval(), example_input=example, input=[(-1, 3, img_size, img_size)])
    log.debug("converted to OpenVINO in %.1f s", time.perf_counter() - started)
    return converted


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def check_parity(
    reference: nn.Module,
    logits: torch.Tensor,
    images: torch.Tensor,
    backend: str,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Compare a backend's logits with PyTorch's on the same batch; log and return the figures.
    The allowed difference is `tolerance` times the largest logit magnitude (at least 1): a trained
    network's logits reach 10-20, an untrained one's stay near 0."""
    with torch.inference_mode():
        expected = reference.eval()(images.to(next(reference.parameters()).device)).float().cpu()
    limit = tolerance * max(1.0, float(expected.abs().max()))
    report = {
        "max_abs_diff": float((logits - expected).abs().max()),
        "allowed_diff": limit,
        "top1_agreement": float((logits.argmax(1) == expected.argmax(1)).float().mean()),
        "batch": int(images.shape[0]),
    }
    log.info(
        "%s parity with PyTorch on %d images: top-1 agreement %.1f%%, max abs diff %.2e (allowed %.1e: %.0e of the "
        "largest logit)",
        backend,
        report["batch"],
        100 * report["top1_agreement"],
        report["max_abs_diff"],
        limit,
        tolerance,
    )
    if report["max_abs_diff"] > limit:
        log.warning("%s differs from PyTorch by more than %.1e", backend, limit)
    return report


def create_engine(
    model: nn.Module | str | Path,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    img_size: int | None = None,
    batch_size: int = 32,
    task: str | None = None,
    precision: str = "auto",
) -> Engine:
    """An `Engine` for `model` (a module, or the path of an exported .onnx file).

    backend: 'torch', 'onnxruntime' (a module is exported to a temporary ONNX file first, at
    `img_size`, with a dynamic batch size), 'openvino' (converted in memory) or 'auto': ONNX Runtime
    for an .onnx file; for a module on the CPU the fastest of the backends and precisions this CPU
    allows (`runtime.inference_candidates`), measured once per machine on batches of `batch_size`
    and remembered under `task` (default: the model's name and size); on a GPU, PyTorch. A CPU
    `precision` of 'fp32' or 'bf16' (a run's --precision) limits 'auto' to that precision.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(model, (str, Path)):
        if backend == "torch":
            raise ValueError(f"{model} is an exported ONNX file: use --backend onnxruntime (or auto)")
        return OnnxRuntimeEngine(model)
    size = img_size or model.config.preprocess.input_size
    if backend == "auto" and torch.device(device).type != "cpu":  # a GPU: its autocast dtype
        return TorchEngine(model, device, runtime.autocast_dtype(torch.device(device), "auto"))
    if backend == "auto":
        return _fastest_engine(model, size, batch_size, task or f"{_model_name(model)} {size}px", precision)
    if backend == "torch":
        return TorchEngine(model, device)
    if backend == "openvino":
        return OpenVinoEngine(model, size)
    return _onnxruntime_engine(model, size)


def _onnxruntime_engine(model: nn.Module, size: int) -> OnnxRuntimeEngine:
    from effnet.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="effnet-onnx-") as folder:
        # ONNX Runtime reads the whole file when the session is made; the file can go afterwards.
        path = export_onnx(model.cpu().eval(), Path(folder) / "model.onnx", img_size=size)
        return OnnxRuntimeEngine(path, reference=model)


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", None) or type(model).__name__


def _fastest_engine(model: nn.Module, size: int, batch_size: int, task: str, precision: str) -> Engine:
    """The engine `runtime.choose_inference` picks among the candidates this CPU (or `precision`) allows."""
    candidates = runtime.inference_candidates(openvino_available(), precision)

    def build(candidate: str) -> Engine:
        backend, kind = candidate.split(" ")
        if backend == "torch":
            return TorchEngine(model, "cpu", torch.bfloat16 if kind == "bf16" else None)
        # A fresh conversion per compiled precision: one converted model compiled twice (f32, bf16)
        # crashed the process later (a segfault at the next fork).
        return OpenVinoEngine(model, size, kind)

    example = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    return runtime.choose_inference(f"infer {task} batch {batch_size}", candidates, build, example)
