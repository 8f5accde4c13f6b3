"""Keras EfficientNets (`keras.applications.EfficientNetB0` ... `B7`) read into PyTorch tensors.

Three files Keras writes are understood, recognised by their structure rather than their suffix:
  * Keras 3 weights (`x.weights.h5`, and `model.weights.h5` inside a `.keras` zip): one group per
    layer object, `layers/<object>/vars/<i>`, with the layer's name as an attribute;
  * legacy HDF5 (`model.save("x.h5")`, tf.keras 2 files, the ImageNet weights Keras downloads):
    `[model_weights/]<layer>/.../<variable>[:0]`.
Variables are renamed to the PyTorch layout under the Keras layer names (`stem_conv.weight`,
`block2a_expand_bn.running_mean`, ...); `weights.py` maps those names onto ours with its key table.

A Keras EfficientNet takes 0-255 pixels and normalises inside the model: `Rescaling(1/255)`, then
`Normalization` with the mean and variance stored in the file, then, in models built with
`weights="imagenet"`, a second `Rescaling` by 1/sqrt(ImageNet std) (Keras stores the std where a
variance belongs and undoes the slip with that layer). `preprocessing` turns that chain into the mean
and std our eval transform applies to 0-1 images, so our model sees exactly the tensor Keras's stem does.
A fine-tuned model's own head is found as the one Dense layer outside the backbone.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effnet.models.scaling import build_config
from effnet.models.spec import EFFICIENTNET_COEFFICIENTS

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
CLASSIFIER = "predictions"  # Keras's name for the top Dense layer; a custom head is stored under it
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)  # keras.applications.efficientnet's constant
NORMALIZATION_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(var), eps)
_BN_VARS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_BACKBONE = re.compile(r"(stem|top)_(conv|bn)|block\d+[a-z]+_\w+")


class KerasFileError(ValueError):
    """A file that is not a Keras EfficientNet this reader understands; the message says why."""


def is_keras_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in KERAS_SUFFIXES


def read_keras(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in PyTorch layout under Keras layer names, metadata). The metadata holds
    `preprocess` (mean, std, crop and interpolation for 0-1 images), `input_size` (the square input
    side the file records, else None) and `num_classes` (0 without a classifier)."""
    path = Path(path)
    if not path.is_file():
        raise KerasFileError(f"Keras file {path} does not exist")
    with _weights_file(path) as (handle, config):
        layers = _layers(handle)
    if not any(name == "stem_conv" for name in layers):
        raise KerasFileError(
            f"{path} holds no Keras EfficientNet (no layer named stem_conv); expected a file saved from "
            "keras.applications.EfficientNetB0..B7 (.keras, .h5 or .weights.h5)"
        )
    state = _to_torch(layers, path)
    classes = state.get(f"{CLASSIFIER}.bias")
    meta = {"preprocess": preprocessing(layers, config), "input_size": _input_size(config)}
    meta["num_classes"] = 0 if classes is None else int(classes.shape[0])
    return state, meta


@contextmanager
def _weights_file(path: Path) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    """The HDF5 weights (inside the zip for .keras) and the model config JSON when the file has one."""
    try:
        import h5py
    except ImportError as error:
        raise KerasFileError("reading Keras files needs h5py: pip install 'effnet[keras]'") from error
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json")) if "config.json" in archive.namelist() else None
                with archive.open("model.weights.h5") as inner, h5py.File(inner, "r") as handle:
                    yield handle, config
            return
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            yield handle, json.loads(raw) if raw is not None else None
    except (OSError, KeyError) as error:
        raise KerasFileError(f"cannot read {path} as a Keras model or weights file ({error})") from error


