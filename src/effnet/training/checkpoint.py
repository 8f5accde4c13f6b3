"""The resume state of a run (`state.pt`) and the rest of the run folder's files.

`state.pt` holds everything needed to continue exactly where a run stopped: model, optimizer,
schedule, grad scaler and EMA states, the position in the data (epoch, batches done) and the
random number generators. Only tensors and plain values are stored, so it loads with
`torch.load(..., weights_only=True)`; it is written atomically, so a SIGKILL at any moment
leaves the previous state intact.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effnet.files import atomic_write_text
from effnet.models.checkpoint import atomic_save

STATE_FORMAT = "effnet-train-state"
STATE_VERSION = 1
METRICS_COLUMNS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_time_s",
    "images_per_s",
]


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RUN_FILES = ("state.pt", "best.pt", "last.pt", "metrics.csv", "results.json", "report.html")  # a run's results


def nonfinite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in `tree` (nested dicts, lists and tensors, as a state)
    holding a NaN or an infinity: none may ever reach a checkpoint, it could only diverge again."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [name for key, value in tree.items() for name in nonfinite_entries(value, f"{prefix}{key}.")]
    if isinstance(tree, list | tuple):
        return [name for i, value in enumerate(tree) for name in nonfinite_entries(value, f"{prefix}{i}.")]
    return []


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the resume state; refuses (ValueError) a state with a non-finite tensor, keeping the last one."""
    bad = nonfinite_entries({k: state.get(k) for k in ("model", "optimizer", "ema", "scaler")})
    if bad:
        raise ValueError(f"not saving {path}: {len(bad)} tensors are not finite (e.g. {bad[0].rstrip('.')})")
    atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION, "rng": rng_state(), **state}, path)


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read `RUN_DIR/state.pt`, with errors that say what to do."""
    path = Path(run_dir) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: {path} not found. --resume takes a run folder written by `effnet train` "
            "(one with config.yaml and state.pt); the run may have stopped before its first checkpoint."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as error:
        # Code-running pickles (weights_only refuses them), empty and truncated files.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot resume: {path} is damaged or not a training state effnet can load safely ({first_line}); "
            "start a new run with --output, or --resume a copy of the run"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an effnet training state (state.pt written by `effnet train`)")
    bad = nonfinite_entries(state.get("model"))
    if bad:
        raise ValueError(f"cannot resume: {path} holds non-finite weights ({bad[0].rstrip('.')}); start a new run")
    return state


def check_compatible(state: dict[str, Any], model_name: str, class_names: list[str], run_dir: Path) -> None:
    """A resume must continue the same model on the same classes; say which differs."""
    if state["model_name"] != model_name:
        raise ValueError(
            f"cannot resume {run_dir}: it trains {state['model_name']!r}, not {model_name!r}. "
            f"Drop --model (the run folder's config.yaml has it) or start a new run with --output."
        )
    if list(state["class_names"]) != list(class_names):
        raise ValueError(
            f"cannot resume {run_dir}: it was trained on {len(state['class_names'])} classes "
            f"{_preview(state['class_names'])}, the data has {len(class_names)} classes {_preview(class_names)}. "
            "Resume with the same --data, or start a new run with --output."
        )


def _preview(names: list[str], count: int = 5) -> str:
    shown = ", ".join(names[:count])
    return f"[{shown}{', ...' if len(names) > count else ''}]"


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv, one row per epoch, rewritten whole (it is small) so a resume never duplicates rows."""
    columns = METRICS_COLUMNS + [key for key in (history[0] if history else {}) if key not in METRICS_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class TrainState:
    """Where a run is: what `state.pt` keeps besides the weights and optimizer, so that a resumed
    run continues at the same batch with the same counters. The `loss_sum` to `seconds` fields
    sum the current epoch's batches so far (an epoch cut by a checkpoint or the budget resumes them)."""

    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches of the current epoch already trained
    step: int = 0  # optimizer steps taken
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best validation accuracy
    elapsed_s: float = 0.0  # wall time of the run up to the last save
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0
    stage_precision: dict[str, Any] | None = None  # runtime's measured per-stage choice, kept across resumes

    def start_epoch(self) -> None:
        self.batches_done = 0
        self.loss_sum = self.correct = self.seen = self.seconds = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        saved = dict(saved)
        if "partial" in saved:  # states written before this class: the epoch's sums as a list
            saved["loss_sum"], saved["correct"], saved["seen"], saved["seconds"] = saved.pop("partial")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})
