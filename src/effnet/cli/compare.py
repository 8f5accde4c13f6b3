"""`effnet compare`: EfficientNet against torchvision's classic CNNs, on cost, speed and accuracy."""

from __future__ import annotations

import argparse
import logging

import torch

from effnet.cli import workers_arg
from effnet.comparison.measure import CompareRow, add_ratios, compare_models
from effnet.comparison.report import (
    format_finetune_table,
    format_table,
    setup_line,
    write_finetune_report,
    write_report,
)
from effnet.comparison.zoo import CLASSIC_MODELS, PRETRAINED_MODES, resolve_models
from effnet.paths import cache_dir, runs_dir

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
    p.add_argument(
        "--output",
        default=str(runs_dir("compare")),
        help="folder for compare.md, compare.csv and the plots (default %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, help="batch for throughput and peak memory (default 16); with --finetune, training's"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--threads", type=int, help=f"CPU threads (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--costs-only", action="store_true", help="parameters and MACs only: no timing or memory (fast)")
    group = p.add_argument_group("fine-tuning (--finetune)")
    group.add_argument("--finetune", metavar="DATA", help="fine-tune each model on DATA (as for `effnet train --data`)")
    group.add_argument("--budget-minutes", type=float, help="wall-clock budget per model (required with --finetune)")
    group.add_argument(
        "--pretrained",
        choices=PRETRAINED_MODES,
        default="offline",
        help="ImageNet weights: offline = where available without network (Lite0's package, torch's hub cache); "
        "download = fetch torchvision's; none = all from scratch",
    )
    group.add_argument("--img-size", type=int, help="training resolution for every model (default: each model's own)")
    group.add_argument("--epochs", type=int, default=100, help="upper bound; the budget normally stops first")
    group.add_argument(
        "--data-dir",
        default=str(cache_dir("data")),
        help="where named data sets and archives are unpacked (default %(default)s)",
    )
    group.add_argument("--workers", type=workers_arg, default="auto", help="data-loading processes")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    if (args.batch_size is not None and args.batch_size < 1) or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    names = resolve_models(args.models)
    if args.finetune:
        return finetune(args, names)
    if args.budget_minutes is not None:
        raise ValueError("--budget-minutes applies to --finetune DATA; add it or drop the budget")
    finished: list[CompareRow] = []

    def save_so_far(row: CompareRow) -> None:
        """A long run interrupted (or a model failing late) keeps the rows measured before it."""
        finished.append(row)
        add_ratios(finished)
        write_report(finished, args.output)

    rows = compare_models(
        names,
        batch_size=args.batch_size or 16,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        costs_only=args.costs_only,
        on_row=save_so_far,
    )
    print(setup_line(rows))
    print(format_table(rows))
    for path in write_report(rows, args.output):
        log.info("wrote %s", path)
    missing = [name for name in names if name not in {row.name for row in rows}]
    if missing:
        log.error("not measured (see the errors above): %s", ", ".join(missing))
    return 1 if missing else 0


def finetune(args: argparse.Namespace, names: list[str]) -> int:
    from effnet.comparison.finetune import finetune_models  # imports the training layer: only when asked

    if not args.budget_minutes or args.budget_minutes <= 0:
        raise ValueError("--finetune needs --budget-minutes M (> 0): every model gets the same wall-clock budget")
    options = {"epochs": args.epochs, "data_dir": args.data_dir, "workers": args.workers, "progress": not args.quiet}
    options |= {key: value for key in ("img_size", "batch_size") if (value := getattr(args, key)) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = finetune_models(names, args.finetune, args.output, args.budget_minutes, args.pretrained, **options)
    setup = (
        f"data {args.finetune}, {args.budget_minutes:g} min per model, fit's default recipe "
        f"({', '.join(f'{k}={v}' for k, v in options.items() if k != 'progress')}), pretrained={args.pretrained}, "
        f"{torch.get_num_threads()} threads"
    )
    print(setup)
    print(format_finetune_table(rows))
    for path in write_finetune_report(rows, args.output, setup):
        log.info("wrote %s", path)
    return 0
