"""Fine-tuning with a frozen prefix, cached: the model-side half of `effnet train --cache-frozen`.

When the stem and the first K stages are frozen (weights and batch norm statistics), their output
for a given image never changes during training. Computing it once per image (and per flip), then
training only the suffix on the stored features, skips most of the forward pass and all of its
backward pass in every epoch: the early stages run at the highest resolution and dominate the cost.

    prefix, suffix = split_at_stage(model, 3)        # stem + stages[:3] | stages[3:] + head
    features = prefix_features(prefix, images)       # once, under no_grad, in eval mode
    logits = suffix(features)                        # every step; gradients reach the suffix only

Augmentations other than flips change the prefix's input and so cannot be cached; the caller
decides which views to store (the plain image and its horizontal flip is the usual pair).
"""

from __future__ import annotations

import torch
from torch import nn

from effnet.models.efficientnet import EfficientNet


class FrozenPrefix(nn.Module):
    """The stem and the first `num_stages` stages, always in eval mode, without gradients."""

    def __init__(self, model: EfficientNet, num_stages: int) -> None:
        super().__init__()
        self.stem = model.stem
        self.stages = nn.Sequential(*list(model.stages)[:num_stages])
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenPrefix:
        # Frozen means frozen batch norm statistics too: the cached features must stay valid.
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class TrainableSuffix(nn.Module):
    """The remaining stages, the head, pooling, dropout and classifier: features -> logits."""

    def __init__(self, model: EfficientNet, num_stages: int) -> None:
        super().__init__()
        self.stages = nn.Sequential(*list(model.stages)[num_stages:])
        self.head, self.pool, self.dropout, self.classifier = model.head, model.pool, model.dropout, model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.head(self.stages(features))).flatten(1)
        return self.classifier(self.dropout(pooled))


def split_at_stage(model: EfficientNet, num_stages: int) -> tuple[FrozenPrefix, TrainableSuffix]:
    """Split `model` after its first `num_stages` stages (0 <= num_stages < 7). Both halves share
    the model's modules, so training the suffix trains `model`, which is saved as usual."""
    if not 0 <= num_stages < len(model.stages):
        raise ValueError(f"num_stages must be between 0 and {len(model.stages) - 1}; got {num_stages}")
    return FrozenPrefix(model, num_stages), TrainableSuffix(model, num_stages)


@torch.no_grad()
def prefix_features(
    prefix: FrozenPrefix, images: torch.Tensor, flip: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The prefix's output for a batch of preprocessed images (or their horizontal mirror images
    with `flip`), stored as `dtype` (default: the model's dtype; bf16 halves the cache at a
    precision cost). Mirroring the input and not the features: stride-2 layers with TF 'same'
    padding are not mirror-symmetric, so flipped features are not the features of the flip."""
    if flip:
        images = torch.flip(images, dims=[3])
    features = prefix(images)
    return features if dtype is None else features.to(dtype)
