"""Where and how tensors run: device choice, mixed precision, memory format.

Training, prediction and the benchmarks all ask this module, so that "the default path" means
the same thing everywhere (`effnet bench` measures exactly what `effnet train` runs).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from effnet.files import atomic_write_text
from effnet.models import depthwise, fused
from effnet.paths import cache_dir

log = logging.getLogger("effnet")
T = TypeVar("T")


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


ISA_LEVELS = ("AVX2", "AVX-512", "AVX-512 BF16", "AMX")  # what matters here: bf16 arithmetic from AVX-512 BF16 on
NATIVE_BF16_ENV = "EFFNET_NATIVE_BF16"  # "0" or "1": override the detection (tests, or a CPU that misreports)
# oneDNN's names for the ISA caps (ONEDNN_MAX_CPU_ISA) that leave no native bf16 arithmetic.
_ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class CpuInfo:
    """What this CPU offers the kernels we run, as PyTorch and oneDNN will use it.

    `isa` is the highest of ISA_LEVELS that both the hardware and the kernel libraries' caps allow:
    `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` on an AVX-512 machine gives "AVX2", and
    reproduces that kind's slow bf16 kernels (benchmarks/README.md), so tests and benchmarks can
    stand in for a machine of the other kind."""

    model: str
    flags: tuple[str, ...]  # the /proc/cpuinfo flags that decide `isa`
    isa: str
    threads: int

    @property
    def native_bf16(self) -> bool:
        forced = os.environ.get(NATIVE_BF16_ENV)
        if forced in ("0", "1"):
            return forced == "1"
        return ISA_LEVELS.index(self.isa) >= ISA_LEVELS.index("AVX-512 BF16")

    def describe(self) -> str:
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"CPU {self.model}, {self.isa} ({bf16}), {self.threads} threads"


def cpu_info() -> CpuInfo:
    """The CPU as seen by this process (see `CpuInfo`); cheap, read again on every call so that a
    test's environment variables take effect."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # one flag per ISA level, in order
    isa = ISA_LEVELS[max([i for i, flag in enumerate(wanted) if flag in flags], default=0)]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")().upper()
    if "AMX" in capability and isa != "AMX":  # torch saw AMX where /proc/cpuinfo is not readable
        isa = "AMX"
    if capability and "AVX512" not in capability and "AMX" not in capability:  # ATEN_CPU_CAPABILITY caps it
        isa = "AVX2"
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn_cap in _ONEDNN_WITHOUT_BF16:
        isa = min(isa, "AVX-512" if onednn_cap.startswith("AVX512") else "AVX2", key=ISA_LEVELS.index)
    return CpuInfo(model, tuple(f for f in wanted if f in flags), isa, torch.get_num_threads())


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX): only there can bf16 be a
    speed-up. Elsewhere PyTorch emulates it, and its bf16 depthwise convolution is two orders of
    magnitude slower than fp32, so no default may choose bf16 there."""
    return cpu_info().native_bf16


REMEASURE_ENV = "EFFNET_REMEASURE"  # "1": measure again instead of reusing this machine's stored choices
# Raised whenever effnet's own kernels change speed (models.depthwise, models.fused, models.excite): the
# choices measured with older ones (bf16 or fp32 per stage, the fastest engine) are then measured anew.
KERNELS_REVISION = 2


def machine_file() -> Path:
    """The file that keeps this machine's measured choices: one per CPU model, ISA level (so an
    emulated AVX2 run keeps its own), thread count, torch version and `KERNELS_REVISION`, under
    `paths.cache_dir`."""
    info = cpu_info()
    key = "|".join((info.model, ",".join(info.flags), info.isa, str(info.threads), torch.__version__))
    key += f"|kernels {KERNELS_REVISION}"
    return cache_dir("runtime", f"choices-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def remembered(task: str, measure: Callable[[], T]) -> tuple[T, bool]:
    """This machine's stored answer for `task` (a string naming what was measured and on what), or
    `measure()`'s, stored for next time. Returns (answer, whether it was measured now). Answers are
    JSON values. An unreadable file is measured over, never an error: it only holds measurements."""
    path = machine_file()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    if task in stored and os.environ.get(REMEASURE_ENV) != "1":
        return stored[task], False
    answer = measure()
    stored[task] = answer
    try:
        atomic_write_text(path, json.dumps(stored, indent=1, sort_keys=True))
    except OSError as error:  # a read-only home: measure again next time
        log.warning("could not keep the measured choice in %s (%s); it will be measured again next run", path, error)
    return answer, True


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
    # bf16 only where the CPU computes it natively; there `choose_stage_precision` still measures
    # each trained stage, since at low resolution some of oneDNN's bf16 kernels train slower.
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def inference_candidates(openvino_installed: bool, precision: str = "auto") -> list[str]:
    """The "backend precision" pairs worth measuring for CPU inference here: bf16 only where the CPU
    computes it natively (elsewhere it is the slowest choice by far, no measurement needed). A forced
    `precision` ('fp32' or 'bf16', a run's --precision) leaves only the backends; 'auto' and 'fp16'
    (a GPU precision) leave the choice to this CPU."""
    native = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    precisions = [precision] if precision in ("fp32", "bf16") else native
    candidates = [f"torch {kind}" for kind in precisions]
    if openvino_installed:
        candidates += [f"openvino {'f32' if kind == 'fp32' else kind}" for kind in precisions]
    return candidates


def choose_inference(task: str, candidates: list[str], build: Callable[[str], Callable], example: torch.Tensor):
    """The engine `build(candidate)` makes for the fastest of `candidates` on `example` (a batch),
    measured once per machine and task and remembered (`remembered`); logged in one line.

    Why measure rather than rank: which backend wins depends on the CPU's ISA, its cache sizes and
    the model's shape (OpenVINO's fused kernels against oneDNN through PyTorch), and a rule that was
    right on one machine kind was wrong on the other."""
    engines: dict[str, Callable] = {}
    speeds: dict[str, float] = {}

    def measure() -> str:
        log.info("measuring %s on this CPU, once per machine: %s", task, ", ".join(candidates))
        parities = {}
        for candidate in candidates:
            engine = engines[candidate] = build(candidate)
            parities[candidate] = getattr(engine, "parity", None)
            if parities[candidate] is None and hasattr(engine, "parity"):
                engine.parity = {}  # no parity check while timing; the kept engine checks its first real batch
        calls = {candidate: (lambda engine=engine: engine(example)) for candidate, engine in engines.items()}
        for candidate, seconds in interleaved_best_seconds(calls, rounds=3).items():
            speeds[candidate] = len(example) / seconds
        for candidate, engine in engines.items():
            if hasattr(engine, "parity"):
                engine.parity = parities[candidate]
        return max(speeds, key=speeds.__getitem__)

    if len(candidates) == 1:
        choice, measured = candidates[0], False
    else:
        choice, measured = remembered(f"{task} among {', '.join(candidates)}", measure)
    if measured:
        figures = ", ".join(f"{name} {speed:.0f} img/s" for name, speed in speeds.items())
        log.info("%s: %s, the fastest measured here (%s); kept in %s", task, choice, figures, machine_file())
    else:
        how = "the only choice on this CPU" if len(candidates) == 1 else "measured on this machine before"
        log.info("%s: %s (%s)", task, choice, how)
    return engines.get(choice) or build(choice)


def interleaved_best_seconds(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each call's fastest of `rounds` timed runs, the calls taking turns in every round after one
    warm-up each. Timed one after the other, a slow spell of a shared VM (minutes long, 20-40% here)
    falls on one candidate only and can pick the wrong one; taking turns spreads it over all."""
    for call in calls.values():
        call()  # first-call allocations and kernel selection
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