def _layers(handle: Any) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {variable name: array}, in file order, for either HDF5 layout. Weightless layers
    (Rescaling) are kept with no variables, so their number can be told."""
    if "layers" in handle and "model_weights" not in handle:
        return _keras3_layers(handle)
    return _legacy_layers(handle.get("model_weights", handle))


def _keras3_layers(handle: Any) -> dict[str, dict[str, np.ndarray]]:
    found: dict[str, dict[str, np.ndarray]] = {}

    def visit(name: str, item: Any) -> None:
        if not name.endswith("/vars") or "name" not in item.attrs:
            return
        arrays = [item[str(i)][()] for i in range(len(item))]
        kind = name.rsplit("/", 2)[-2]  # the object path: class-based (batch_normalization_3, rescaling_1)
        layer = "rescaling" + kind[len("rescaling") :] if kind.startswith("rescaling") else str(item.attrs["name"])
        found[layer] = dict(zip(_variable_names(layer, kind, arrays), arrays, strict=True))

    handle.visititems(visit)
    return found


def _variable_names(layer: str, kind: str, arrays: list[np.ndarray]) -> list[str]:
    """Keras 3 stores variables by position; their order is fixed by the layer class."""
    if kind.startswith("normalization"):
        return ["mean", "variance", "count"][: len(arrays)]
    if kind.startswith("batch_normalization") or (len(arrays) == 4 and all(a.ndim == 1 for a in arrays)):
        return list(_BN_VARS)
    return ["kernel", "bias"][: len(arrays)]


def _legacy_layers(group: Any) -> dict[str, dict[str, np.ndarray]]:
    found: dict[str, dict[str, np.ndarray]] = {}
    for name in group.attrs.get("layer_names", []):
        found.setdefault(name.decode() if isinstance(name, bytes) else str(name), {})

    def visit(name: str, item: Any) -> None:
        if hasattr(item, "shape"):
            *_, layer, variable = name.split("/")
            found.setdefault(layer, {})[variable.split(":")[0]] = item[()]

    group.visititems(visit)
    return {name: variables for name, variables in found.items() if variables or name.startswith("rescaling")}


def _to_torch(layers: dict[str, dict[str, np.ndarray]], path: Path) -> dict[str, torch.Tensor]:
    """Keras kernels are (kh, kw, in, out) (depthwise: (kh, kw, channels, 1)), Dense (in, out)."""
    state: dict[str, torch.Tensor] = {}
    heads = [name for name, v in layers.items() if not _BACKBONE.fullmatch(name) and np.ndim(v.get("kernel")) == 2]
    if len(heads) > 1:
        raise KerasFileError(
            f"{path} has {len(heads)} Dense layers after the backbone ({', '.join(heads)}); only a single "
            "Dense classifier on the pooled features maps onto EfficientNet's head"
        )
    for name, variables in layers.items():
        if not _BACKBONE.fullmatch(name) and name not in heads:
            continue
        target = CLASSIFIER if name in heads else name
        for variable, array in variables.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).float()
            if variable == "kernel":
                tensor = _kernel(name, tensor)
            state[f"{target}.{_BN_VARS.get(variable, 'weight' if variable == 'kernel' else variable)}"] = tensor
        if "moving_mean" in variables:
            state[f"{target}.num_batches_tracked"] = torch.tensor(0)
    return state


def _kernel(name: str, kernel: torch.Tensor) -> torch.Tensor:
    if kernel.ndim == 2:
        return kernel.t().contiguous()
    if name.endswith("dwconv"):
        return kernel.permute(2, 3, 0, 1).contiguous()
    return kernel.permute(3, 2, 0, 1).contiguous()


def preprocessing(layers: dict[str, dict[str, np.ndarray]], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean and std for 0-1 images equal to Keras's in-model chain (see the module docstring)."""
    norm = next((v for name, v in layers.items() if name.startswith("normalization") and "mean" in v), None)
    mean = np.zeros(3) if norm is None else np.asarray(norm["mean"], dtype=np.float64).reshape(-1)
    variance = np.ones(3) if norm is None else np.asarray(norm["variance"], dtype=np.float64).reshape(-1)
    std = np.maximum(np.sqrt(variance), NORMALIZATION_EPSILON)
    if _has_imagenet_rescaling(layers, config, variance):
        std = std * np.sqrt(IMAGENET_STDDEV_RGB)
    preprocess: dict[str, Any] = {"mean": tuple(map(float, mean)), "std": tuple(map(float, std))}
    preprocess |= {"crop_pct": 1.0, "interpolation": "bilinear"}  # Keras pipelines resize whole images
    return preprocess


def _has_imagenet_rescaling(layers: dict[str, Any], config: dict[str, Any] | None, variance: np.ndarray) -> bool:
    """Whether the model has the second Rescaling (built with weights='imagenet'): counted in the
    config or the file's layer list where they record it, else told by the ImageNet 'variance'."""
    counted = _count_rescaling(config) if config else sum(name.startswith("rescaling") for name in layers)
    if counted:
        return counted >= 2
    return bool(np.allclose(variance, IMAGENET_STDDEV_RGB, atol=1e-6))


def _count_rescaling(config: Any) -> int:
    if isinstance(config, dict):
        own = config.get("class_name") == "Rescaling"
        return own + sum(_count_rescaling(value) for value in config.values())
    if isinstance(config, list):
        return sum(_count_rescaling(value) for value in config)
    return 0


def _input_size(config: Any) -> int | None:
    """The square input side of the file's first InputLayer, when recorded."""
    if isinstance(config, dict):
        if config.get("class_name") == "InputLayer":
            shape = config.get("config", {}).get("batch_shape") or config.get("config", {}).get("batch_input_shape")
            if shape and len(shape) == 4 and shape[1] and shape[1] == shape[2]:
                return int(shape[1])
        values = config.values()
    elif isinstance(config, list):
        values = config
    else:
        return None
    return next((size for size in map(_input_size, values) if size), None)


def signature(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(number of MBConv blocks, stem channels, head channels): what tells B0 ... B7 apart."""
    blocks = {key.split("_", 1)[0] for key in state if key.startswith("block")}
    return len(blocks), int(state["stem_conv.weight"].shape[0]), int(state["top_conv.weight"].shape[0])


def variant(state: dict[str, torch.Tensor]) -> str:
    """The efficientnet_bN whose block count and stem and head widths the Keras weights have."""
    wanted = signature(state)
    for name, (width, depth, resolution, dropout) in EFFICIENTNET_COEFFICIENTS.items():
        config = build_config(width, depth, resolution, dropout, name=name)
        if (config.num_blocks, config.stem_channels, config.head_channels) == wanted:
            return name
    raise KerasFileError(
        f"these Keras weights ({wanted[0]} blocks, stem {wanted[1]}, head {wanted[2]} channels) match none of "
        "EfficientNetB0..B7; pass the model name to create_model(name, pretrained=file) yourself"
    )
