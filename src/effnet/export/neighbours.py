"""Weights out to the neighbours: a Hub-style folder (model.safetensors + config.json) that
`create_model` and `load_safetensors` read back, and state dicts that timm and torchvision load with
`strict=True`.

The renaming is the import table of `effnet.models.weights` read the other way
(`export_state_dict`), so what can be imported can be exported and the two cannot drift apart. Each
export is checked like the ONNX one: the file is loaded into its target (our model, timm's, or
torchvision's) and its logits are compared with ours on the same images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effnet.export.onnx import example_input, model_metadata
from effnet.inference import check_parity
from effnet.models.checkpoint import atomic_save, config_from_dict, config_to_dict
from effnet.models.efficientnet import EfficientNet
from effnet.models.weights import SAFETENSORS_CONFIG, SAFETENSORS_FILE, WeightsError, export_state_dict

HUB_FORMAT = "effnet-safetensors"
NEIGHBOURS = ("safetensors", "timm", "torchvision")


def export_safetensors(
    model: EfficientNet, folder: str | Path, class_names: list[str] | None = None, extra: dict[str, Any] | None = None
) -> tuple[Path, dict[str, float]]:
    """Write folder/model.safetensors and folder/config.json (architecture, classes, preprocessing);
    reload it with `load_safetensors` and check the logits. Returns (folder, parity)."""
    try:
        from safetensors.torch import save_file
    except ImportError as error:
        raise RuntimeError("safetensors export needs safetensors: pip install 'effnet[safetensors]'") from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(state, str(folder / SAFETENSORS_FILE), metadata={"format": HUB_FORMAT})
    config = {"format": HUB_FORMAT, "version": 1, "config": config_to_dict(model.config)}
    config |= model_metadata(model, class_names, **(extra or {}))
    (folder / SAFETENSORS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    reloaded, _ = load_safetensors(folder)
    return folder, _parity(model, reloaded, "safetensors")


def load_safetensors(folder: str | Path) -> tuple[EfficientNet, dict[str, Any]]:
    """The exact model `export_safetensors` wrote (architecture from config.json), in eval mode, and
    config.json's content (class_names, preprocess, ...)."""
    folder = Path(folder)
    folder = folder.parent if folder.suffix == ".safetensors" else folder
    config_file = folder / SAFETENSORS_CONFIG
    if not config_file.is_file():
        raise WeightsError(
            f"{folder} has no {SAFETENSORS_CONFIG}: give a folder written by `effnet export --format safetensors`, "
            "or pass the .safetensors file to create_model(name, pretrained=...)"
        )
    meta = json.loads(config_file.read_text())
    if meta.get("format") != HUB_FORMAT or "config" not in meta:
        raise WeightsError(f"{config_file} is not an effnet config.json (no 'config' entry); re-export the model")
    from safetensors.torch import load_file

    model = EfficientNet(config_from_dict(meta["config"]))
    model.load_state_dict(load_file(str(folder / SAFETENSORS_FILE)))
    return model.eval(), meta


def timm_name(model: EfficientNet) -> str:
    """timm's name for the same network: the `tf_` twin when the model uses TF padding and BN eps."""
    base = re.sub(r"^tf_", "", model.config.name)
    if not re.fullmatch(r"efficientnet_(b[0-7]|lite[0-4])", base):
        raise ValueError(f"timm has no model for {base} (only efficientnet_b0..b7 and efficientnet_lite0..4)")
    tf = model.config.padding == "same"
    if model.config.bn_eps != (1e-3 if tf else 1e-5):
        raise ValueError(
            f"{base} with padding {model.config.padding!r} and BN eps {model.config.bn_eps} matches no timm model "
            "(timm's tf_ models pair TF padding with eps 1e-3, the others symmetric padding with eps 1e-5)"
        )
    return f"tf_{base}" if tf else base


def torchvision_name(model: EfficientNet) -> str:
    """torchvision's builder for the same network (B0-B7, symmetric padding, its own BN eps)."""
    base = re.sub(r"^tf_", "", model.config.name)
    if not re.fullmatch(r"efficientnet_b[0-7]", base):
        raise ValueError(f"torchvision has no model for {base}: only efficientnet_b0..b7 (export to timm instead)")
    eps = 1e-3 if base[-1] in "567" else 1e-5  # torchvision's B5-B7 are TF ports
    if model.config.padding != "symmetric" or model.config.bn_eps != eps:
        raise ValueError(
            f"torchvision's {base} uses symmetric padding and BN eps {eps}; this model has padding "
            f"{model.config.padding!r} and eps {model.config.bn_eps} (weights from a TF port): export to timm instead"
        )
    return base


def export_neighbour(
    model: EfficientNet,
    output: str | Path,
    fmt: str,
    class_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path, dict[str, Any]]:
    """A timm or torchvision state dict (`torch.save`, atomically) and a sidecar JSON saying how to
    build the model that loads it; checked in that library when it is installed. Returns (file,
    sidecar, parity; parity is empty when the library is missing)."""
    name = timm_name(model) if fmt == "timm" else torchvision_name(model)
    output = Path(output)
    atomic_save(export_state_dict(model, fmt), output)
    build = f"{fmt}.create_model({name!r}, num_classes={model.num_classes})" if fmt == "timm" else (
        f"torchvision.models.{name}(num_classes={model.num_classes})")  # fmt: skip
    sidecar = output.with_name(output.name + ".json")
    metadata = model_metadata(model, class_names, **(extra or {})) | {
        "format": fmt,
        "architecture": name,
        "load": f"model = {build}; model.load_state_dict(torch.load({output.name!r}), strict=True)",
    }
    sidecar.write_text(json.dumps(metadata, indent=2) + "\n")
    target = _build_neighbour(fmt, name, model.num_classes)
    if target is None:
        return output, sidecar, {}
    target.load_state_dict(torch.load(output, map_location="cpu", weights_only=True), strict=True)
    return output, sidecar, _parity(model, target, fmt)


def _build_neighbour(fmt: str, name: str, num_classes: int) -> nn.Module | None:
    try:
        if fmt == "timm":
            import timm

            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    except ImportError:
        return None


def _parity(model: nn.Module, other: nn.Module, label: str) -> dict[str, float]:
    size = model.config.preprocess.input_size
    images = example_input(min(size, 128), 3, seed=1)
    with torch.inference_mode():
        return check_parity(model.eval(), other.eval()(images), images, label)
