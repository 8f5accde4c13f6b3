"""The resume state of a run (`state.pt`) and the rest of the run folder's files.

`state.pt` holds everything needed to continue exactly where a run stopped: model, optimizer,
schedule, grad scaler and EMA states, the position in the data (epoch, batches done) and the
random number generators. Only tensors and plain values are stored, so it loads with
`torch.load(..., weights_only=True)`; it is written atomically, so a SIGKILL at any moment
leaves the previous state intact.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION, "rng": rng_state(), **state}, path)


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read `RUN_DIR/state.pt`, with errors that say what to do."""
    path = Path(run_dir) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: {path} not found. --resume takes a run folder written by `effnet train` "
            "(one with config.yaml and state.pt); the run may have stopped before its first checkpoint."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an effnet training state (state.pt written by `effnet train`)")
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
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
