"""`create_model` and `list_models`: names to configs, configs to modules, weights into them."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from effnet.models.efficientnet import EfficientNet
from effnet.models.scaling import PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA, build_config, compound_scale
from effnet.models.spec import (
    EFFICIENTNET_COEFFICIENTS,
    LITE_COEFFICIENTS,
    TF_CONVENTIONS,
    ModelConfig,
    PreprocessConfig,
)
from effnet.models.weights import (
    classifier_shape,
    convert_state_dict,
    detect_format,
    resolve_pretrained,
    source_conventions,
)

log = logging.getLogger("effnet")

# TensorFlow ports (timm's `tf_` names): TF 'same' padding and TF batch-norm constants.
COMPOUND_NAME = "efficientnet"


def _base_configs() -> dict[str, ModelConfig]:
    configs = {}
    for name, (width, depth, resolution, dropout) in EFFICIENTNET_COEFFICIENTS.items():
        configs[name] = build_config(width, depth, resolution, dropout, name=name)
        tf_name = "tf_" + name
        configs[tf_name] = dataclasses.replace(
            build_config(width, depth, resolution, dropout, name=tf_name), **TF_CONVENTIONS
        )
    for name, (width, depth, resolution, dropout) in LITE_COEFFICIENTS.items():
        configs[name] = build_config(width, depth, resolution, dropout, lite=True, name=name)
        tf_name = "tf_" + name
        configs[tf_name] = dataclasses.replace(
            build_config(width, depth, resolution, dropout, lite=True, name=tf_name), **TF_CONVENTIONS
        )
    return configs


MODEL_CONFIGS: dict[str, ModelConfig] = _base_configs()
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "stages"}
_SCALING_KEYS = {"phi", "alpha", "beta", "gamma", "coefficients", "base_resolution"}


def list_models(pattern: str = "") -> list[str]:
    """Model names `create_model` accepts (filtered by substring), plus 'efficientnet' with phi."""
    return [name for name in sorted(MODEL_CONFIGS, key=_natural_key) if pattern in name]


def _natural_key(name: str) -> tuple[bool, str]:
    return (name.startswith("tf_"), name)


def load_coefficients(path: str | Path) -> dict[str, float]:
    """Read alpha/beta/gamma from a JSON file written by `effnet search` (or by hand)."""
    try:
        data = json.loads(Path(path).read_text())
        return {key: float(data[key]) for key in ("alpha", "beta", "gamma")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"cannot read scaling coefficients from {path}: expected JSON with numeric "
            f"'alpha', 'beta' and 'gamma' ({error})"
        ) from error


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The config `create_model(name, **overrides)` would build, without building it."""
    scaling = {k: overrides.pop(k) for k in list(overrides) if k in _SCALING_KEYS}
    if name == COMPOUND_NAME:
        if "phi" not in scaling:
            raise ValueError("create_model('efficientnet', ...) needs phi=<float>, e.g. phi=2.5")
        coefficients = {"alpha": PAPER_ALPHA, "beta": PAPER_BETA, "gamma": PAPER_GAMMA}
        if "coefficients" in scaling:
            coefficients |= load_coefficients(scaling.pop("coefficients"))
        coefficients |= {k: float(scaling.pop(k)) for k in ("alpha", "beta", "gamma") if k in scaling}
        config = compound_scale(float(scaling.pop("phi")), **coefficients, **scaling).config
    elif name in MODEL_CONFIGS:
        if scaling:
            raise ValueError(f"{sorted(scaling)} only apply to create_model('efficientnet', phi=...), not to {name}")
        config = MODEL_CONFIGS[name]
    else:
        raise ValueError(
            f"unknown model {name!r}. Valid names: {', '.join(list_models())}, "
            "or 'efficientnet' with phi=<float> for any compound-scaled network."
        )
    unknown = set(overrides) - _CONFIG_FIELDS - {"img_size"}
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; valid ones: {sorted(_CONFIG_FIELDS)}")
    if isinstance(overrides.get("preprocess"), dict):  # all or some fields, e.g. from a JSON file
        overrides["preprocess"] = _preprocess_from(config.preprocess, overrides["preprocess"])
    if "img_size" in overrides:  # on top of the weights' preprocessing, whose other fields stay
        base = overrides.get("preprocess", config.preprocess)
        overrides["preprocess"] = dataclasses.replace(base, input_size=int(overrides.pop("img_size")))
    return dataclasses.replace(config, **overrides)


