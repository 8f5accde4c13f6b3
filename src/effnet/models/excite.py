"""Squeeze-and-excitation as one autograd node, so that its input gradient costs one pass.

Written plainly, `x * gate(mean(x))` reaches `x` by two paths, the product and the mean. Autograd
then writes the product's gradient (a full-size tensor), expands the mean's, and adds the two in a
second full pass. And `mean` of a bf16 map on a CPU first copies the whole map to fp32 (about 10x the
time of `sum`, which accumulates in fp32 anyway). In a profile of B0's training step on a CPU with
native bf16 those passes over the largest feature maps of every block took about a tenth of the step.
Here the gate network (two 1x1 convolutions on N x C x 1 x 1) keeps its own small autograd graph, the
average is a `sum`, and the input gradient is a single `addcmul`:

    d loss / d x = grad * gate + (d loss / d pooled) / (H * W)

`squeeze_excite` takes this route when autograd needs it, and computes the plain expression
otherwise (inference, export, tracing, compilers). Same numbers as the plain expression within
floating-point rounding (tests/speed/test_excite.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def squeeze_excite(
    x: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter]
) -> torch.Tensor:
    """`x * gate(x averaged over H and W)`, where `gate` maps N x C x 1 x 1 to N x C x 1 x 1 and
    `params` are the parameters it uses (their gradients are computed here)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    traced = torch.jit.is_tracing() or torch.compiler.is_compiling()  # exporters and compilers get plain ops
    if traced:
        return x * gate(x.mean((2, 3), keepdim=True))
    if not needs_grad:
        return x * gate(spatial_mean(x))
    return _SqueezeExcite.apply(x, gate, *params)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """`x.mean((2, 3), keepdim=True)` without the fp32 copy `mean` makes of a bf16 map on a CPU."""
    return x.sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3])


class _SqueezeExcite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, *params):  # noqa: ANN001, ANN205 (autograd's signature)
        pooled = spatial_mean(x).detach()
        # The gate's own graph, differentiated in backward. Its tensors (N x C x 1 x 1) are kept as they
        # are, not through any saved-tensor hooks around us: activation checkpointing's would recompute
        # the block again from inside this node's backward.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            pooled.requires_grad_(ctx.needs_input_grad[0])
            scale = gate(pooled)
        ctx.save_for_backward(x)
        ctx.pooled, ctx.scale, ctx.params = pooled, scale, params
        return x * scale.detach()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        wanted = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[2:], strict=True) if needed]
        inputs = ([ctx.pooled] if ctx.needs_input_grad[0] else []) + wanted
        grad_scale = (grad * x).sum((2, 3), keepdim=True)
        found = iter(torch.autograd.grad(ctx.scale, inputs, grad_scale.to(ctx.scale.dtype)) if inputs else ())
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_pooled = next(found) / (x.shape[2] * x.shape[3])
            grad_x = torch.addcmul(grad_pooled.to(grad.dtype), grad, ctx.scale.detach().to(grad.dtype))
        grad_params = [next(found) if needed else None for needed in ctx.needs_input_grad[2:]]
        ctx.pooled = ctx.scale = None  # free the gate's graph
        return grad_x, None, *grad_params


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
