"""effnet: EfficientNet (Tan & Le, 2019) and transfer learning with it."""

from effnet.models import (
    EfficientNet,
    WeightsError,
    compound_scale,
    create_model,
    get_config,
    list_models,
)

__version__ = "0.1.0"

__all__ = ["EfficientNet", "WeightsError", "compound_scale", "create_model", "get_config", "list_models"]
