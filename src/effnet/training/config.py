"""`TrainConfig`: every setting of a training run in one dataclass, saved as `config.yaml` in the
run folder so that a run can be read, repeated and resumed from its folder alone."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from effnet.files import atomic_write_text
from effnet.paths import cache_dir

FINETUNE_MODES = ("auto", "head", "full", "gradual")  # plus "last:N"
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "plateau", "step")
BN_FREEZE = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


AUTO_MODEL = "auto"  # model: the offline backbone expected to do best in max_minutes (training/backbone.py)
MIN_IMG_SIZE = 32  # the network's total stride: below it the last stages see less than a pixel


class ConfigError(ValueError):
    """A setting out of its range or choices: a usage error (the CLI exits with status 2)."""


@dataclass(frozen=True)
class Interval:
    """The valid range of a numeric setting; NaN and infinities are never in it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return kind

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def check(self, name: str, value: float | None) -> None:
        if value is not None and not self.contains(value):
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")


AT_LEAST_1, AT_LEAST_0 = Interval(1, integer=True), Interval(0, integer=True)
POSITIVE, NON_NEGATIVE = Interval(0, low_open=True), Interval(0)
UNIT, FRACTION = Interval(0, 1, high_open=True), Interval(0, 1, low_open=True, high_open=True)
# Every numeric setting and its range (None, where a field allows it, means "the default").
RANGES = {
    "val_split": UNIT, "img_size": Interval(MIN_IMG_SIZE, integer=True), "drop_rate": UNIT, "drop_path_rate": UNIT,
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "max_minutes": POSITIVE, "patience": AT_LEAST_1,
    "gradual_head_epochs": AT_LEAST_0, "layer_decay": Interval(0, 1, low_open=True), "bn_momentum": Interval(0, 1),
    "cache_views": AT_LEAST_1, "cache_shift": AT_LEAST_0, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
    "momentum": UNIT, "warmup_steps": AT_LEAST_0, "min_lr": NON_NEGATIVE, "plateau_factor": FRACTION,
    "plateau_patience": AT_LEAST_0, "step_epochs": AT_LEAST_1, "step_gamma": Interval(0, 1, low_open=True),
    "label_smoothing": UNIT, "ema_decay": UNIT, "clip_grad": POSITIVE, "accum_steps": AT_LEAST_1,
    "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "seed": Interval(0, 2**32 - 1, integer=True),
    "checkpoint_every": AT_LEAST_0,
}  # fmt: skip


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
    epochs: int | None = None  # None: 3, or with max_minutes as many as end at the budget (schedule.BudgetEpochs)
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
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        parse_finetune(self.finetune)
        for name, interval in RANGES.items():
            interval.check(name, getattr(self, name))
        if not (self.workers == "auto" or (isinstance(self.workers, int) and self.workers >= 0)):
            raise ConfigError(f"workers must be 'auto' or a number of processes >= 0, got {self.workers!r}")
        if self.cache_frozen:
            self._validate_cache_frozen()
        if self.model == AUTO_MODEL:
            self._validate_auto_model()
        for minutes in self.val_at_minutes:
            POSITIVE.check("val_at_minutes", minutes)

    def _validate_auto_model(self) -> None:
        """`--model auto` chooses for a budget among offline ImageNet weights (training/backbone.py)."""
        if self.max_minutes is None:
            raise ConfigError("--model auto chooses a backbone for a time budget: give --max-minutes too")
        if not isinstance(self.pretrained, bool):
            raise ConfigError("--model auto picks among the installed ImageNet weights: drop the --pretrained file")
        if self.finetune != "auto" or self.img_size is not None:
            raise ConfigError("--model auto chooses for the CPU recipe: drop --finetune and --img-size, or name one")

    def _validate_cache_frozen(self) -> None:
        mode, count = parse_finetune(self.finetune)
        if mode not in ("last", "auto") or count > 7:
            raise ConfigError(
                f"cache_frozen needs a frozen prefix that stays frozen: use finetune last:N with N from 1 to 7 "
                f"(got {self.finetune!r})"
            )
        if self.bn_freeze == "off":
            raise ConfigError("cache_frozen keeps the frozen stages' BatchNorm statistics fixed, not bn_freeze off")
        if self.cache_views < 1:
            raise ConfigError(f"cache_views must be at least 1, got {self.cache_views}")
        if self.cache_shift is not None and self.cache_shift < 0:
            raise ConfigError(f"cache_shift must be 0 (off) or more feature cells, got {self.cache_shift}")

    def replace(self, **overrides: Any) -> TrainConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; see effnet.TrainConfig for the valid ones")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

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
    raise ConfigError(f"finetune={mode!r}: expected auto, head, last:N (N >= 1 stages), full or gradual")


def default_lr(optimizer: str, batch_size: int) -> float:
    """Base learning rates for fine-tuning from ImageNet weights at batch 64, scaled linearly
    with the effective batch size (Goyal et al. 2017)."""
    base = {"sgd": 0.05, "rmsprop": 0.005, "adamw": 1e-3}[optimizer]
    return base * batch_size / 64
