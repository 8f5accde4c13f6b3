"""Counting and timing models, one way for every command (`summary`, `models`, `compare`,
`bench`, `search`), so that numbers of the same kind are always comparable.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as
two FLOPs; we report MACs = FLOPs / 2, the unit of the paper's Table 2 ("FLOPs" there are
multiply-adds).
"""

from __future__ import annotations

import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | tuple[int, int], batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image, at `img_size`, in eval mode."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(batch_size, 3, height, width, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


def _summary_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Direct children, with `nn.Sequential` containers (stages) opened up into their blocks."""
    found = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            found += _summary_modules(child, full + ".")
        else:
            found.append((full, child))
    return found


@torch.no_grad()
def layer_table(model: nn.Module, img_size: int) -> list[LayerRow]:
    """One row per top-level layer and per MBConv block (`stem`, `stages.3.1`, `head`, ...) in
    execution order, with its output shape for one image and its parameters: a Keras-style summary."""
    rows: list[LayerRow] = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            rows.append(LayerRow(name, type(module).__name__, tuple(output.shape), count_params(module)))

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in _summary_modules(model)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return rows


@dataclass
class Timing:
    """Seconds per call over repeated runs; images/s from the median."""

    seconds: list[float]
    batch_size: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.median

    @property
    def spread(self) -> tuple[float, float]:
        """images/s of the slowest and the fastest run."""
        return self.batch_size / max(self.seconds), self.batch_size / min(self.seconds)


def time_calls(fn: Callable[[], object], batch_size: int, warmup: int = 2, repeats: int = 5) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds, batch_size)


def random_batch(model: nn.Module, batch_size: int, img_size: int | tuple[int, int]) -> torch.Tensor:
    """Random images on the model's device, in the memory format of its weights (channels-last
    models get channels-last inputs, as `runtime.prepare_model` arranges for real data)."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    weight = next(p for p in model.parameters() if p.dim() == 4)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    batch = torch.randn(batch_size, 3, height, width, device=weight.device)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def time_inference(
    model: nn.Module, batch_size: int, img_size: int | tuple[int, int], warmup: int = 2, repeats: int = 5
) -> Timing:
    """Forward passes in eval mode under `torch.inference_mode` (batch 1: latency; larger: throughput)."""
    batch = random_batch(model, batch_size, img_size)
    model.eval()
    with torch.inference_mode():
        return time_calls(lambda: model(batch), batch_size, warmup, repeats)


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_rss_bytes() -> int:
    """The peak resident memory of this process (what the OS had to provide: weights, activations,
    oneDNN scratch space, allocator caches). Linux's VmHWM, which `reset_peak_memory` can reset;
    elsewhere getrusage's max RSS, which never decreases."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # Unix only; imported here so the rest of the module works on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA's allocator peak on a GPU, the process's peak RSS otherwise."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the baseline to subtract from `peak_memory_bytes`.

    Where the peak can be reset (CUDA; Linux through /proc/self/clear_refs) the baseline is the
    current footprint, so even a model smaller than `import torch`'s transient peak is measured;
    elsewhere it is the peak so far, and only the first measurement in a fresh process is right.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        current = _proc_status_bytes("VmRSS")
    except OSError:
        current = None
    return current if current is not None else max_rss_bytes()


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a fresh Python process; its result (or exception) comes back pickled.

    Per-model peak memory needs a new process each time (memory an earlier model freed stays in
    the allocator's caches and is reused unseen; without /proc the peak never goes down), and a
    new process keeps one model's caches and thread pools from colouring the next one's timings. A plain
    subprocess rather than multiprocessing's spawn, which would re-import the caller's `__main__`
    (and fail in scripts without an `if __name__ == "__main__"` guard). `fn` must be importable.
    """
    with tempfile.TemporaryDirectory(prefix="effnet-isolated-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((fn, args, kwargs)))
        code = f"from effnet.profiling import _run_job; _run_job({str(job)!r}, {str(result)!r})"
        completed = subprocess.run([sys.executable, "-c", code], check=False)
        if not result.is_file():
            raise RuntimeError(
                f"the measuring process died while running {fn.__name__} (exit status {completed.returncode}; "
                "killed for lack of memory? try a smaller batch size)"
            )
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise value
    return value


def _run_job(job: str, result: str) -> None:
    """The child's side of `run_isolated`: malloc as the parent set it, then the call."""
    from effnet.runtime import inherit_malloc

    inherit_malloc()
    fn, args, kwargs = pickle.loads(Path(job).read_bytes())
    try:
        outcome = (True, fn(*args, **kwargs))
    except Exception as error:  # handed to the parent, which raises it
        outcome = (False, error)
    Path(result).write_bytes(pickle.dumps(outcome))
