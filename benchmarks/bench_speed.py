"""Our EfficientNet against timm's and torchvision's: inference, training step and training memory.

Every implementation runs in this one process, alternating one call each per round after a
warm-up, at the same variant, batch, resolution, precision and memory format; we print the median
images/s, the spread (slowest-fastest run) and ours/peer ratios measured in the same run. "ours
(default)" is what `effnet predict` / `effnet train` run without options (see effnet.benchmark);
the other rows force each setting on every implementation. Each setting first gets a one-call
pilot; settings more than benchmark.SCREEN_FACTOR slower than an implementation's fastest pilot
(bf16 on a CPU without native bf16) are printed with their pilot figure and left out of the rounds.
"default vs peers' best" compares our default with the fastest peer setting measured in the run.
Peak training memory is measured in a fresh process per configuration (peak RSS above the
footprint before the model was built), the peers at their fastest training setting.

    python benchmarks/bench_speed.py --quick     # B0 224 b32, every setting, 3 rounds (~10-15 min)
    python benchmarks/bench_speed.py             # all configurations and settings (an hour or more)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from effnet import benchmark, runtime
from effnet.benchmark import Setting
from effnet.profiling import Timing

CONFIGS = [("efficientnet_b0", 224, 32), ("efficientnet_b0", 128, 64), ("efficientnet_b3", 300, 8)]
SETTINGS = list(benchmark.SETTINGS)
IMPLEMENTATIONS = ("ours", *benchmark.PEERS)
TARGETS = {"infer": 2.0, "train": 1.5, "memory": 0.6}


def mode_calls(variant: str, size: int, batch: int, mode: str, settings: list[Setting]) -> dict[str, object]:
    """The calls timed together for one configuration and mode: our default path, then each
    implementation at each setting."""
    torch.manual_seed(0)
    calls = {}
    if mode == "infer":
        calls["ours default"], engine = benchmark.ours_inference(benchmark.build("ours", variant), batch, size)
        print(f"  ours default = {engine} engine")
    else:
        ours = benchmark.build("ours", variant)
        calls["ours default"] = benchmark.ours_training(ours, batch, size)
        calls["ours checkpointed"] = benchmark.ours_checkpointed_training(benchmark.build("ours", variant), batch, size)
        print(f"  ours default = fused batch norm, {benchmark.precision_label(ours)}, channels_last")
    kept, pilots = benchmark.screen_settings(
        lambda setting: benchmark.ours_at_setting(benchmark.build("ours", variant), mode, batch, size, setting),
        settings,
        batch,
    )
    calls |= {f"ours {label}": call for label, call in kept.items()}
    peers, peer_pilots = benchmark.peer_calls(list(benchmark.PEERS), variant, mode, batch, size, settings)
    for name, speed in ({f"ours {label}": speed for label, speed in pilots.items()} | peer_pilots).items():
        print(f"  pilot {name:34} {speed:9.1f} img/s{'' if name in calls or name in peers else '  (screened out)'}")
    return calls | peers


def print_timings(timings: dict[str, Timing], settings: list[Setting], mode: str) -> dict[str, float]:
    """The table of one mode, and the headline ratios: ours at each setting against the faster peer
    at the same setting (where both were timed), and our default against the fastest peer setting
    measured in this run (the peers' best on this machine)."""
    print(f"  {'implementation / setting':34} {'images/s':>9} {'spread':>13}")
    for name, timing in timings.items():
        low, high = timing.spread
        print(f"  {name:34} {timing.images_per_second:9.1f} {f'{low:.1f}-{high:.1f}':>13}")
    speed = {name: timing.images_per_second for name, timing in timings.items()}
    ratios = {}
    for setting in settings:
        peers = [speed[f"{peer} {setting.label}"] for peer in benchmark.PEERS if f"{peer} {setting.label}" in speed]
        if peers and f"ours {setting.label}" in speed:
            ratios[setting.label] = speed[f"ours {setting.label}"] / max(peers)
    best, best_speed = benchmark.best_of(speed, benchmark.PEERS)
    ratios[f"default vs peers' best ({best})"] = speed["ours default"] / best_speed
    for label, ratio in ratios.items():
        print(f"  ratio ours/faster peer, {label:44} {ratio:5.2f}x  (target >= {TARGETS[mode]}x)")
    return ratios


def memory_ratio(variant: str, size: int, batch: int, setting: Setting) -> dict[str, float]:
    """Peak training-step memory of our default path and of each peer at `setting` (the peers'
    fastest training setting on this CPU kind)."""
    peaks = {
        "ours default": benchmark.isolated_training_peak_memory("ours", variant, batch, size, None),
        "ours checkpointed": benchmark.isolated_training_peak_memory("ours", variant, batch, size, None, True),
    }
    for peer in benchmark.PEERS:
        peaks[peer] = benchmark.isolated_training_peak_memory(peer, variant, batch, size, setting)
    for name, peak in peaks.items():
        print(f"  peak training memory {name:17} {peak / 2**20:8.0f} MiB")
    leaner_peer = min(peaks[peer] for peer in benchmark.PEERS)
    ratios = {name: peaks[name] / leaner_peer for name in ("ours default", "ours checkpointed")}
    for name, ratio in ratios.items():
        print(f"  ratio {name}/leaner peer ({setting.label}) {ratio:5.2f}x  (target <= 0.6x)")
    return {"peaks_mib": {k: v / 2**20 for k, v in peaks.items()}, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B0 224 b32 only, 3 rounds")
    parser.add_argument("--rounds", type=int, help="alternating timed rounds (default 5, quick 3)")
    parser.add_argument("--modes", default="infer,train,memory")
    parser.add_argument("--configs", help="indices into CONFIGS to run, e.g. 0,1 (default all, quick 0)")
    parser.add_argument("--settings", help="e.g. 'fp32 channels_last,bf16 channels_last' (default all four)")
    parser.add_argument("--json", help="also write all figures here")
    args = parser.parse_args()
    configs = CONFIGS[:1] if args.quick else CONFIGS
    if args.configs:
        configs = [CONFIGS[int(index)] for index in args.configs.split(",")]
    settings = SETTINGS
    if args.settings:
        settings = [setting for setting in SETTINGS if setting.label in args.settings.split(",")]
    rounds = args.rounds or (3 if args.quick else 5)
    modes = args.modes.split(",")
    runtime.keep_freed_memory()  # as every `effnet` command does; the peers in this process gain alike
    print(benchmark.machine_description())
    print(f"rounds {rounds} (alternating, after 2 warm-up calls each); images/s are medians")
    results: dict[str, dict] = {}
    peer_training_setting = Setting("fp32", True)  # replaced by the measured best once training was timed
    for variant, size, batch in configs:
        key = f"{variant} {size}px b{batch}"
        results[key] = {}
        for mode in modes:
            start = time.perf_counter()
            print(f"\n{key}: {mode}")
            if mode == "memory":
                results[key][mode] = memory_ratio(variant, size, batch, peer_training_setting)
            else:
                calls = mode_calls(variant, size, batch, mode, settings)
                timings = benchmark.time_alternating(calls, batch, rounds=rounds)
                ratios = print_timings(timings, settings, mode)
                if mode == "train":
                    best = benchmark.best_of({n: t.images_per_second for n, t in timings.items()}, benchmark.PEERS)[0]
                    peer_training_setting = next(s for s in settings if best.endswith(s.label))
                results[key][mode] = {
                    "images_per_second": {name: t.images_per_second for name, t in timings.items()},
                    "spread": {name: t.spread for name, t in timings.items()},
                    "ratios": ratios,
                }
            print(f"  ({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": benchmark.machine_description(), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
