"""`effnet bench`: images/s of our default path against timm and torchvision, in one run."""

from __future__ import annotations

import argparse
import json
import logging

from effnet import benchmark
from effnet.profiling import Timing

log = logging.getLogger("effnet")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="images/s of the default train/predict path against timm and torchvision (same run, ratios)",
    )
    p.add_argument("--model", default="efficientnet_b0", help="a model name (default efficientnet_b0)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mode", choices=benchmark.MODES, default="infer", help="inference or a training step")
    p.add_argument(
        "--against",
        default="timm,torchvision",
        help="comma-separated peers, each timed at every setting (fp32/bf16 x NCHW/channels-last) that its "
        "pilot does not rule out; ours is compared with the fastest peer setting measured ('' for none)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed calls per implementation, alternating")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    peers = [peer.strip() for peer in args.against.split(",") if peer.strip()]
    for peer in peers:
        if peer not in benchmark.PEERS:
            raise ValueError(f"unknown peer {peer!r} in --against; choose from {', '.join(benchmark.PEERS)}")
    if args.batch_size < 1 or args.img_size < 32 or args.rounds < 1 or args.warmup < 0:
        raise ValueError("--batch-size and --rounds must be >= 1, --img-size >= 32 and --warmup >= 0")
    print(benchmark.machine_description(), flush=True)
    size, batch = args.img_size, args.batch_size
    ours = benchmark.build("ours", args.model)
    if args.mode == "infer":
        call, engine = benchmark.ours_inference(ours, batch, size)
        ours_label = f"ours ({engine} engine, the `effnet predict` default)"
    else:
        call = benchmark.ours_training(ours, batch, size)
        ours_label = f"ours ({benchmark.precision_label(ours)}, the `effnet train` default)"
    log.info(
        "pilot of every peer setting (one warm-up and one timed call each), then %d alternating rounds", args.rounds
    )
    calls, pilots = benchmark.peer_calls(peers, args.model, args.mode, batch, size)
    calls = {"ours": call} | calls
    timings = benchmark.time_alternating(calls, batch, args.rounds, args.warmup)
    speeds = {name: timing.images_per_second for name, timing in timings.items()}
    print(f"{args.model} {args.mode} at {size}x{size}, batch {batch}, {args.rounds} alternating rounds")
    print(f"{'implementation':52} {'images/s':>9} {'spread':>15} {'ours/this':>10}")
    for name, timing in timings.items():
        low, high = timing.spread
        ratio, label = speeds["ours"] / timing.images_per_second, ours_label if name == "ours" else name
        print(f"{label:52} {speeds[name]:9.1f} {f'{low:.1f}-{high:.1f}':>15} {ratio:9.2f}x")
    for name, speed in pilots.items():
        if name not in calls:
            print(f"{name:52} {speed:9.1f} {'(pilot only)':>15} {speeds['ours'] / speed:9.2f}x")
    if peers:
        best, speed = benchmark.best_of(speeds, tuple(peers))
        print(f"ours against the peers' best measured setting ({best}): {speeds['ours'] / speed:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(_as_json(args, timings, pilots), handle, indent=2)
    return 0


def _as_json(args: argparse.Namespace, timings: dict[str, Timing], pilots: dict[str, float]) -> dict:
    ours = timings["ours"].images_per_second
    return {
        "model": args.model,
        "mode": args.mode,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "machine": benchmark.machine_description(),
        "results": {
            name: {
                "images_per_second": timing.images_per_second,
                "spread": list(timing.spread),
                "seconds": timing.seconds,
                "ours_ratio": ours / timing.images_per_second,
            }
            for name, timing in timings.items()
        },
        "pilots_images_per_second": pilots,
    }
