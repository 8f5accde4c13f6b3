"""Counting and timing models, one way for every command (`summary`, `models`, `compare`,
`bench`, `search`), so that numbers of the same kind are always comparable.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as
two FLOPs; we report MACs = FLOPs / 2, the unit of the paper's Table 2 ("FLOPs" there are
multiply-adds).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


def cpu_threads() -> int:
    return torch.get_num_threads() if torch.get_num_threads() else (os.cpu_count() or 1)
