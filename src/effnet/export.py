"""Export a trained model to ONNX or TorchScript, with everything needed to use it elsewhere.

The preprocessing (resolution, crop, mean, std) and the class names travel with the model: in the
ONNX file's `metadata_props` or TorchScript's extra files, and in a sidecar JSON beside either, so a
deployed model cannot be fed differently prepared images by accident. Every export is checked
against PyTorch (ONNX Runtime or the reloaded TorchScript module) on a batch of a size other than
the one traced, which also proves the batch dimension is dynamic.
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

from effnet.inference import OnnxRuntimeEngine, check_parity

log = logging.getLogger("effnet")
# The ONNX optimiser logs every deduplicated constant at INFO; the CLI's INFO level is for our messages.
logging.getLogger("onnx_ir").setLevel(logging.WARNING)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "effnet.json"  # TorchScript extra file with the metadata


def model_metadata(model: nn.Module, class_names: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """What a consumer of the exported file must know: the input it expects and the labels."""
    return {
        "model_name": getattr(model, "model_name", model.config.name),
        "class_names": list(class_names) if class_names else None,
        "preprocess": model.pretrained_cfg,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "normalised": True},
        "output": {"name": OUTPUT_NAME, "kind": "logits"},
        **extra,
    }


def _example_input(img_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def export_onnx(
    model: nn.Module, path: str | Path, img_size: int | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `model` as ONNX (opset 18, dynamic batch) with `metadata` as JSON-valued metadata_props."""
    try:
        import onnx
    except ImportError as error:
        raise RuntimeError("ONNX export needs onnx and onnxscript: pip install 'effnet[export]'") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = img_size or model.config.preprocess.input_size
    model = model.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (_example_input(size, 2),),
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
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=json.dumps(value))
        onnx.save(proto, str(path))
    return path


def export_torchscript(
    model: nn.Module, path: str | Path, img_size: int | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Trace `model` to TorchScript; the metadata goes in the archive as extra file effnet.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = img_size or model.config.preprocess.input_size
    with _quiet_torchscript():
        traced = torch.jit.trace(model.cpu().eval(), _example_input(size, 2))
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata or {})})
    return path


@contextlib.contextmanager
def _quiet_torchscript():
    """TorchScript still loads in every PyTorch and in C++ (libtorch), which is why users ask for it;
    its deprecation notices and the tracer's warning about the model's (constant) input-shape check
    are noise for them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata `export_onnx` stored, decoded (empty for foreign ONNX files)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    decoded = {}
    for prop in proto.metadata_props:
        try:
            decoded[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            decoded[prop.key] = prop.value
    return decoded


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
        with _quiet_torchscript():
            run = torch.jit.load(str(output)).eval()
    images = _example_input(size, 3, seed=1)
    with torch.inference_mode():
        parity = check_parity(model, run(images), images, fmt)
    sidecar = output.with_name(output.name + ".json")
    sidecar.write_text(json.dumps(metadata, indent=2) + "\n")
    return output, sidecar, parity