def _preprocess_from(base: PreprocessConfig, fields: dict[str, Any]) -> PreprocessConfig:
    """`base` with `fields` replaced; JSON and YAML give lists where the dataclass keeps tuples."""
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
    return dataclasses.replace(base, **values)


def weights_preprocess(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing the loaded weights were trained with, where they say: a registered source's
    (weights.WEIGHT_REGISTRY), one of our checkpoints' (config.preprocess), an exported folder's
    config.json, or the mean and std a Keras file normalises with. None for bare foreign files."""
    if isinstance(meta.get("preprocess"), dict):
        return meta["preprocess"]
    saved = meta.get("config")
    if isinstance(saved, dict) and isinstance(saved.get("preprocess"), dict):
        return saved["preprocess"]
    return None


def create_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool | str | Path = False,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    **overrides: Any,
) -> EfficientNet:
    """Build an EfficientNet by name, optionally with pretrained weights.

    Args:
        name: one of `list_models()`, or 'efficientnet' with `phi=` (and optionally `alpha=`,
            `beta=`, `gamma=` or `coefficients=FILE`) for any compound-scaled network.
        num_classes: outputs of the classifier; 0 returns pooled features. With pretrained
            weights for another number of classes everything but the classifier is loaded.
        pretrained: False; True for the registered ImageNet weights (offline for
            efficientnet_lite0 with the `lite0` extra); or a path to a torchvision, timm,
            efficientnet_pytorch or effnet state dict/checkpoint, recognised by its keys.
        drop_rate: dropout before the classifier (default: the variant's, 0.2 for B0).
        drop_path_rate: stochastic-depth rate of the last block (default 0.2).
        overrides: any `ModelConfig` field (padding, bn_eps, activation, se_ratio, ...), or
            img_size for the default input resolution.
    """
    state = None
    if pretrained is not False:
        state, fmt, meta = resolve_pretrained(name, pretrained)
        if fmt == "effnet" and "config" in meta:
            # Our checkpoints record how they were built (e.g. TF padding after a TF-weights load).
            saved = meta["config"]
            overrides = {k: saved[k] for k in ("padding", "bn_eps", "bn_momentum") if k in saved} | overrides
        conventions = source_conventions(fmt, name)
        if conventions:
            log.info("weights in %s format: using %s to match them", fmt, conventions)
        overrides = {**conventions, **overrides}
        adopted = weights_preprocess(meta)
        if adopted is not None and "preprocess" not in overrides:
            overrides["preprocess"] = dict(adopted)  # model.pretrained_cfg: that of the weights loaded
    if drop_rate is not None:
        overrides["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    config = get_config(name, num_classes=num_classes, **overrides)
    model = EfficientNet(config)
    if state is not None:
        load_weights(model, state, fmt)
    return model


def load_weights(model: EfficientNet, state: dict, fmt: str | None = None) -> None:
    """Load a (possibly foreign) state dict into `model`; when the classifier's shape differs
    (fine-tuning to other classes) it is left freshly initialised, and the log says so."""
    fmt = fmt or detect_format(state)
    source_classes = classifier_shape(state, fmt)
    keep_head = model.num_classes > 0 and source_classes is not None and source_classes[0] == model.num_classes
    if source_classes is not None and not keep_head:
        log.warning(
            "loaded all weights but the classifier: the weights have %d classes, the model %d; "
            "the classifier is initialised anew and must be trained",
            source_classes[0],
            model.num_classes,
        )
    converted = convert_state_dict(state, model, fmt, skip_classifier=not keep_head)
    model.load_state_dict(converted, strict=keep_head)
