"""`TrainConfig`: every setting of a training run in one dataclass, saved as `config.yaml` in the
run folder so that a run can be read, repeated and resumed from its folder alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from effnet.paths import cache_dir

FINETUNE_MODES = ("auto", "head", "full", "gradual")  # plus "last:N"
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "plateau", "step")
BN_FREEZE = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run. The defaults are the recipe measured in README "Training"."""

    # What to train on what.
    model: str = "efficientnet_lite0"
    data: str = ""
    pretrained: bool | str = False  # True: the registered ImageNet weights; a weights file or a weight tag
    data_dir: str = field(default_factory=lambda: str(cache_dir("data")))  # downloads, extracted archives
    val_split: float = 0.1
    on_bad_image: str = "fail"
    img_size: int | None = None  # None: the model's own resolution (224 for B0 and Lite0)
    drop_rate: float | None = None  # None: the variant's dropout
    drop_path_rate: float | None = None

    # How long.
    epochs: int = 3
    batch_size: int = 64
    max_minutes: float | None = None  # stop cleanly (checkpoint, test) at this wall-clock budget
    patience: int | None = None  # early stopping: epochs without a better validation accuracy
    val_at_minutes: list[float] = field(default_factory=list)  # also validate mid-epoch at these minutes

    # What is trained.
    finetune: str = "auto"  # auto | head | last:N | full | gradual (auto: see finetune.resolve_auto)
    gradual_head_epochs: int = 1  # "gradual": epochs of head-only training before unfreezing all
    layer_decay: float | None = None  # LR multiplier per stage going down from the head (e.g. 0.7)
    bn_freeze: str = "auto"  # auto: BN statistics frozen in frozen layers; on/off force it everywhere
    bn_momentum: float | None = 0.1  # None keeps the weights' own (TF ports: 0.01, too slow to adapt)
    cache_frozen: bool | None = None  # last:N: run the frozen stages once per stored view; None: with auto
    cache_views: int = 4  # views stored per image: plain, mirrored, then draws of the augment preset
    cache_shift: int | None = None  # shift served views by up to this many feature cells; None: 1/12 of the side

    # Optimisation.
    optimizer: str = "sgd"
    lr: float | None = None  # None: the optimizer's default scaled by batch_size / 64 (see default_lr)
    weight_decay: float = 5e-5
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: 5% of the planned steps
    min_lr: float = 0.0
    plateau_factor: float = 0.2
    plateau_patience: int = 1
    step_epochs: int = 1  # "step": multiply the LR by step_gamma every step_epochs epochs
    step_gamma: float = 0.5
    label_smoothing: float = 0.1
    ema: bool = False
    ema_decay: float = 0.998
    clip_grad: float | None = None
    accum_steps: int = 1

    # Data pipeline.
    augment: str = "light"
    flip: bool | None = None  # random horizontal flips; None: unless the data says mirror images differ (digits)
    tta: bool | None = None  # also report test accuracy averaged with mirror images; None: as `flip`
    mixup: float = 0.0
    cutmix: float = 0.0
    workers: int | str = "auto"

    # Where and how fast.
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 slower
    compile: bool = False
    deterministic: bool = False

    # Bookkeeping.
    seed: int = 0
    output: str | None = None  # the run folder; None: runs/<model>-<data>-<timestamp>
    checkpoint_every: int = 0  # also save the resume state every N optimizer steps (0: only per epoch)
    progress: bool = True  # progress bars (log verbosity is the logging level's business)
    tensorboard: bool = False
    report: bool = True  # report.html by effnet.evaluation at the end

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject bad settings before any work is done, naming the valid choices."""
        checks = {
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "bn_freeze": BN_FREEZE,
            "precision": PRECISIONS,
            "on_bad_image": ("fail", "skip"),
        }
        for name, choices in checks.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        parse_finetune(self.finetune)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accum_steps": self.accum_steps}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.cache_frozen:
            self._validate_cache_frozen()
        if any(minutes <= 0 for minutes in self.val_at_minutes):
            raise ValueError(f"val_at_minutes must be positive minutes, got {self.val_at_minutes}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def _validate_cache_frozen(self) -> None:
        mode, count = parse_finetune(self.finetune)
        if mode not in ("last", "auto") or count > 7:
            raise ValueError(
                f"cache_frozen needs a frozen prefix that stays frozen: use finetune last:N with N from 1 to 7 "
                f"(got {self.finetune!r})"
            )
        if self.mixup or self.cutmix:
            raise ValueError("cache_frozen trains on stored features, not images: turn off mixup and cutmix")
        if self.bn_freeze == "off":
            raise ValueError("cache_frozen keeps the frozen stages' BatchNorm statistics fixed: bn_freeze 'off' cannot")
        if self.cache_views < 1:
            raise ValueError(f"cache_views must be at least 1, got {self.cache_views}")
        if self.cache_shift is not None and self.cache_shift < 0:
            raise ValueError(f"cache_shift must be 0 (off) or more feature cells, got {self.cache_shift}")

    def replace(self, **overrides: Any) -> TrainConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; see effnet.TrainConfig for the valid ones")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A config.yaml written by a run (or by hand, e.g. from `effnet train --print-config`)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a YAML mapping of training options (see effnet train --print-config)")
        if "quiet" in data:  # runs written before `progress`: quiet only ever meant "no progress bars"
            data["progress"] = not data.pop("quiet")
        return cls().replace(**data)


def parse_finetune(mode: str) -> tuple[str, int]:
    """'last:3' -> ('last', 3); 'full' -> ('full', 0). Raises a ValueError naming the valid forms."""
    if mode.startswith("last:"):
        count = mode.partition(":")[2]
        if count.isdigit() and int(count) >= 1:
            return "last", int(count)
    elif mode in FINETUNE_MODES:
        return mode, 0
    raise ValueError(f"finetune={mode!r}: expected auto, head, last:N (N >= 1 stages), full or gradual")


def default_lr(optimizer: str, batch_size: int) -> float:
    """Base learning rates for fine-tuning from ImageNet weights at batch 64, scaled linearly
    with the effective batch size (Goyal et al. 2017)."""
    base = {"sgd": 0.05, "rmsprop": 0.005, "adamw": 1e-3}[optimizer]
    return base * batch_size / 64