# glibc mallopt parameter numbers (malloc.h) and the defaults eager release restores.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536
# How this process set malloc, in the environment so that processes started from it can do the same:
# "system" (the user's opt-out: leave glibc as it is), "keep" or "eager" (set by the two functions below).
MALLOC_ENV = "EFFNET_MALLOC"
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # bytes; the largest the int argument takes: in effect never trim
_MALLOC_STATES = {"keep": "malloc keeps freed blocks (effnet's default)", "eager": "malloc unmaps freed blocks at once"}


def malloc_state() -> str:
    """How this process's malloc treats freed blocks, for benchmark setups: it changes every speed."""
    return _MALLOC_STATES.get(os.environ.get(MALLOC_ENV, ""), "malloc as the system set it")


def inherit_malloc() -> None:
    """Set malloc as the process that started this one did (`profiling.run_isolated`'s children)."""
    mode = os.environ.get(MALLOC_ENV)
    if mode == "keep":
        keep_freed_memory()
    elif mode == "eager":
        release_freed_memory_eagerly()


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc mallopt settings; False (nothing changed) off Linux or without glibc's mallopt."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(parameter, int(value))) for parameter, value in settings)
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of returning them to the system;
    True if it took. Called by `effnet`'s commands and by `fit` (not with --grad-checkpointing).

    By default glibc serves every block above 32 MiB (and smaller ones, early on) by mmap and
    unmaps it on free, and trims the heap's free top: each training step's activations, gradients
    and each inference batch's buffers are then faulted in page by page anew. On the 2-core VMs
    this project is measured on a page fault costs microseconds, and a B0 training step spent most
    of its time in them (benchmarks/README.md: about 4x the step time, peers alike). Serving all
    blocks from the heap and never trimming it keeps the pages mapped; the price is resident memory
    that stays at the run's peak. `EFFNET_MALLOC=system` leaves malloc alone."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "system":
        return False
    kept = _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD))
    if kept:
        os.environ[MALLOC_ENV] = "keep"
    return kept


