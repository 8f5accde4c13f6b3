"""Activation checkpointing gives the plain path's outputs, gradients and batch norm statistics,
and stores a fraction of its activations."""

from __future__ import annotations

import copy

import pytest
import torch

from effnet import create_model
from effnet.models import fused


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits, and the bytes autograd keeps for the backward pass (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
    return logits, total


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["plain-bn", "fused-bn-act"])
def test_checkpointing_matches_plain_training(memory_efficient: bool) -> None:
    torch.manual_seed(0)
    plain = create_model("efficientnet_b0", num_classes=7, drop_path_rate=0.2)
    if memory_efficient:
        fused.memory_efficient(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    plain.train(), checkpointed.train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same stochastic-depth draws (checkpoint replays them on recompute)
        logits, saved = saved_activation_bytes(model, x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), saved, model))
    (plain_logits, plain_saved, _), (ckpt_logits, ckpt_saved, _) = results
    torch.testing.assert_close(ckpt_logits, plain_logits, atol=1e-4, rtol=0)
    assert ckpt_saved < plain_saved / 3, (ckpt_saved, plain_saved)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, atol=1e-6), name


def test_checkpointing_is_off_in_eval_and_without_grad() -> None:
    model = create_model("efficientnet_lite0", num_classes=3).eval()
    model.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    _, saved_eval = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(False)
    _, saved_plain = saved_activation_bytes(model, x)
    assert saved_eval == saved_plain  # eval mode: the plain path (nothing to recompute for)
