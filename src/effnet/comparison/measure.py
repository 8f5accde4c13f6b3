"""Measure each model the same way, each in its own process, and relate it to the EfficientNet
of similar accuracy as the paper's Table 2 does."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from effnet.comparison.zoo import build, describe
from effnet.profiling import (
    count_macs,
    count_params,
    peak_memory_bytes,
    random_batch,
    reset_peak_memory,
    run_isolated,
    time_inference,
)
from effnet.runtime import pick_device, prepare_model
from effnet.training.step import Step, fixed_batch_step

log = logging.getLogger("effnet")
MB = 2**20


@dataclass
class CompareRow:
    """One model: costs at its native resolution, measured speed and memory, reference accuracy,
    and its ratios to the reference EfficientNet (the one with the fewest MACs among the B0-B7 in
    the comparison whose top-1 is at least this model's)."""

    name: str
    family: str
    resolution: int
    top1: float | None
    top1_source: str
    params: int
    macs: int
    device: str = ""
    threads: int = 0
    batch_size: int = 0
    latency_ms: float | None = None  # batch 1, median
    images_per_s: float | None = None  # at batch_size, median
    images_per_s_range: tuple[float, float] | None = None  # slowest and fastest run
    inference_mb: float | None = None  # peak memory at batch_size, weights included
    training_mb: float | None = None
    reference: str = ""  # the EfficientNet it is compared with
    params_ratio: float | None = None
    macs_ratio: float | None = None
    speed_ratio: float | None = None  # images/s relative to the reference's

    @property
    def is_efficientnet(self) -> bool:
        return self.family == "efficientnet"

    @property
    def gmacs_per_s(self) -> float | None:
        """Multiply-adds actually achieved per second: how well the model uses the hardware.
        Depthwise convolutions do few MACs per byte moved, so EfficientNets score low here."""
        return None if self.images_per_s is None else self.images_per_s * self.macs / 1e9


def cost_row(name: str, model: nn.Module | None = None) -> CompareRow:
    """Parameters and MACs at the native resolution, with the reference accuracy; no timing."""
    entry = describe(name)
    model = model or build(name)
    return CompareRow(
        name=name,
        family=entry.family,
        resolution=entry.resolution,
        top1=entry.top1,
        top1_source=entry.top1_source,
        params=count_params(model),
        macs=count_macs(model, entry.resolution),
    )


@dataclass
class MemoryPeaks:
    """Peak resident memory above the process's footprint before the model was built (bytes)."""

    inference: int
    training: int


def measure_peak_memory(
    build_model: Callable[[], nn.Module],
    batch_size: int,
    img_size: int | tuple[int, int],
    device: torch.device | None = None,
    steps: int = 2,
) -> tuple[nn.Module, MemoryPeaks]:
    """Peak memory of inference and of training at `batch_size`, weights included.

    Call it in a fresh process (`run_isolated`): memory freed by an earlier model stays in the
    allocator's caches and would be reused unseen, and without a resettable peak (not Linux, not
    CUDA) the peak only grows. Inference is measured before training for the same reason. Two
    training steps, because optimizer state (momentum) appears only after the first. Returns the
    model for further use in the same process.
    """
    device = device or torch.device("cpu")
    baseline = reset_peak_memory(device)
    model = build_model()
    model.eval()
    batch = random_batch(model, batch_size, img_size)
    with torch.inference_mode():
        model(batch)
    inference = peak_memory_bytes(device) - baseline
    del batch
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = fixed_batch_step(Step(model, optimizer), batch_size, img_size, num_classes=2)
    for _ in range(steps):
        step()
    model.zero_grad(set_to_none=True)
    return model, MemoryPeaks(inference=inference, training=peak_memory_bytes(device) - baseline)


def measure_model(name: str, batch_size: int, repeats: int, warmup: int, threads: int, device: str) -> CompareRow:
    """Everything about one model; meant to run in a fresh process (`run_isolated`), memory first.

    All models run the same way: fp32, channels-last (`runtime.prepare_model`, what training
    uses), eval mode under inference_mode for speed, SGD with momentum for the training step.
    """
    torch.set_num_threads(threads)
    target = pick_device(device)
    entry = describe(name)
    model, memory = measure_peak_memory(
        lambda: prepare_model(build(name), target), batch_size, entry.resolution, device=target
    )
    latency = time_inference(model, 1, entry.resolution, warmup, repeats)
    throughput = time_inference(model, batch_size, entry.resolution, warmup, repeats)
    return dataclasses.replace(
        cost_row(name, model),
        device=str(target),
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        latency_ms=latency.median * 1000,
        images_per_s=throughput.images_per_second,
        images_per_s_range=throughput.spread,
        inference_mb=memory.inference / MB,
        training_mb=memory.training / MB,
    )


def compare_models(
    names: Sequence[str],
    batch_size: int = 16,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    device: str = "auto",
    costs_only: bool = False,
    on_row: Callable[[CompareRow], None] | None = None,
) -> list[CompareRow]:
    """Rows for `names`, in order, with the ratio columns filled in. Each model is measured in a
    fresh process, one at a time, so that peak memory is its own and models do not share cores.
    A model that fails (out of memory, an input size it rejects) is logged and left out."""
    threads = threads or torch.get_num_threads()
    rows = []
    for index, name in enumerate(names, 1):
        log.info("[%d/%d] %s", index, len(names), name)
        try:
            if costs_only:
                row = cost_row(name)
            else:
                row = run_isolated(measure_model, name, batch_size, repeats, warmup, threads, device)
        except (RuntimeError, ValueError) as error:  # one model out of memory must not lose the others
            log.error("%s left out: %s", name, error)
            continue
        rows.append(row)
        if on_row:
            on_row(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[CompareRow]) -> None:
    """Fill `reference` and the ratio columns: each model against the cheapest (fewest MACs)
    EfficientNet B0-B7 of this comparison whose reference top-1 is at least the model's, so
    ResNet-50 (76.1%) and DenseNet-169 (75.6%) face B0 (77.1%), ResNet-152 (78.3%) B1 (79.1%)."""
    efficientnets = sorted((r for r in rows if r.is_efficientnet and r.top1 is not None), key=lambda r: r.macs)
    for row in rows:
        if row.top1 is None:
            continue
        reference = next((e for e in efficientnets if e.top1 >= row.top1), None)
        if reference is None:
            continue
        row.reference = reference.name
        row.params_ratio = row.params / reference.params
        row.macs_ratio = row.macs / reference.macs
        if row.images_per_s and reference.images_per_s:
            row.speed_ratio = row.images_per_s / reference.images_per_s
