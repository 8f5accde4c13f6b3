"""Per-stage precision: a stage told to compute in full precision does so inside autocast (same
outputs and gradients as fp32), and the chooser follows what it measures without side effects."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from effnet import create_model, runtime
from effnet.models.layers import Stage
from effnet.runtime import choose_stage_precision, set_stage_precision


def test_full_precision_stage_under_autocast_matches_fp32() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=5, drop_rate=0.0, drop_path_rate=0.0).train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 16, 32, 32)  # stage 2's input
    model.stages[1].full_precision = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.stages[1](x)
        after = model.stages[1:3](x)  # a fp32 stage feeding a bf16 one
    expected = reference.stages[1](x)
    assert out.dtype == torch.float32 and after.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, a), b in zip(reference.stages[1].named_parameters(), model.stages[1].parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_model_with_fp32_stages_is_closer_to_fp32_than_bf16() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
            set_stage_precision(model, [True] * 7)  # stem and head still in bf16
            mixed = model(x).float()
    assert (mixed - fp32).abs().max() < (bf16 - fp32).abs().max() / 2


def test_checkpointing_keeps_each_stages_precision() -> None:
    torch.manual_seed(0)
    plain = create_model("efficientnet_b0", num_classes=5, drop_rate=0.0, drop_path_rate=0.0).train()
    set_stage_precision(plain, [True, False, True, True, False, True, False])
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    logits = []
    for model in (plain, checkpointed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        logits.append(out.float())
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


class Sleepy(nn.Module):
    """A block that takes `delay` seconds when autocast is (or is not) on."""

    def __init__(self, slow_under_autocast: bool, delay: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.slow_under_autocast, self.delay = slow_under_autocast, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") == self.slow_under_autocast:
            time.sleep(self.delay)
        return x * self.weight


def test_chooser_follows_the_measured_speed() -> None:
    model = nn.Module()
    model.stages = nn.Sequential(Stage(Sleepy(True)), Stage(Sleepy(False)), Stage(Sleepy(True)))
    model.stages[2].requires_grad_(False)  # frozen stages are timed forward only
    assert choose_stage_precision(model, torch.ones(2, 3), torch.bfloat16) == [True, False, True]
    assert [stage.full_precision for stage in model.stages] == [False] * 3  # measured on a copy


class InputDtypes(nn.Module):
    """Records the dtype of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return x * self.weight


def test_chooser_times_each_stage_on_input_from_a_reduced_precision_neighbour() -> None:
    model = nn.Module()
    model.stages = nn.Sequential(Stage(InputDtypes()), Stage(InputDtypes()))
    runtime._time_stages(model, torch.ones(2, 3), torch.bfloat16, rounds=1, margin=0.05)
    first, second = (stage[0].seen for stage in model.stages)
    # The first stage of a suffix gets the example as it is (fp32 here); bf16 and fp32 candidates alternate
    # (warm-up and one timed round), then one call computes the next stage's input.
    assert first == [torch.float32] * 5
    # The second gets the first's output as a bf16 neighbour hands it over; its fp32 candidate casts it up.
    assert second == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]


def test_chooser_leaves_the_model_and_random_stream_untouched() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=3, drop_path_rate=0.2).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    state = torch.get_rng_state()
    choice = choose_stage_precision(model, x, torch.bfloat16, rounds=1)
    assert len(choice) == 7 and all(isinstance(full, bool) for full in choice)
    assert torch.equal(torch.get_rng_state(), state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in model.parameters())
