"""`effnet compare`: EfficientNet against torchvision's classic CNNs, on cost, speed and accuracy."""

from __future__ import annotations

import argparse
import logging

import torch

from effnet.comparison.measure import compare_models
from effnet.comparison.report import format_table, setup_line, write_report
from effnet.comparison.zoo import CLASSIC_MODELS, resolve_models

log = logging.getLogger("effnet")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="EfficientNet vs AlexNet, VGG, ResNet, DenseNet, Inception, MobileNet: params, MACs, speed, memory",
        description=(
            "Parameters, MACs, measured latency/throughput and peak memory at each model's native resolution, "
            "with reference ImageNet top-1 and the paper's ratio-to-EfficientNet columns. Default models: "
            f"efficientnet_b0-b4, efficientnet_lite0, {', '.join(CLASSIC_MODELS)} (B5-B7 with --models all). "
            "With --finetune DATA: fine-tune each model on DATA within the same time budget."
        ),
    )
    p.add_argument("--models", help="comma-separated names (ours or any torchvision classification model), or 'all'")
    p.add_argument("--output", default="runs/compare", help="folder for compare.md, compare.csv and the plots")
    p.add_argument("--batch-size", type=int, default=16, help="batch for throughput and peak memory (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--threads", type=int, help=f"CPU threads (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--costs-only", action="store_true", help="parameters and MACs only: no timing or memory (fast)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    names = resolve_models(args.models)
    rows = compare_models(
        names,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        costs_only=args.costs_only,
    )
    print(setup_line(rows))
    print(format_table(rows))
    for path in write_report(rows, args.output):
        log.info("wrote %s", path)
    return 0
