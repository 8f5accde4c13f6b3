"""effnet: EfficientNet (Tan & Le, 2019) and transfer learning with it."""

from effnet.models import (
    EfficientNet,
    WeightsError,
    compound_scale,
    create_model,
    get_config,
    list_models,
)
from effnet.training import FitResult, TrainConfig, fit

__version__ = "0.1.0"

__all__ = [
    "EfficientNet",
    "FitResult",
    "TrainConfig",
    "WeightsError",
    "compound_scale",
    "create_model",
    "fit",
    "get_config",
    "list_models",
]
