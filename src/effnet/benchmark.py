"""Our EfficientNet against timm's and torchvision's, timed side by side in one process.

Absolute speed on a shared machine drifts by more than the differences we care about, so every
comparison here runs all implementations in the same process, alternating one call each per
round after a warm-up, and reports medians, spreads and ratios of the same run. `effnet bench`
and `benchmarks/bench_speed.py` are thin layers over this module.

"ours (default)" is exactly what `effnet train` and `effnet predict` run without options:
`runtime.prepare_model`, `runtime.autocast_dtype("auto")` and the training step `fit` builds,
and `inference.create_engine(backend="auto")`. Every training figure, ours and the peers', times
the one `training.step.train_step` that `effnet train` runs on each batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from effnet import runtime
from effnet.models import create_model
from effnet.profiling import Timing, peak_memory_bytes, reset_peak_memory, run_isolated, time_calls
from effnet.training.config import TrainConfig
from effnet.training.step import Step, fixed_batch_step, make_step

log = logging.getLogger("effnet")
PEERS = ("timm", "torchvision")
MODES = ("infer", "train")
TRAIN_CLASSES = 2  # random labels in 0..1: any classifier has them, and the step's cost does not depend on them


@dataclass(frozen=True)
class Setting:
    """How a model is run: 'fp32' or 'bf16' (autocast), and the memory format."""

    precision: str = "bf16"
    channels_last: bool = True

    @property
    def label(self) -> str:
        return f"{self.precision} {'channels_last' if self.channels_last else 'contiguous'}"


SETTINGS = tuple(Setting(precision, channels_last) for precision in ("fp32", "bf16") for channels_last in (False, True))
# A setting whose pilot ran this many times slower than the peer's fastest pilot is left out of the
# timed rounds: on a CPU without native bf16 a bf16 step takes ~10-100x longer, and timing it five
# times would take most of an hour without changing which setting is the peer's best. Generous,
# because one call is a noisy pilot on a shared machine.
SCREEN_FACTOR = 4.0


def build_peer(peer: str, variant: str, num_classes: int = 1000) -> nn.Module:
    """timm's or torchvision's model of the same name, randomly initialised (speed does not depend on the weights)."""
    if peer == "timm":
        import timm

        return timm.create_model(variant, num_classes=num_classes)
    if peer == "torchvision":
        import torchvision

        if not hasattr(torchvision.models, variant):
            raise ValueError(f"torchvision has no model {variant!r}; compare it against timm only (--against timm)")
        return getattr(torchvision.models, variant)(num_classes=num_classes)
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


def _batch(batch_size: int, img_size: int, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, (batch_size,), generator=generator)


def _autocast(setting: Setting) -> contextlib.AbstractContextManager:
    dtype = torch.bfloat16 if setting.precision == "bf16" else None
    return runtime.autocast(torch.device("cpu"), dtype)


def plain_inference(model: nn.Module, batch_size: int, img_size: int, setting: Setting) -> Callable[[], object]:
    """An eager forward pass as users of timm/torchvision write it, at `setting`."""
    model = runtime.prepare_model(model, torch.device("cpu"), setting.channels_last, memory_efficient=False).eval()
    images, _ = _batch(batch_size, img_size, setting.channels_last)

    def call() -> object:
        with torch.inference_mode(), _autocast(setting):
            return model(images)

    return call


def plain_training(model: nn.Module, batch_size: int, img_size: int, setting: Setting) -> Callable[[], object]:
    """An eager training step as users of timm/torchvision write it (forward, cross-entropy, backward,
    SGD Nesterov update) at `setting`, run by our one `train_step`."""
    model = runtime.prepare_model(model, torch.device("cpu"), setting.channels_last, memory_efficient=False).train()
    return _sgd_step(model, batch_size, img_size, setting)


def _sgd_step(model: nn.Module, batch_size: int, img_size: int, setting: Setting) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    dtype = torch.bfloat16 if setting.precision == "bf16" else None
    return fixed_batch_step(Step(model, optimizer, dtype=dtype), batch_size, img_size, TRAIN_CLASSES)


def default_precision() -> str:
    return "bf16" if runtime.autocast_dtype(torch.device("cpu"), "auto") is torch.bfloat16 else "fp32"


def precision_label(model: nn.Module) -> str:
    """The default precision, and which stages `ours_training` measured faster in fp32."""
    full = [str(index + 1) for index, stage in enumerate(model.stages) if stage.full_precision]
    return default_precision() + (f" (stages {','.join(full)} in fp32, faster here)" if full else "")


def ours_inference(model: nn.Module, batch_size: int, img_size: int) -> tuple[Callable[[], object], str]:
    """What `effnet predict` runs by default: the engine 'auto' picks. Returns (call, engine name)."""
    from effnet.inference import create_engine

    engine = create_engine(model, backend="auto", img_size=img_size)
    images, _ = _batch(batch_size, img_size, channels_last=False)
    return (lambda: engine(images)), engine.name


def ours_training(model: nn.Module, batch_size: int, img_size: int) -> Callable[[], object]:
    """What `effnet train` runs by default: `runtime.prepare_model`, the 'auto' precision (under
    bf16, each stage in bf16 or fp32 as `runtime.choose_stage_precision` measures) and the step
    `fit` builds from the default `TrainConfig` (`training.step.make_step`: optimizer, label
    smoothing, EMA), run by the same `train_step`."""
    config, device = TrainConfig(), torch.device("cpu")
    model = runtime.prepare_model(model, device, config.channels_last).train()
    dtype = runtime.autocast_dtype(device, config.precision)
    if dtype is torch.bfloat16 and not model.grad_checkpointing:  # as in `effnet train`
        runtime.choose_wide_bf16_route()
        example, _ = _batch(batch_size, img_size, config.channels_last)
        task = f"{model.config.name} (whole model)"
        runtime.set_stage_precision(model, runtime.choose_stage_precision(model, example, torch.bfloat16, task=task))
    step = make_step(model, config, lr=1e-3, dtype=dtype, device=device)
    return fixed_batch_step(step, batch_size, img_size, TRAIN_CLASSES)


def ours_at_setting(
    model: nn.Module, mode: str, batch_size: int, img_size: int, setting: Setting
) -> Callable[[], object]:
    """Our optimised eager path forced to `setting`: batch norm folded for inference, fused
    batch norm + activation for training."""
    device = torch.device("cpu")
    if mode == "infer":
        folded = runtime.prepare_inference_model(model, device, setting.channels_last)
        return plain_inference(folded, batch_size, img_size, setting)
    return _sgd_step(runtime.prepare_model(model, device, setting.channels_last).train(), batch_size, img_size, setting)


def peer_calls(
    peers: list[str], variant: str, mode: str, batch_size: int, img_size: int, settings=SETTINGS
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """Each peer at each of `settings` that survives `screen_settings`: calls named "PEER SETTING",
    and the pilot images/s of every setting tried (screened-out ones included), by the same names.
    The peers' best setting is then whichever of these measures fastest, on this machine."""
    make = plain_inference if mode == "infer" else plain_training
    calls, pilots = {}, {}
    for peer in peers:
        kept, pilot = screen_settings(
            lambda setting, peer=peer: make(build_peer(peer, variant), batch_size, img_size, setting),
            settings,
            batch_size,
            peer,
        )
        calls |= {f"{peer} {label}": call for label, call in kept.items()}
        pilots |= {f"{peer} {label}": speed for label, speed in pilot.items()}
    return calls, pilots


