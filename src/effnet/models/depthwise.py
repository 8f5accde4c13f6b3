"""Depthwise convolution with a backward pass that is fast on CPUs.

Profiling B0's training step on a CPU with native bf16 (oneDNN through aten) showed the depthwise
convolutions' backward pass taking over half the step, an order of magnitude more than their forward
pass: the input gradient of a strided depthwise convolution, and the weight gradient of 5x5 kernels
in bf16 (per-layer figures in benchmarks/README.md). Both have cheap equivalents:

* the input gradient is the *forward* depthwise convolution of the output gradient with the kernel
  rotated by 180 degrees; with stride s, s^2 such convolutions, one per phase of the input grid,
  each with the sub-kernel that phase saw (`_input_grad`);
* the weight gradient of 5x5 kernels, slow in bf16, is computed in fp32, or at stride 1 assembled
  from four 3x3 ones (oneDNN's bf16 3x3 kernel is fast) where that measured faster.

`depthwise_conv2d` takes this route when autograd needs it on the CPU, and is `F.conv2d` otherwise
(inference, export, tracing, CUDA). Same numbers as `F.conv2d` within floating-point rounding
(tests/speed/test_depthwise.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, groups=channels)`, trained faster on a CPU."""
    channels = weight.shape[0]
    tensors = (x, weight) if bias is None else (x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    traced = torch.jit.is_tracing() or torch.compiler.is_compiling()  # exporters and compilers get plain ops
    if not needs_grad or x.device.type != "cpu" or traced:
        return F.conv2d(x, weight, bias, stride, padding, 1, channels)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    with torch.autocast("cpu", enabled=False):
        return _DepthwiseConv.apply(x, weight, bias, tuple(stride), tuple(padding), dtype)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dtype):  # noqa: ANN001, ANN205 (autograd's signature)
        ctx.stride, ctx.padding, ctx.x_dtype, ctx.x_shape = stride, padding, x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)  # x as computed (bf16 under autocast), weight the fp32 parameter
        bias = None if bias is None else bias.to(dtype)
        return F.conv2d(x, weight.to(dtype), bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_out.to(x.dtype), weight.to(x.dtype), ctx.x_shape, ctx.stride, ctx.padding)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad_out, x, weight, ctx.stride, ctx.padding).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            # Summed in at least fp32: a bf16 sum over a batch of feature maps loses the gradient.
            grad_bias = grad_out.sum((0, 2, 3), dtype=torch.promote_types(grad_out.dtype, torch.float32))
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


# How the bf16 weight gradient of a wide kernel at stride 1 is computed: "windows" (3x3 ones) or
# "fp32" (cast up). Which is faster depends on the CPU's kernels: `runtime.choose_wide_bf16_route`
# measures it once per machine and sets it here for the run (the route itself does not change the
# gradient beyond rounding). Until then, the fp32 route.
WIDE_BF16_ROUTES = ("windows", "fp32")
_wide_bf16_route = "fp32"


def set_wide_bf16_route(route: str) -> None:
    global _wide_bf16_route  # noqa: PLW0603 (a per-process kernel choice, as torch.backends' flags are)
    if route not in WIDE_BF16_ROUTES:
        raise ValueError(f"unknown route {route!r} for the wide depthwise weight gradient; use {WIDE_BF16_ROUTES}")
    _wide_bf16_route = route


