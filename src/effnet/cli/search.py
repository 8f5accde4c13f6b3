"""`effnet search`: find alpha, beta, gamma for your data within a time budget (see docs/search.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from effnet.cli import workers_arg
from effnet.paths import cache_dir, runs_dir
from effnet.search import Proxy, SearchSettings, search
from effnet.search.report import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="compound-scaling search: alpha, beta, gamma for your data on a small proxy, within a time budget",
        description="Train a shrunken baseline scaled by phi=1 with each candidate (alpha, beta, gamma) under "
        "alpha*beta^2*gamma^2 ~ target, plus the single-dimension study; resumable (rerun the same command).",
    )
    p.add_argument("--data", required=True, help="digits, cifar10, an image folder or a .tar.gz/.zip archive")
    p.add_argument("--budget-minutes", type=float, required=True, help="wall-clock budget for the whole search")
    p.add_argument(
        "--output",
        type=Path,
        default=runs_dir("search"),
        help="results folder; rerun to continue it (default %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        default=str(cache_dir("data")),
        help="where named data sets are downloaded / archives unpacked (default %(default)s)",
    )
    g = p.add_argument_group("proxy network")
    g.add_argument("--base", default="efficientnet_b0", help="variant to shrink (efficientnet_b0, efficientnet_lite0)")
    g.add_argument("--width-mult", type=float, default=0.5, help="proxy width multiplier (default 0.5)")
    g.add_argument("--depth-mult", type=float, default=0.5, help="proxy depth multiplier (default 0.5)")
    g.add_argument("--base-resolution", type=int, default=64, help="proxy input size (default 64)")
    g = p.add_argument_group("grid")
    g.add_argument("--grid-step", type=float, default=0.05, help="step of alpha, beta, gamma from 1 (default 0.05)")
    g.add_argument("--target", type=float, default=2.0, help="alpha*beta^2*gamma^2 target (default 2)")
    g.add_argument("--tolerance", type=float, default=0.1, help="relative tolerance around the target (default 0.1)")
    g.add_argument("--max-candidates", type=int, help="train at most this many candidates")
    g.add_argument(
        "--study-phis",
        default="1,2",
        help="phi values of the single-dimension study, comma-separated ('' to skip it; default 1,2)",
    )
    g = p.add_argument_group("short training recipe (the same for every run)")
    g.add_argument("--seeds", type=int, default=1, help="seeds per network; the score is their mean")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--minutes-per-candidate", type=float, help="default: the budget split evenly (at least 1 min)")
    g.add_argument("--train-images", type=int, help="training images per epoch (default: what fits the time share)")
    g.add_argument("--val-images", type=int, default=2000, help="held-out validation images scoring each run")
    g.add_argument("--val-split", type=float, default=0.1, help="fraction of train held out for validation")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--optimizer", default="adamw", choices=("sgd", "rmsprop", "adamw"))
    g.add_argument("--augment", default="light")
    g.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    g.add_argument("--workers", type=workers_arg, default="auto", help="data-loader workers (default auto)")
    g.add_argument("--threads", type=int, help="torch threads (default: every local core)")
    g.add_argument(
        "--launcher",
        help="run each training in a child process started by this command, e.g. 'torchrun --nproc_per_node 4' "
        "(DDP over 4 devices); default: in this process",
    )
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    settings = SearchSettings(
        data=args.data,
        budget_minutes=args.budget_minutes,
        output=args.output,
        proxy=Proxy(args.base, args.width_mult, args.depth_mult, args.base_resolution),
        grid_step=args.grid_step,
        target=args.target,
        tolerance=args.tolerance,
        seeds=args.seeds,
        epochs=args.epochs,
        minutes_per_candidate=args.minutes_per_candidate,
        max_candidates=args.max_candidates,
        train_images=args.train_images,
        val_images=args.val_images,
        study_phis=tuple(float(v) for v in args.study_phis.split(",") if v.strip()),
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        augment=args.augment,
        precision=args.precision,
        val_split=args.val_split,
        data_dir=args.data_dir,
        workers=args.workers,
        threads=args.threads,
        launcher=args.launcher,
    )
    result = search(settings)
    print(format_table(result.rows))
    if result.chosen:
        c = result.chosen
        print(
            f"\nchosen: alpha={c['alpha']:.2f} beta={c['beta']:.2f} gamma={c['gamma']:.2f} "
            f"(alpha*beta^2*gamma^2 = {c['ideal_flops_x']:.3f}, measured FLOPs x{c['measured_flops_x']:.2f} on the "
            f"proxy, {c['val_acc']:.2f}% validation accuracy) -> {result.coefficients_file}"
        )
        print(f"use it: effnet scale --phi 1 --coefficients {result.coefficients_file}")
    if not result.complete:
        print("the budget ran out before every run finished: rerun the same command to continue")
    print(f"table: {result.output / 'results.csv'}, {result.output / 'results.md'}; figures: {result.output}/*.png")
    return 0
