"""The speed paths compute the same numbers as the plain model: fused batch norm + activation in
training (outputs, gradients, running statistics, state dict), batch norm folded for inference."""

from __future__ import annotations

import copy

import pytest
import torch

from effnet import create_model, runtime
from effnet.models.fused import BatchNormAct2d, fold_batchnorm, memory_efficient

# silu + symmetric padding, relu6 (Lite), TF 'same' padding: every kind of ConvBNAct there is.
VARIANTS = ["efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0"]


def plain_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # No dropout or stochastic depth: two copies must draw nothing at random to be comparable.
    return create_model(name, num_classes=10, drop_rate=0.0, drop_path_rate=0.0)


def images(batch: int = 2, size: int = 48, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_gradients_match(plain: torch.nn.Module, fast: torch.nn.Module, rtol: float) -> None:
    """Relative to the whole gradient's size: some gradients are exactly zero in theory (the bias
    of a batch norm followed by another batch norm) and only rounding noise in practice."""
    pairs = list(zip(plain.named_parameters(), fast.named_parameters(), strict=True))
    scale = max(p.grad.abs().max() for (_, p), _ in pairs)
    for (name, p), (fast_name, q) in pairs:
        assert name == fast_name
        assert torch.allclose(q.grad, p.grad, rtol=rtol, atol=rtol * scale), name
    whole = torch.cat([p.grad.flatten() for (_, p), _ in pairs])
    fast_whole = torch.cat([q.grad.flatten() for _, (_, q) in pairs])
    assert (whole - fast_whole).norm() <= rtol * whole.norm()


@pytest.mark.parametrize(
    ("name", "channels_last"),
    [
        ("efficientnet_b0", False),
        ("efficientnet_b0", True),
        ("efficientnet_lite0", True),
        ("tf_efficientnet_b0", False),
    ],
)
def test_memory_efficient_training_matches_plain(name: str, channels_last: bool) -> None:
    plain = plain_model(name).train()
    fast = memory_efficient(copy.deepcopy(plain))
    assert any(isinstance(m, BatchNormAct2d) for m in fast.modules())
    if channels_last:
        plain, fast = (m.to(memory_format=torch.channels_last) for m in (plain, fast))
    x = images(channels_last=channels_last)
    logits, fast_logits = plain(x), fast(x)
    assert logits.std() > 1e-3  # not a degenerate comparison
    torch.testing.assert_close(fast_logits, logits, atol=1e-4, rtol=0)
    target = torch.randn_like(logits)
    (logits * target).sum().backward()
    (fast_logits * target).sum().backward()
    assert_gradients_match(plain, fast, rtol=1e-4)
    # The batch statistics went into the running averages exactly as before.
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=0)


def test_memory_efficient_under_bf16_autocast_stays_within_bf16_tolerance() -> None:
    plain = plain_model("efficientnet_b0").train()
    fast = memory_efficient(copy.deepcopy(plain))
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, fast_logits = plain(x), fast(x)
    assert fast_logits.dtype == logits.dtype
    torch.testing.assert_close(fast_logits.float(), logits.float(), atol=2e-2 * logits.abs().max().item(), rtol=0)
    logits.float().square().sum().backward()
    fast_logits.float().square().sum().backward()
    assert_gradients_match(plain, fast, rtol=5e-2)


def test_memory_efficient_keeps_the_state_dict_layout_and_loads_both_ways() -> None:
    plain = plain_model("efficientnet_b0")
    fast = memory_efficient(copy.deepcopy(plain))
    assert list(fast.state_dict()) == list(plain.state_dict())
    other = plain_model("efficientnet_b0")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    fast.load_state_dict(other.state_dict())  # a plain checkpoint into the fused model
    plain.load_state_dict(fast.state_dict())  # and back
    for key, value in other.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    assert memory_efficient(fast) is fast and list(fast.state_dict()) == list(other.state_dict())  # idempotent


def test_memory_efficient_frozen_and_no_grad_paths() -> None:
    """Eval mode and no_grad fall back to the plain ops; frozen batch norm weights get no gradient."""
    plain = plain_model("efficientnet_lite0").train()
    fast = memory_efficient(copy.deepcopy(plain))
    for model in (plain, fast):
        model.stem.requires_grad_(False)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=0)
    plain(x).sum().backward()
    fast(x).sum().backward()
    assert fast.stem.bn.weight.grad is None and fast.stem.conv.weight.grad is None
    torch.testing.assert_close(fast.head.bn.weight.grad, plain.head.bn.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_folded_batchnorm_gives_the_same_logits(name: str) -> None:
    model = plain_model(name).train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics to fold
            model(images(4) * 2 + 0.5)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = images(channels_last=True)
    with torch.no_grad():
        expected = model(x)
        assert expected.std() > 1e-3
        torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the original is untouched


def test_runtime_defaults_use_the_fast_paths() -> None:
    model = plain_model("efficientnet_b0")
    keys = list(model.state_dict())
    prepared = runtime.prepare_model(model, torch.device("cpu"))
    assert any(isinstance(m, BatchNormAct2d) for m in prepared.modules())
    assert list(prepared.state_dict()) == keys
    assert prepared.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    inference = runtime.prepare_inference_model(prepared, torch.device("cpu"))
    assert not inference.training and not any(isinstance(m, torch.nn.BatchNorm2d) for m in inference.modules())


@pytest.mark.parametrize(("name", "fused"), [(name, False) for name in VARIANTS] + [("efficientnet_b0", True)])
def test_frozen_batchnorm_folded_in_training_matches_the_batchnorm(
    name: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With frozen statistics (eval-mode batch norms in a training model, `--bn-freeze on`) every
    conv + batch norm runs as one convolution: same logits and gradients (float64, where rounding
    cannot hide a wrong formula), running statistics untouched, and no batch norm op left."""
    from effnet.models import layers

    reference = plain_model(name).double()
    with torch.no_grad():
        for module in reference.modules():  # statistics far from 0 and 1, so a missing term shows
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
    if fused:
        memory_efficient(reference)
    folded = copy.deepcopy(reference)
    for model in (reference, folded):
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    before = copy.deepcopy(folded.state_dict())
    x = images(channels_last=True).double()
    batch_norms = []
    real_batch_norm = torch.nn.functional.batch_norm
    monkeypatch.setattr(
        torch.nn.functional, "batch_norm", lambda *a, **k: batch_norms.append(1) or real_batch_norm(*a, **k)
    )
    logits = folded(x)
    assert not batch_norms  # every batch norm was folded
    monkeypatch.setattr(layers, "_folds", lambda bn: False)
    expected = reference(x)
    assert batch_norms  # the reference ran the batch norms
    assert expected.std() > 1e-3
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=1e-10)
    target = torch.randn_like(logits)
    (logits * target).sum().backward()
    (expected * target).sum().backward()
    assert_gradients_match(reference, folded, rtol=1e-7)  # sums in another order: ~1e-12 apart, with cancellation
    for key, value in before.items():
        assert torch.equal(folded.state_dict()[key], value), key
