"""Faster and leaner forms of a built EfficientNet, with the same weights and the same numbers.

- `memory_efficient(model)`: every batch norm followed by an activation becomes one
  `BatchNormAct2d` whose backward recomputes the normalised values instead of storing them. An
  in-place SiLU after batch norm makes autograd keep a copy of its input (the batch norm output)
  besides the batch norm input; the fused op keeps only the batch norm input, so training holds
  one full-size tensor less per layer and skips that copy. The state dict is unchanged (the
  parameters and buffers keep their names), so checkpoints load either way.
- `fold_batchnorm(model)`: an inference-only copy with each batch norm folded into the
  convolution before it (one conv with a bias instead of conv + normalise): fewer passes over
  memory. Its state dict differs (biases, no batch norms): run it, never save it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from effnet.models.layers import ConvBNAct


def _activation_name(act: nn.Module) -> str | None:
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU6):
        return "relu6"
    if isinstance(act, nn.Identity):
        return None
    raise ValueError(f"no fused batch norm for activation {type(act).__name__}")


def _apply_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x, inplace=True)
    if activation == "relu6":
        return F.hardtanh(x, 0.0, 6.0, inplace=True)
    return x


def _activation_backward(grad: torch.Tensor, normalised: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, normalised)
    if activation == "relu6":  # one kernel; the same mask written as comparisons took ~20x as long (bf16)
        return torch.ops.aten.hardtanh_backward(grad, normalised, 0.0, 6.0)
    return grad


class _BatchNormActFunction(torch.autograd.Function):
    """Training-mode batch norm + activation that saves only its input and the batch statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, activation):  # noqa: ANN001
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )[:3]
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.activation = eps, activation
        return _apply_activation(out, activation)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_memory_format(x))
        if ctx.activation is not None:
            # Recompute the normalised values (one elementwise pass) rather than having stored them.
            var = invstd.pow(-2) - ctx.eps
            normalised = torch.ops.aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, ctx.eps)[0]
            grad = _activation_backward(grad, normalised, ctx.activation)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
        )
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class BatchNormAct2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` followed by an activation ('silu', 'relu6' or None), fused for training
    memory (see the module docstring). Parameters and buffers are those of `nn.BatchNorm2d`."""

    def __init__(self, num_features: int, activation: str | None = "silu", **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)
        self.activation = activation

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, activation: str | None) -> BatchNormAct2d:
        fused = cls(bn.num_features, activation, eps=bn.eps, momentum=bn.momentum)
        fused.to(device=bn.weight.device, dtype=bn.weight.dtype)
        fused.load_state_dict(bn.state_dict())
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fusable = self.training and self.momentum is not None and self.track_running_stats and torch.is_grad_enabled()
        if not fusable:
            return _apply_activation(super().forward(x), self.activation)
        self.num_batches_tracked.add_(1)
        return _BatchNormActFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum, self.eps, self.activation
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def memory_efficient(model: nn.Module) -> nn.Module:
    """Fuse every `ConvBNAct`'s batch norm and activation into a `BatchNormAct2d`, in place.

    The activation module becomes `nn.Identity` (it has no parameters), so `state_dict()` keys and
    values are exactly those of the plain model. Idempotent."""
    for module in model.modules():
        if isinstance(module, ConvBNAct) and not isinstance(module.bn, BatchNormAct2d):
            module.bn = BatchNormAct2d.from_batchnorm(module.bn, _activation_name(module.act))
            module.act = nn.Identity()
    return model


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """`conv` followed by `bn` (in eval mode) as a single convolution with a bias."""
    fused = copy.deepcopy(conv)
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach())
    fused.bias = nn.Parameter((bn.bias + (bias - bn.running_mean) * scale).detach())
    return fused


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` in which every `ConvBNAct`'s batch norm is folded into its
    convolution (the activation is kept). For inference only: the copy's state dict differs."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, ConvBNAct) and not isinstance(module.bn, nn.Identity):
            module.conv = _fold_into_conv(module.conv, module.bn)
            if isinstance(module.bn, BatchNormAct2d) and module.bn.activation is not None:
                module.act = nn.SiLU(inplace=True) if module.bn.activation == "silu" else nn.ReLU6(inplace=True)
            module.bn = nn.Identity()
    return folded