def screen_settings(
    make: Callable[[Setting], Callable[[], object]], settings, batch_size: int, name: str = "ours"
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """A pilot of each setting (one warm-up call, one timed call), each logged as it ends; returns
    the calls of the settings within SCREEN_FACTOR of the fastest pilot, and every pilot's images/s.
    A setting whose warm-up alone is slower than twice the screen's limit is out without its timed
    call (the warm-up's speed is its pilot): on a CPU without native bf16 that call takes a minute."""
    calls, pilots = {}, {}
    for setting in settings:
        log.info("pilot %s %s ...", name, setting.label)
        call = make(setting)
        warmup = time_calls(call, batch_size, warmup=0, repeats=1).images_per_second
        if pilots and warmup * SCREEN_FACTOR * 2 < max(pilots.values()):
            pilots[setting.label] = warmup
        else:
            pilots[setting.label] = time_calls(call, batch_size, warmup=0, repeats=1).images_per_second
        calls[setting.label] = call
        log.info("pilot %s %s: %.1f img/s", name, setting.label, pilots[setting.label])
    fastest = max(pilots.values())
    return {label: call for label, call in calls.items() if pilots[label] * SCREEN_FACTOR >= fastest}, pilots


def best_of(speeds: dict[str, float], prefixes: tuple[str, ...]) -> tuple[str, float]:
    """The fastest entry whose name starts with one of `prefixes` (e.g. the peers)."""
    name = max((n for n in speeds if n.startswith(prefixes)), key=speeds.__getitem__)
    return name, speeds[name]


def time_alternating(
    calls: dict[str, Callable[[], object]], batch_size: int, rounds: int = 5, warmup: int = 2
) -> dict[str, Timing]:
    """Time each call once per round, taking turns, so that the machine's drifts hit all alike."""
    bar = tqdm(total=len(calls) * (warmup + rounds), desc="timing", unit="call", leave=False, disable=None)
    for call in calls.values():
        for _ in range(warmup):
            call()
            bar.update()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            seconds[name] += time_calls(call, batch_size, warmup=0, repeats=1).seconds
            bar.update()
    bar.close()
    return {name: Timing(values, batch_size) for name, values in seconds.items()}


def build(impl: str, variant: str, num_classes: int = 1000) -> nn.Module:
    if impl in PEERS:
        return build_peer(impl, variant, num_classes)
    return create_model(variant, num_classes=num_classes)


def training_peak_memory(
    impl: str, variant: str, batch_size: int, img_size: int, setting: Setting | None, checkpointing: bool = False
) -> int:
    """Peak resident memory of training steps above the footprint before the model was built
    (bytes), measured in this process: call it through `isolated_training_peak_memory`.
    `setting` None means our default training path; `checkpointing` adds our activation
    checkpointing (`effnet train --grad-checkpointing`)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    baseline = reset_peak_memory(device)
    model = build(impl, variant)
    if checkpointing:
        model.set_grad_checkpointing()
        runtime.release_freed_memory_eagerly()  # what `effnet train --grad-checkpointing` does
    step = (
        ours_training(model, batch_size, img_size)
        if setting is None
        else plain_training(model, batch_size, img_size, setting)
    )
    for _ in range(2):  # momentum buffers appear at the first step
        step()
    return peak_memory_bytes(device) - baseline


def isolated_training_peak_memory(
    impl: str, variant: str, batch_size: int, img_size: int, setting: Setting | None, checkpointing: bool = False
) -> int:
    """`training_peak_memory` in a fresh process, so no earlier model's freed memory is reused unseen."""
    return run_isolated(training_peak_memory, impl, variant, batch_size, img_size, setting, checkpointing)


def ours_checkpointed_training(model: nn.Module, batch_size: int, img_size: int) -> Callable[[], object]:
    """`ours_training` with activation checkpointing (`effnet train --grad-checkpointing`). Timed
    in the shared process, so without the allocator setting that option also makes (which is
    process-wide and would change the peers' timings too); `training_peak_memory` includes it."""
    model.set_grad_checkpointing()
    return ours_training(model, batch_size, img_size)


def machine_description() -> str:
    """The CPU kind every figure depends on (its ISA level as the kernels may use it, so an emulated
    AVX2 run says AVX2), and the software versions."""
    emulated = [
        f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if name in os.environ
    ]
    return (
        f"{runtime.cpu_info().describe()}{' (emulated: ' + ' '.join(emulated) + ')' if emulated else ''}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {runtime.malloc_state()}"
    )
