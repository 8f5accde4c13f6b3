"""EfficientNet models: the paper's architecture as data, compound scaling, weights."""

from effnet.models.efficientnet import EfficientNet
from effnet.models.registry import create_model, get_config, list_models, load_weights
from effnet.models.scaling import CompoundScaling, compound_scale, round_filters, round_repeats
from effnet.models.spec import ModelConfig, PreprocessConfig, StageSpec
from effnet.models.weights import WeightsError

__all__ = [
    "CompoundScaling",
    "EfficientNet",
    "ModelConfig",
    "PreprocessConfig",
    "StageSpec",
    "WeightsError",
    "compound_scale",
    "create_model",
    "get_config",
    "list_models",
    "load_weights",
    "round_filters",
    "round_repeats",
]
