"""Fine-tuning: `fit(model, data, config)` and its `TrainConfig` (see engine.py for the loop)."""

from effnet.training.config import TrainConfig
from effnet.training.engine import FitResult, TrainingDiverged, evaluate, fit

__all__ = ["FitResult", "TrainConfig", "TrainingDiverged", "evaluate", "fit"]
