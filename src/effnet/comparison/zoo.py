"""The models `effnet compare` knows: ours by name, torchvision's classification models by name,
each with its native resolution and its reference ImageNet top-1 (and where that number is from).

Nothing is downloaded: torchvision models are built with `weights=None`; their metadata (accuracy,
resolution) ships inside torchvision.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from effnet.models import create_model, get_config, list_models
from effnet.models.weights import WEIGHT_REGISTRY

PAPER = "Tan & Le 2019, Table 2"
LITE_README = "TF EfficientNet-Lite README"
# ImageNet top-1 (%) as published: the paper's Table 2, and the TensorFlow EfficientNet-Lite README.
REFERENCE_TOP1: dict[str, tuple[float, str]] = {
    "efficientnet_b0": (77.1, PAPER),
    "efficientnet_b1": (79.1, PAPER),
    "efficientnet_b2": (80.1, PAPER),
    "efficientnet_b3": (81.6, PAPER),
    "efficientnet_b4": (82.9, PAPER),
    "efficientnet_b5": (83.6, PAPER),
    "efficientnet_b6": (84.0, PAPER),
    "efficientnet_b7": (84.3, PAPER),
    "efficientnet_lite0": (75.1, LITE_README),
    "efficientnet_lite1": (76.7, LITE_README),
    "efficientnet_lite2": (77.6, LITE_README),
    "efficientnet_lite3": (79.8, LITE_README),
    "efficientnet_lite4": (81.5, LITE_README),
}

CLASSIC_MODELS = [
    "alexnet",
    "googlenet",
    "vgg16",
    "resnet50",
    "resnet152",
    "densenet121",
    "densenet169",
    "densenet201",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_large",
]
# B5-B7 at their native 456-600 px take minutes each on a laptop CPU: only with --models all.
DEFAULT_MODELS = [f"efficientnet_b{i}" for i in range(5)] + ["efficientnet_lite0"] + CLASSIC_MODELS
ALL_MODELS = [f"efficientnet_b{i}" for i in range(8)] + ["efficientnet_lite0"] + CLASSIC_MODELS

# Where `compare --finetune` takes ImageNet weights from (see finetune._use_pretrained).
PRETRAINED_MODES = ("offline", "download", "none")

# torchvision builds these with auxiliary training heads by default; they are dropped at inference
# (and the published parameter counts of GoogLeNet exclude them), so we build without them.
_WITHOUT_AUX_HEADS = {"googlenet", "inception_v3"}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str  # "efficientnet" (B0-B7), "efficientnet-lite" or "torchvision"
    resolution: int  # native input size: the one its reference accuracy was measured at
    top1: float | None  # ImageNet top-1 %, None when unknown
    top1_source: str

    @property
    def is_efficientnet(self) -> bool:
        return self.family.startswith("efficientnet")


def torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def resolve_models(spec: str | None) -> list[str]:
    """'a,b,c' -> names (validated); None -> the default set; 'all' -> B0-B7 too."""
    if not spec:
        return list(DEFAULT_MODELS)
    if spec.strip() == "all":
        return list(ALL_MODELS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    known = set(list_models()) | set(torchvision_names())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown)}. Use effnet's names (`effnet models`) or torchvision "
            f"classification models ({', '.join(CLASSIC_MODELS)}, ...), or 'all'."
        )
    return list(dict.fromkeys(names))


def torchvision_weights(name: str) -> torchvision.models.WeightsEnum | None:
    """The original-recipe ImageNet weights (IMAGENET1K_V1) when torchvision has them.

    V1 is the architecture's own published training, like the baselines of the paper's Table 2;
    the later V2 weights (ResNet-50: 80.9% instead of 76.1%) come from a 2021 recipe with 600
    epochs and heavy augmentation, and would compare training recipes, not architectures.
    """
    try:
        weights = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    return weights.__members__.get("IMAGENET1K_V1", weights.DEFAULT)


def describe(name: str) -> ZooEntry:
    base = name.removeprefix("tf_")
    if name in list_models():
        family = "efficientnet-lite" if "lite" in name else "efficientnet"
        top1, source = REFERENCE_TOP1.get(base, (None, ""))
        return ZooEntry(name, family, get_config(name).preprocess.input_size, top1, source)
    weights = torchvision_weights(name)
    if weights is None:
        return ZooEntry(name, "torchvision", 224, None, "")
    resolution = weights.transforms().crop_size[0]
    top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return ZooEntry(name, "torchvision", resolution, top1, f"torchvision {type(weights).__name__}.{weights.name}")


def build(name: str, num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    """Our EfficientNets through `create_model`, anything else through `torchvision.models.get_model`.

    With `pretrained`, torchvision models get their ImageNet weights (downloaded unless cached)
    and a new `num_classes` classifier, as our `create_model` does.
    """
    if name in list_models():
        return create_model(name, num_classes=num_classes, pretrained=pretrained)
    extra = {"aux_logits": False, "init_weights": not pretrained} if name in _WITHOUT_AUX_HEADS else {}
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    model = torchvision.models.get_model(name, weights=torchvision_weights(name), **extra)
    _replace_classifier(model, num_classes)
    return model


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    if num_classes != 1000:
        parent, attr, last = last_linear(model)
        setattr(parent, attr, nn.Linear(last.in_features, num_classes))


def last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The classifier's final layer (torchvision's classifiers all end in one `nn.Linear`): its
    parent module, its attribute name there, and the layer."""
    path, layer = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr, layer


def has_pretrained(name: str) -> bool:
    """Whether ImageNet weights are registered for `name` (ours) or published by torchvision."""
    return name in WEIGHT_REGISTRY if name in list_models() else torchvision_weights(name) is not None


def pretrained_offline(name: str) -> bool:
    """Whether ImageNet weights for `name` load without network: shipped in an installed package
    (Lite0) or already in torch's hub cache from an earlier download."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if name in list_models():
        for source in WEIGHT_REGISTRY.get(name, []):
            if source.kind == "package" and importlib.util.find_spec(source.location) is not None:
                return True
            if source.kind == "url" and (cache / source.location.rsplit("/", 1)[-1]).is_file():
                return True
        return False
    weights = torchvision_weights(name)
    return weights is not None and (cache / weights.url.rsplit("/", 1)[-1]).is_file()
