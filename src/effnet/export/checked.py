"""`export_model`: an ONNX or TorchScript file, its sidecar JSON, and a parity check against PyTorch.

Every export is run (ONNX Runtime, or the reloaded TorchScript module) on a batch of a size other
than the one traced, which also proves the batch dimension is dynamic: a silently wrong file is
worse than no file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effnet.export.onnx import example_input, export_onnx, export_torchscript, model_metadata, quiet_torchscript
from effnet.inference import OnnxRuntimeEngine, check_parity

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def export_model(
    model: nn.Module,
    output: str | Path,
    fmt: str = "onnx",
    class_names: list[str] | None = None,
    img_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path, dict[str, float]]:
    """Export, write the sidecar JSON and check parity. Returns (model file, sidecar, parity)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    size = img_size or model.config.preprocess.input_size
    metadata = model_metadata(model, class_names, **(extra or {}))
    metadata["preprocess"]["input_size"] = size
    output = Path(output)
    if fmt == "onnx":
        export_onnx(model, output, size, metadata)
        run = OnnxRuntimeEngine(output)
    else:
        export_torchscript(model, output, size, metadata)
        with quiet_torchscript():
            run = torch.jit.load(str(output)).eval()
    images = example_input(size, 3, seed=1)
    with torch.inference_mode():
        parity = check_parity(model, run(images), images, fmt)
    sidecar = output.with_name(output.name + ".json")
    sidecar.write_text(json.dumps(metadata, indent=2) + "\n")
    return output, sidecar, parity