def wide_bf16_route_calls(batch: int = 32) -> dict[str, Callable[[], torch.Tensor]]:
    """Each route's weight gradient of two typical 5x5 stride-1 layers (B0/Lite0 stages 3 and 5 at
    224 px), in bf16 channels-last: the calls `runtime.choose_wide_bf16_route` times."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for channels, side in ((240, 28), (672, 14)):
        x = torch.randn(batch, channels, side, side, generator=generator).bfloat16()
        grad = torch.randn(batch, channels, side, side, generator=generator).bfloat16()
        layers.append(
            (grad.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
        )
    return {
        "windows": lambda: [_windowed_weight_grad(grad, x, 5, (2, 2)) for grad, x in layers][-1],
        "fp32": lambda: [_aten_weight_grad(grad.float(), x.float(), 5, (1, 1), (2, 2)) for grad, x in layers][-1],
    }


def _weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """d loss / d weight. oneDNN's bf16 weight gradient is fast for 3x3 kernels and slow for wider
    ones (5x5: slower than fp32 even counting the casts, on every CPU measured). So a wide kernel's
    gradient is computed in fp32, or at stride 1, where the CPU measured it faster, assembled from
    3x3 windows in bf16 (`_windowed_weight_grad`)."""
    kernel = weight.shape[-1]
    wide_odd = kernel == weight.shape[-2] > 3 and kernel % 2 == 1
    if wide_odd and stride == (1, 1) and x.dtype == torch.bfloat16 and _wide_bf16_route == "windows":
        return _windowed_weight_grad(grad_out.to(x.dtype), x, kernel, padding)
    wide = x.dtype if kernel <= 3 else torch.promote_types(x.dtype, torch.float32)
    return _aten_weight_grad(grad_out.to(wide), x.to(wide), kernel, stride, padding)


def _aten_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, kernel: int, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    channels = x.shape[1]
    weight = torch.empty((channels, 1, kernel, kernel), dtype=x.dtype, device=x.device)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, stride, padding, [1, 1], False, [0, 0], channels, [False, True, False]
    )[1]


def _windowed_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, kernel: int, padding: tuple[int, int]
) -> torch.Tensor:
    """The stride-1 weight gradient of an odd `kernel` x `kernel` depthwise convolution, as 3x3 ones.

    Tap (i, j) of the kernel collects sum over pixels o of grad[o] * x_padded[o + (i, j)]. The 3x3
    window at offset (a, b) is the stride-1 weight gradient of a 3x3 kernel over x_padded shifted by
    (a, b); windows at offsets 0, 2, ..., kernel - 3 cover every tap (overlapping taps agree)."""
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    rows, cols = grad_out.shape[-2:]
    grad_weight = x.new_empty((x.shape[1], 1, kernel, kernel), dtype=torch.promote_types(x.dtype, torch.float32))
    for top in range(0, kernel - 2, 2):
        for left in range(0, kernel - 2, 2):
            window = x[:, :, top : top + rows + 2, left : left + cols + 2]
            grad_weight[:, :, top : top + 3, left : left + 3] = _aten_weight_grad(grad_out, window, 3, (1, 1), (0, 0))
    return grad_weight


def _input_grad(
    grad_out: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """d loss / d x of a depthwise convolution, from stride-1 forward depthwise convolutions.

    Input pixel t (of the padded input) received weight w[i] from output pixel o when t = s*o + i.
    Pixels t = s*q + r of one phase r get sum_m g[q - m] * w[s*m + r]: a full correlation of the
    output gradient with the sub-kernel w[r::s], rotated. One convolution per phase (one in all
    for stride 1, where it is the whole answer), each written into its own interleaved grid."""
    batch, channels, height, width = x_shape
    if stride == (1, 1):  # one phase, and padding k - 1 - p lands exactly on the unpadded input
        kernel_h, kernel_w = weight.shape[-2:]
        reach = (kernel_h - 1 - padding[0], kernel_w - 1 - padding[1])
        if min(reach) >= 0:
            return F.conv2d(grad_out, weight.flip(-1, -2), None, 1, reach, 1, channels)
    channels_last = grad_out.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = torch.empty(x_shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=memory_format)
    for phase_h in range(stride[0]):
        for phase_w in range(stride[1]):
            # Unpadded pixels u with u + padding = stride * q + phase, from q = first on.
            start_h, start_w = (phase_h - padding[0]) % stride[0], (phase_w - padding[1]) % stride[1]
            first_h, first_w = (
                (start_h + padding[0] - phase_h) // stride[0],
                (start_w + padding[1] - phase_w) // stride[1],
            )
            target = grad_x[:, :, start_h :: stride[0], start_w :: stride[1]]
            sub = weight[:, :, phase_h :: stride[0], phase_w :: stride[1]]
            if sub.numel() == 0 or target.numel() == 0:  # stride larger than the kernel: never read
                target.zero_()
                continue
            full = F.conv2d(grad_out, sub.flip(-1, -2), None, 1, (sub.shape[-2] - 1, sub.shape[-1] - 1), 1, channels)
            full = full[:, :, first_h : first_h + target.shape[-2], first_w : first_w + target.shape[-1]]
            rows, cols = full.shape[-2:]
            if (rows, cols) != tuple(target.shape[-2:]):  # pixels past the last window: never read
                target.zero_()
            target[:, :, :rows, :cols] = full
    return grad_x


class DepthwiseConv2d(nn.Conv2d):
    """`nn.Conv2d` with one filter per channel (same state dict), through `depthwise_conv2d`."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return depthwise_conv2d(x, weight, bias, self.stride, self.padding)
