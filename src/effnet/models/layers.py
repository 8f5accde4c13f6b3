"""Building blocks of EfficientNet: conv-BN-activation, squeeze-and-excitation, MBConv, drop path.

Submodule names (`conv`, `bn`, `expand`, `depthwise`, `se`, `project`) are this project's own
state-dict layout; `weights.py` maps torchvision's, timm's and efficientnet_pytorch's onto them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from effnet.models.depthwise import DepthwiseConv2d
from effnet.models.excite import squeeze_excite
from effnet.models.spec import Activation, Padding


def make_activation(name: Activation) -> nn.Module:
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {name!r}; expected 'silu' or 'relu6'")


def tf_same_pad_amount(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Total padding TensorFlow's 'SAME' adds along one axis (output = ceil(size / stride))."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, which pads the bottom/right more than the top/left
    for even totals. Weights ported from TensorFlow lose accuracy without it, because every
    strided convolution would otherwise sample a grid shifted by one pixel."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Here rather than in forward, so that a call with other weights (ConvBNAct's folded batch
        # norm) pads the same way.
        height, width = x.shape[-2:]
        pad_h = tf_same_pad_amount(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = tf_same_pad_amount(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super()._conv_forward(x, weight, bias)  # nn.Conv2d's (or DepthwiseConv2d's), with padding 0


class DepthwiseConv2dSame(Conv2dSame, DepthwiseConv2d):
    """`Conv2dSame`'s padding, then `DepthwiseConv2d`'s convolution (its `_conv_forward`)."""


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    padding: Padding = "symmetric",
) -> nn.Conv2d:
    """A bias-free convolution (a BatchNorm always follows) with the requested padding rule.

    TF 'same' equals symmetric `kernel // 2` padding whenever the stride is 1, so only strided
    convolutions pay for the dynamic padding. Depthwise convolutions (one filter per channel) get
    the classes whose backward pass is fast on CPUs (`models.depthwise`); the state dict is the same.
    """
    depthwise = groups > 1 and groups == in_channels == out_channels
    if padding == "same" and stride > 1:
        same = DepthwiseConv2dSame if depthwise else Conv2dSame
        return same(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)
    symmetric = DepthwiseConv2d if depthwise else nn.Conv2d
    return symmetric(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class ConvBNAct(nn.Module):
    """Convolution, batch norm and an optional activation: the unit every EfficientNet layer uses."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: Activation | None = "silu",
        padding: Padding = "symmetric",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv = make_conv(in_channels, out_channels, kernel, stride, groups, padding)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = make_activation(activation) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training or not _folds(self.bn):
            return self.act(self.bn(self.conv(x)))
        return self.act(self._conv_frozen_bn(x))

    def _conv_frozen_bn(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution and its batch norm in eval mode as one convolution with a bias, the batch
        norm's scale folded into the weight on every call (so gradients reach the convolution and
        the batch norm's weight and bias as before). The same numbers within rounding as
        `self.bn(self.conv(x))`, without the batch norm's own pass over the output forward and its
        two backward: with frozen statistics in trained layers (`--bn-freeze on`) the step is
        mostly convolutions again."""
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.conv.weight * scale.reshape(-1, 1, 1, 1).to(self.conv.weight.dtype)
        out = self.conv._conv_forward(x, weight, self.bn.bias - self.bn.running_mean * scale)
        activation = getattr(self.bn, "activation", None)  # models.fused.BatchNormAct2d's own activation
        if activation == "silu":
            return F.silu(out, inplace=True)
        if activation == "relu6":
            return F.hardtanh(out, 0.0, 6.0, inplace=True)
        return out


def _folds(bn: nn.Module) -> bool:
    """Whether an eval-mode `bn` is folded into its convolution (ConvBNAct._conv_frozen_bn): only
    where autograd records the step (training with frozen statistics), and not while a graph is
    traced or compiled, so that inference, exports and compilers see the plain batch norm."""
    return (
        isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and bn.track_running_stats
        and torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): reweight channels by a gate computed from their
    global average, through a bottleneck of `squeeze_channels` (a quarter of the block's input)."""

    def __init__(self, channels: int, squeeze_channels: int, activation: Activation = "silu") -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = make_activation(activation)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze_excite(x, self.gate, list(self.parameters()))

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """The per-channel factors in (0, 1), from the channels' averages (N x C x 1 x 1)."""
        return self.expand(self.act(self.reduce(pooled))).sigmoid()


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, drop a residual branch for a whole
    sample with probability `rate`, scaling survivors by 1/(1-rate) so the expectation is kept."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) with optional squeeze-and-excitation:
    1x1 expansion, k x k depthwise, SE, 1x1 linear projection, and a residual connection with
    stochastic depth when the block keeps its shape. With `expand_ratio == 1` (MBConv1) the
    expansion is skipped, as in the paper's first stage."""

    def __init__(  # noqa: PLR0913 (the block's arguments of the paper's Table 1, then its layers' constants)
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        se_ratio: float | None,
        drop_path_rate: float,
        activation: Activation = "silu",
        padding: Padding = "symmetric",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        norm = {"padding": padding, "bn_eps": bn_eps, "bn_momentum": bn_momentum}
        hidden = in_channels * expand_ratio
        self.has_residual = stride == 1 and in_channels == out_channels
        self.expand = ConvBNAct(in_channels, hidden, 1, activation=activation, **norm) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, activation=activation, **norm)
        self.se = SqueezeExcite(hidden, max(1, int(in_channels * se_ratio)), activation) if se_ratio else None
        self.project = ConvBNAct(hidden, out_channels, 1, activation=None, **norm)
        self.drop_path = DropPath(drop_path_rate) if self.has_residual and drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.depthwise(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.has_residual:
            out = self.drop_path(out) + x
        return out


class Stage(nn.Sequential):
    """One row of the paper's Table 1: its MBConv blocks, in order.

    `full_precision = True` makes the stage compute in fp32 even inside a bf16/fp16 autocast region
    (its input is cast up; its output stays fp32). The choice is per stage because it is a matter of
    speed, not accuracy: on CPUs without AMX some of oneDNN's bf16 kernels train slower than their
    fp32 versions at low resolution, while at high resolution bf16 wins (`runtime.choose_stage_precision`
    measures it). The state dict is an `nn.Sequential`'s."""

    full_precision: bool = False

    def forward(
        self, x: torch.Tensor, run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`run_block(block, x)` replaces `block(x)`, e.g. by an activation-checkpointed call."""
        leave_autocast = self.full_precision and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if leave_autocast else contextlib.nullcontext():
            x = x.float() if leave_autocast else x
            for block in self:
                x = block(x) if run_block is None else run_block(block, x)
        return x


def recompute_without_running_stats(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """`context_fn` for `torch.utils.checkpoint`: the first forward pass runs as usual; during the
    recomputation in the backward pass every batch norm of `module` normalises with the batch's
    statistics again but leaves its running statistics alone (momentum 0, counter restored), so
    that checkpointing does not update them twice per step."""
    return contextlib.nullcontext(), _running_stats_frozen(module)


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)
