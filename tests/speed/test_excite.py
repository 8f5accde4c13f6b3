"""The one-node squeeze-and-excitation gives the plain expression's outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from effnet.models.excite import spatial_mean, squeeze_excite
from effnet.models.layers import SqueezeExcite


def _plain(se: SqueezeExcite, x: torch.Tensor) -> torch.Tensor:
    return x * se.gate(x.mean((2, 3), keepdim=True))


def _run(
    forward, se: SqueezeExcite, x: torch.Tensor, x_grad: bool, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    se = copy.deepcopy(se)
    x = x.clone().requires_grad_(x_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(se, x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.double() * weights).sum().backward()
    return out, x.grad, [p.grad for p in se.parameters()]


def _fused(se: SqueezeExcite, x: torch.Tensor) -> torch.Tensor:
    return squeeze_excite(x, se.gate, list(se.parameters()))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["input-trained", "input-frozen"])
def test_outputs_and_gradients_match_the_plain_expression(channels_last: bool, x_grad: bool) -> None:
    torch.manual_seed(0)
    se = SqueezeExcite(12, 3).double()
    x = torch.randn(3, 12, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, reference = _run(_fused, se, x, x_grad), _run(_plain, se, x, x_grad)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-10, atol=1e-10, msg="output")
    if x_grad:
        torch.testing.assert_close(ours[1], reference[1], rtol=1e-10, atol=1e-10, msg="input grad")
        assert ours[1].is_contiguous(memory_format=torch.channels_last) == channels_last
    else:
        assert ours[1] is None
    for mine, theirs in zip(ours[2], reference[2], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10, msg="parameter grad")


def test_frozen_gate_still_passes_the_input_gradient() -> None:
    """A block whose SE is frozen but whose input trains (requires_grad only on x)."""
    torch.manual_seed(0)
    se = SqueezeExcite(8, 2).double().requires_grad_(False)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    ours, reference = _run(_fused, se, x, True), _run(_plain, se, x, True)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-10, atol=1e-10)
    assert all(grad is None for grad in ours[2])


def test_bf16_autocast_matches_within_bf16_tolerance() -> None:
    torch.manual_seed(0)
    se = SqueezeExcite(32, 8)
    x = torch.randn(4, 32, 14, 14).contiguous(memory_format=torch.channels_last).bfloat16()
    ours, reference = _run(_fused, se, x, True, bf16=True), _run(_plain, se, x, True, bf16=True)
    assert ours[0].dtype == reference[0].dtype == torch.bfloat16
    assert ours[1].dtype == torch.bfloat16
    for mine, theirs in [(ours[0], reference[0]), (ours[1], reference[1]), *zip(ours[2], reference[2], strict=True)]:
        error = (mine.float() - theirs.float()).norm() / theirs.float().norm()
        assert error < 2e-2, error


def test_spatial_mean_is_the_mean_and_the_module_uses_the_one_node_path() -> None:
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(spatial_mean(x), x.mean((2, 3), keepdim=True))
    se = SqueezeExcite(5, 2).double()
    out = se(x.requires_grad_())
    assert type(out.grad_fn).__name__ == "_SqueezeExciteBackward"
    with torch.no_grad():
        torch.testing.assert_close(se(x), _plain(se, x))
