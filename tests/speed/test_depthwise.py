"""The depthwise convolution's fast CPU backward pass gives `F.conv2d`'s outputs and gradients."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from effnet import create_model, runtime
from effnet.models import depthwise
from effnet.models.depthwise import _windowed_weight_grad, depthwise_conv2d
from effnet.models.layers import make_conv


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"),
    [(14, 3, 1, 1), (15, 5, 1, 2), (16, 3, 2, 1), (15, 5, 2, 2), (17, 5, 2, 0), (9, 3, 2, 0), (8, 5, 1, 0)],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gradients_match_f_conv2d(size: int, kernel: int, stride: int, padding: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6, size, size + 1, dtype=torch.float64)
    weight = torch.randn(6, 1, kernel, kernel, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for conv in (depthwise_conv2d, lambda x, w, b, s, p: F.conv2d(x, w, b, s, p, 1, w.shape[0])):
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = conv(xr, wr, None, (stride, stride), (padding, padding))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out, xr.grad, wr.grad))
    for ours, reference, name in zip(results[0], results[1], ("output", "input grad", "weight grad"), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("stride", [1, 2])
def test_bf16_autocast_matches_aten_within_bf16_tolerance(stride: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 32, 28, 28).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 1, 5, 5) * 0.2
    grads = []
    for conv in (depthwise_conv2d, lambda x, w, b, s, p: F.conv2d(x, w, b, s, p, 1, w.shape[0])):
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(xr, wr, None, (stride, stride), (2, 2))
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        grads.append((out.float(), xr.grad, wr.grad))
    for ours, reference in zip(grads[0], grads[1], strict=True):
        assert ours.dtype == reference.dtype
        torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


@pytest.mark.parametrize(("kernel", "padding"), [(5, 2), (5, 0), (7, 3), (7, 1)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_wide_kernel_weight_gradient_from_3x3_windows(kernel: int, padding: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 4, 9 + 2 * padding - kernel + 1, 10 + 2 * padding - kernel + 1, dtype=torch.float64)
    weight = torch.empty(4, 1, kernel, kernel, dtype=torch.float64)
    reference = torch.ops.aten.convolution_backward(
        grad, x, weight, None, (1, 1), (padding, padding), [1, 1], False, [0, 0], 4, [False, True, False]
    )[1]
    ours = _windowed_weight_grad(grad, x, kernel, (padding, padding))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_model_uses_it_for_depthwise_layers_only_and_matches_plain_convolutions() -> None:
    assert type(make_conv(8, 8, 3, groups=8)).__name__ == "DepthwiseConv2d"
    assert type(make_conv(8, 8, 5, stride=2, groups=8, padding="same")).__name__ == "DepthwiseConv2dSame"
    assert type(make_conv(8, 16, 1)) is torch.nn.Conv2d
    torch.manual_seed(0)
    # float64: train-mode batch norm makes some gradients pure rounding noise in fp32
    ours = create_model("efficientnet_lite0", num_classes=4, drop_rate=0.0, drop_path_rate=0.0).double().train()
    plain = copy.deepcopy(ours)
    for module in plain.modules():  # back to aten's depthwise backward
        if "Depthwise" in type(module).__name__:
            module.__class__ = module.__class__.__mro__[1] if "Same" in type(module).__name__ else torch.nn.Conv2d
    assert plain.state_dict().keys() == ours.state_dict().keys()
    x, y = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 3])
    for model in (ours, plain):
        F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_bias_gradient_matches_f_conv2d() -> None:
    """A bias (a frozen batch norm folded into the convolution) keeps the fast path, with its gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 11, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    results = []
    for conv in (depthwise_conv2d, lambda x, w, b, s, p: F.conv2d(x, w, b, s, p, 1, w.shape[0])):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
        out = conv(xr, wr, br, (2, 2), (2, 2))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out, xr.grad, wr.grad, br.grad))
    for ours, reference in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.fixture
def restore_route():
    yield
    depthwise.set_wide_bf16_route("fp32")


@pytest.mark.parametrize("route", depthwise.WIDE_BF16_ROUTES)
def test_each_wide_bf16_route_gives_the_gradient_and_is_the_one_taken(route: str, monkeypatch, restore_route) -> None:
    taken = []
    windowed = depthwise._windowed_weight_grad
    monkeypatch.setattr(depthwise, "_windowed_weight_grad", lambda *args: taken.append(1) or windowed(*args))
    depthwise.set_wide_bf16_route(route)
    torch.manual_seed(0)
    x = torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 1, 5, 5) * 0.2
    grads = []
    for conv in (depthwise_conv2d, lambda x, w, b, s, p: F.conv2d(x, w, b, s, p, 1, w.shape[0])):
        wr = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x, wr, None, (1, 1), (2, 2))
        out.float().square().mean().backward()
        grads.append(wr.grad)
    assert bool(taken) == (route == "windows")
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-2 * grads[1].abs().max().item())
    with pytest.raises(ValueError, match="unknown route"):
        depthwise.set_wide_bf16_route("fastest")


def test_the_runtime_measures_the_route_once_per_machine(monkeypatch, tmp_path, restore_route) -> None:
    monkeypatch.setenv("EFFNET_CACHE", str(tmp_path))
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "1")
    timed = []
    slow_fp32 = {"windows": lambda: timed.append("windows"), "fp32": lambda: timed.append("fp32") or time.sleep(0.01)}
    monkeypatch.setattr(depthwise, "wide_bf16_route_calls", lambda: slow_fp32)
    runtime.choose_wide_bf16_route()
    assert depthwise._wide_bf16_route == "windows" and timed
    depthwise.set_wide_bf16_route("fp32")
    timed.clear()
    runtime.choose_wide_bf16_route()  # kept from the first run: not timed again
    assert depthwise._wide_bf16_route == "windows" and not timed
    monkeypatch.setenv("EFFNET_NATIVE_BF16", "0")  # no bf16 training here: nothing measured or changed
    depthwise.set_wide_bf16_route("fp32")
    runtime.choose_wide_bf16_route()
    assert depthwise._wide_bf16_route == "fp32" and not timed


def test_the_timed_routes_compute_the_same_gradient() -> None:
    calls = depthwise.wide_bf16_route_calls(batch=2)
    windows, fp32 = calls["windows"](), calls["fp32"]()
    torch.testing.assert_close(windows, fp32, rtol=2e-2, atol=2e-2 * fp32.abs().max().item())