def release_freed_memory_eagerly(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc's malloc give large freed blocks back to the system at once; True if it took.

    By default glibc raises its mmap threshold to the size of the largest block freed so far (up to
    32 MiB), so a training step's activations of a few MiB each come from the heap, and the heap's
    holes keep the process's resident memory at its worst step's fragmentation. A fixed threshold
    serves every block above it by mmap and unmaps it on free. Measured (B0 224 px batch 32, two
    SGD steps, peak RSS; benchmarks/README.md): with --grad-checkpointing 856 -> 563 MiB, at the
    price of page faults on every large allocation. Undoes `keep_freed_memory`. A no-op (False)
    off glibc."""
    threshold = int(threshold_bytes)
    released = _mallopt(
        (_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, 2 * threshold)
    )
    if released:
        os.environ[MALLOC_ENV] = "eager"
    return released


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
    model: nn.Module,
    example: torch.Tensor,
    dtype: torch.dtype,
    rounds: int = 2,
    margin: float = 0.05,
    task: str | None = None,
) -> list[bool]:
    """For each of `model.stages` (`models.layers.Stage`s; `model` an EfficientNet or the trainable
    suffix of one), whether it should compute in full precision inside a `dtype` autocast region:
    True when its training step measured faster in fp32 than under `dtype` by more than `margin`.

    Why measure: on a CPU with native bf16 but no AMX, a whole training step can be faster under
    bf16 while its low-resolution stages (28x28 and below) run forward and backward faster in fp32
    (figures in benchmarks/README.md). Which way each stage goes depends on the CPU's kernels (and on our own depthwise
    backward, `models.depthwise`, which narrowed the gap), so it is timed here, on `example` (a
    real-sized input batch of `model`) and on a copy of `model`, whose running statistics and
    gradients are thrown away: trainable stages forward and backward, frozen ones forward only.
    Each stage gets its input as the run would give it: from a stem or stage computing under `dtype`
    (the first stage of a suffix: `example` as it is). Fed fp32 instead, every stage had to cast its
    input down under `dtype` but not in fp32, which tipped B0's stage 1 at 224 px to fp32. Best of
    `rounds` calls after one warm-up call. With `task` (naming the model and what of it trains) the
    answer is measured once per machine, input shape and dtype, and remembered (`remembered`)."""

    def measure() -> list[bool]:
        log.info("timing each trained stage in %s and fp32 on this CPU ...", DTYPE_NAMES[dtype])
        with torch.random.fork_rng(devices=[]):  # dropout and drop path in `trial` must not move the caller's stream
            return _time_stages(copy.deepcopy(model), example, dtype, rounds, margin)

    if task is None:
        return measure()
    shape = "x".join(map(str, example.shape))
    return remembered(f"stage precision of {task} on {shape} inputs under {DTYPE_NAMES[dtype]}", measure)[0]


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


def choose_wide_bf16_route() -> None:
    """How the depthwise bf16 weight gradient of 5x5 kernels at stride 1 is computed on this CPU
    (`models.depthwise`: as 3x3 windows in bf16, or cast to fp32), measured once per machine (about
    a second) and set for this process. Only where bf16 is native: elsewhere no default trains in it."""
    if not cpu_supports_bf16():
        return

    def measure() -> str:
        best = interleaved_best_seconds(depthwise.wide_bf16_route_calls(), rounds=3)
        rates = ", ".join(f"{name} {1e3 * seconds:.1f} ms" for name, seconds in best.items())
        log.info("timed the depthwise 5x5 weight gradient under bf16 here: %s", rates)
        return min(best, key=best.get)

    route, measured = remembered("depthwise 5x5 stride-1 weight gradient under bf16", measure)
    if route not in depthwise.WIDE_BF16_ROUTES:  # a hand-edited file
        route, measured = measure(), True
    depthwise.set_wide_bf16_route(route)
    log.info("depthwise 5x5 weight gradient under bf16: %s (%s)", route, "measured" if measured else "measured before")


def set_stage_precision(model: nn.Module, full_precision: list[bool]) -> None:
    """Apply `choose_stage_precision`'s answer to `model.stages`."""
    for stage, full in zip(model.stages, full_precision, strict=True):
        stage.full_precision = full
