"""The cached-prefix split computes the same logits as the whole model and trains only the suffix."""

from __future__ import annotations

import pytest
import torch

from effnet import create_model
from effnet.models.frozen import prefix_features, split_at_stage


def test_prefix_then_suffix_equals_the_whole_model_and_only_the_suffix_learns() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=5, drop_rate=0.0)
    model.eval()
    prefix, suffix = split_at_stage(model, 3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        expected_flipped = model(torch.flip(x, dims=[3]))
    features = prefix_features(prefix, x)
    assert not features.requires_grad
    torch.testing.assert_close(suffix(features), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(suffix(prefix_features(prefix, x, flip=True)), expected_flipped, atol=1e-5, rtol=0)

    suffix.train()
    prefix.train()  # stays in eval mode: cached features must not change
    assert not prefix.stem.bn.training and not any(p.requires_grad for p in prefix.parameters())
    suffix(features).sum().backward()
    assert model.classifier.weight.grad is not None and model.stages[3][0].project.conv.weight.grad is not None
    assert model.stem.conv.weight.grad is None and model.stages[2][0].project.conv.weight.grad is None


def test_split_rejects_an_impossible_stage_count() -> None:
    model = create_model("efficientnet_b0", num_classes=3)
    with pytest.raises(ValueError, match="between 0 and 6"):
        split_at_stage(model, 7)
