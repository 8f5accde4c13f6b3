"""Where and how tensors run: device choice, mixed precision, memory format.

Training, prediction and the benchmarks all ask this module, so that "the default path" means
the same thing everywhere (`effnet bench` measures exactly what `effnet train` runs).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from effnet.models import fused


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast
    is a speed-up rather than an emulation."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if "AMX" in capability.upper():
        return True
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` in {'auto', 'fp32', 'bf16', 'fp16'}; None means fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 on CPUs that compute it natively. Measured for training (B0 224 px batch 32, one run at low
    # load): bf16 22.8 img/s vs fp32 17.2; at 128 px (batch 16, Lite0 batch 64) fp32 was as fast or
    # faster, so a small-image user may prefer --precision fp32.
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)


def release_freed_memory_eagerly(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc's malloc give large freed blocks back to the system at once; True if it took.

    By default glibc raises its mmap threshold to the size of the largest block freed so far (up to
    32 MiB), so a training step's activations of a few MiB each come from the heap, and the heap's
    holes keep the process's resident memory at its worst step's fragmentation. A fixed threshold
    serves every block above it by mmap and unmaps it on free. Measured (B0 224 px batch 32, two
    SGD steps, peak RSS; benchmarks/README.md): with --grad-checkpointing 856 -> 563 MiB, at the
    price of page faults on every large allocation. A no-op (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision for the forward pass, or nothing for fp32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def prepare_model(
    model: nn.Module, device: torch.device, channels_last: bool = True, memory_efficient: bool = True
) -> nn.Module:
    """Move to `device` and, by default, the channels-last memory format that oneDNN and cuDNN
    run depthwise and 1x1 convolutions fastest in.

    `memory_efficient` fuses each batch norm with its activation (`models.fused.memory_efficient`):
    the same numbers and state dict, one stored activation and one copy less per layer in training
    (B0 224 px batch 32: peak training memory 0.85x timm's, see benchmarks/README.md)."""
    if memory_efficient:
        fused.memory_efficient(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_inference_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy for inference: batch norms folded into the convolutions (fewer passes over
    memory, same logits within fp32 rounding), channels-last. Run it; do not save it (its state
    dict has conv biases instead of batch norms)."""
    return prepare_model(fused.fold_batchnorm(model), device, channels_last, memory_efficient=False).eval()


def choose_stage_precision(
    model: nn.Module, example: torch.Tensor, dtype: torch.dtype, rounds: int = 2, margin: float = 0.05
) -> list[bool]:
    """For each of `model.stages` (`models.layers.Stage`s; `model` an EfficientNet or the trainable
    suffix of one), whether it should compute in full precision inside a `dtype` autocast region:
    True when its training step measured faster in fp32 than under `dtype` by more than `margin`.

    Why measure: on this project's 2-core AVX-512 BF16 CPU (no AMX), with aten's depthwise backward
    pass, B0's training step at 224 px was faster under bf16 overall, yet its stages 3-6 (28x28 and
    below) ran forward and backward up to 2x faster in fp32, and Lite0's cached suffix (stages 4-7 at
    12x12) 1.6x. Which way each stage goes depends on the CPU's kernels (and on our own depthwise
    backward, `models.depthwise`, which narrowed the gap), so it is timed here, on `example` (a
    real-sized input batch of `model`) and on a copy of `model`, whose running statistics and
    gradients are thrown away: trainable stages forward and backward, frozen ones forward only.
    Each stage gets its input as the run would give it: from a stem or stage computing under `dtype`
    (the first stage of a suffix: `example` as it is). Fed fp32 instead, every stage had to cast its
    input down under `dtype` but not in fp32, which tipped B0's stage 1 at 224 px to fp32 (the whole
    step measured 0.68x of all-bf16 in that run). Best of `rounds` calls after one warm-up call."""
    with torch.random.fork_rng(devices=[]):  # dropout and drop path in `trial` must not move the caller's stream
        return _time_stages(copy.deepcopy(model), example, dtype, rounds, margin)


def _time_stages(trial: nn.Module, example: torch.Tensor, dtype: torch.dtype, rounds: int, margin: float) -> list[bool]:
    device_type = example.device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
        x = trial.stem.eval()(example) if hasattr(trial, "stem") else example
    choices = []
    for stage in trial.stages:
        trainable = any(p.requires_grad for p in stage.parameters())
        best = {False: float("inf"), True: float("inf")}
        for repeat in range(rounds + 1):
            for full in (False, True):
                stage.full_precision = full
                started = time.perf_counter()
                with torch.autocast(device_type, dtype=dtype), torch.set_grad_enabled(trainable):
                    out = stage(x)
                if trainable:
                    out.float().sum().backward()
                    stage.zero_grad(set_to_none=True)
                if repeat:
                    best[full] = min(best[full], time.perf_counter() - started)
        choices.append(best[True] < (1 - margin) * best[False])
        stage.full_precision = False
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
            x = stage(x).to(dtype)  # what the next stage gets from a neighbour computing in `dtype`
    return choices


def set_stage_precision(model: nn.Module, full_precision: list[bool]) -> None:
    """Apply `choose_stage_precision`'s answer to `model.stages`."""
    for stage, full in zip(model.stages, full_precision, strict=True):
        stage.full_precision = full
