"""EfficientNet against torchvision's classic CNNs (`effnet compare`): costs, measured speed and
memory, reference accuracy and the paper's ratio-to-EfficientNet columns (`measure`); tables and
plots (`report`, which imports matplotlib); fine-tuning every model on the same data and budget
(`finetune`, which imports the training layer). Only `measure` is imported here: it is what each
measuring subprocess loads."""

from effnet.comparison.measure import CompareRow, compare_models
from effnet.comparison.zoo import ALL_MODELS, CLASSIC_MODELS, DEFAULT_MODELS, resolve_models

__all__ = [
    "ALL_MODELS",
    "CLASSIC_MODELS",
    "DEFAULT_MODELS",
    "CompareRow",
    "compare_models",
    "resolve_models",
]
