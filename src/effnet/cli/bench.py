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
        help="comma-separated peers run at their best setting, bf16 autocast + channels-last ('' for none)",
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
    if args.batch_size < 1 or args.img_size < 32:
        raise ValueError("--batch-size must be >= 1 and --img-size >= 32")
    log.info("%s", benchmark.machine_description())
    size, batch = args.img_size, args.batch_size
    calls, ours_label = {}, "ours"
    if args.mode == "infer":
        calls["ours"], engine = benchmark.ours_inference(benchmark.build("ours", args.model), batch, size)
        ours_label = f"ours ({engine} engine, the `effnet predict` default)"
    else:
        ours = benchmark.build("ours", args.model)
        calls["ours"] = benchmark.ours_training(ours, batch, size)
        ours_label = f"ours ({benchmark.precision_label(ours)}, the `effnet train` default)"
    make = benchmark.plain_inference if args.mode == "infer" else benchmark.plain_training
    for peer in peers:
        calls[peer] = make(benchmark.build_peer(peer, args.model), batch, size, benchmark.BEST_PEER_SETTING)
    timings = benchmark.time_alternating(calls, batch, args.rounds, args.warmup)
    print(f"{args.model} {args.mode} at {size}x{size}, batch {batch}, {args.rounds} alternating rounds")
    print(f"{'implementation':52} {'images/s':>9} {'spread':>15} {'ours/this':>10}")
    for name, timing in timings.items():
        label = ours_label if name == "ours" else f"{name} ({benchmark.BEST_PEER_SETTING.label})"
        ratio = timings["ours"].images_per_second / timing.images_per_second
        low, high = timing.spread
        print(f"{label:52} {timing.images_per_second:9.1f} {f'{low:.1f}-{high:.1f}':>15} {ratio:9.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(_as_json(args, timings), handle, indent=2)
    return 0


def _as_json(args: argparse.Namespace, timings: dict[str, Timing]) -> dict:
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
    }
