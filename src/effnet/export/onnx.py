"""ONNX and TorchScript files of a model, with everything needed to use them elsewhere.

The preprocessing (resolution, crop, mean, std) and the class names travel with the model: in the
ONNX file's `metadata_props` or TorchScript's extra files, so a deployed model cannot be fed
differently prepared images by accident. This module only writes and reads files; it imports
nothing from `effnet.inference`, which uses it to run a module on ONNX Runtime (the parity-checked
exports that run the files live in `effnet.export.checked`, above inference).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("effnet")
# The ONNX optimiser logs every deduplicated constant at INFO; the CLI's INFO level is for our messages.
logging.getLogger("onnx_ir").setLevel(logging.WARNING)

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "effnet.json"  # TorchScript extra file with the metadata


def model_metadata(model: nn.Module, class_names: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """What a consumer of the exported file must know: the input it expects and the labels."""
    return {
        "model_name": model.config.name,
        "class_names": list(class_names) if class_names else None,
        "preprocess": model.pretrained_cfg,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "normalised": True},
        "output": {"name": OUTPUT_NAME, "kind": "logits"},
        **extra,
    }


def example_input(img_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def _onnx():
    try:
        import onnx
    except ImportError as error:
        raise RuntimeError("ONNX export needs onnx and onnxscript: pip install 'effnet[export]'") from error
    return onnx


def export_onnx(
    model: nn.Module, path: str | Path, img_size: int | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `model` as ONNX (opset 18, dynamic batch) with `metadata` as JSON-valued metadata_props."""
    _onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = img_size or model.config.preprocess.input_size
    model = model.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example_input(size, 2),),
        str(path),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
        verbose=False,
    )
    if metadata:
        write_onnx_metadata(path, metadata)
    return path


def write_onnx_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Store `metadata` (JSON-valued) in the ONNX file's metadata_props, replacing keys already there."""
    onnx = _onnx()
    proto = onnx.load(str(path))
    kept = [prop for prop in proto.metadata_props if prop.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata `export_onnx` stored, decoded (empty for foreign ONNX files)."""
    onnx = _onnx()
    proto = onnx.load(str(path), load_external_data=False)
    decoded = {}
    for prop in proto.metadata_props:
        try:
            decoded[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            decoded[prop.key] = prop.value
    return decoded


def export_torchscript(
    model: nn.Module, path: str | Path, img_size: int | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Trace `model` to TorchScript; the metadata goes in the archive as extra file effnet.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = img_size or model.config.preprocess.input_size
    with quiet_torchscript():
        traced = torch.jit.trace(model.cpu().eval(), example_input(size, 2))
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata or {})})
    return path


@contextlib.contextmanager
def quiet_torchscript():
    """TorchScript still loads in every PyTorch and in C++ (libtorch), which is why users ask for it;
    its deprecation notices and the tracer's warning about the model's (constant) input-shape check
    are noise for them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield
