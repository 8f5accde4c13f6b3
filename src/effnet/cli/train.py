"""`effnet train`: fine-tune an EfficientNet; a thin layer over `effnet.training.fit`.

Every option maps to a TrainConfig field of the same name. Options default to "not given"
(argparse.SUPPRESS) so that `--resume` keeps the run's saved settings, and `--config FILE` (a run's
config.yaml, or `--print-config`'s output edited) the file's, and change only those typed: LightningCLI's
`--config` and timm's `-c`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from effnet.cli import workers_arg
from effnet.training.config import BN_FREEZE, OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig

DEFAULTS = TrainConfig()
log = logging.getLogger("effnet")
NO_DATA_HELP = """effnet train: say what to train on with --data, for example:
  effnet train --data digits --model efficientnet_lite0 --pretrained    (offline, a few minutes on a CPU)
  effnet train --data cifar10 --model efficientnet_lite0 --pretrained --max-minutes 45
  effnet train --data path/to/folder --model efficientnet_b0 --pretrained
--data takes digits (scikit-learn's 8x8 digits, bundled), cifar10, cifar100, flowers102, a folder of
images (FOLDER/train/<class>/*, optional FOLDER/val and FOLDER/test, or FOLDER/<class>/* split by
--val-split), or a .tar/.tar.gz/.zip of such a folder. `effnet train --help` lists every option."""


def minutes_list(text: str) -> list[float]:
    """'5,10,20' -> [5.0, 10.0, 20.0]."""
    try:
        return sorted(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected minutes separated by commas, e.g. 5,10,20; got {text!r}") from error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune an EfficientNet on digits, CIFAR, flowers or an image folder",
        description="Fine-tune an EfficientNet; writes a run folder (config.yaml, metrics.csv, best.pt, "
        "last.pt, state.pt, results.json, train.log, report.html).",
        argument_default=argparse.SUPPRESS,
    )
    _data_and_model_options(p.add_argument_group("what to train"))
    _length_options(p.add_argument_group("how long"))
    _finetuning_options(p.add_argument_group("fine-tuning"))
    _pipeline_options(p.add_argument_group("data pipeline"))
    _device_options(p.add_argument_group("speed and device"))
    _run_folder_options(p.add_argument_group("run folder"))
    p.set_defaults(func=cmd_train)


def _data_and_model_options(group: argparse._ArgumentGroup) -> None:
    d = DEFAULTS
    group.add_argument("--data", help="digits | cifar10 | cifar100 | flowers102 | FOLDER | ARCHIVE")
    group.add_argument(
        "--model",
        help=f"a name from `effnet models` (default {d.model}), or auto with --max-minutes: the installed offline "
        "backbone (Lite0-2) expected to do best in the budget, timed here first",
    )
    group.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        metavar="PATH|TAG",
        help="start from pretrained weights: alone, the model's registered ImageNet weights; or a weights file "
        "(torchvision, timm, efficientnet_pytorch or effnet layout); or a weight tag (torchvision, timm, offline, "
        "or timm's tag, e.g. aa_in1k) to pick one of the registered sources",
    )
    group.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random initial weights")
    group.add_argument("--data-dir", help=f"where data sets are downloaded or unpacked (default {d.data_dir})")
    group.add_argument("--val-split", type=float, help=f"validation fraction without a val folder ({d.val_split})")
    group.add_argument("--on-bad-image", choices=("fail", "skip"), help="unreadable images (default: fail, list all)")
    group.add_argument(
        "--img-size",
        type=int,
        help="input resolution (default: the model's own, 224 for B0/Lite0; 6/7 of it, 192, for --finetune auto "
        "from pretrained weights on a CPU)",
    )
    group.add_argument(
        "--drop-rate",
        type=float,
        help="dropout before the classifier (default: the model's; 0 for --finetune auto from pretrained weights "
        "on a CPU)",
    )
    group.add_argument("--drop-path-rate", type=float, help="stochastic depth rate (default: as --drop-rate)")


def _length_options(group: argparse._ArgumentGroup) -> None:
    d = DEFAULTS
    group.add_argument(
        "--epochs", type=int, help="default 3; with --max-minutes alone, as many as end the schedule at the budget"
    )
    group.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    group.add_argument(
        "--max-minutes",
        type=float,
        help="wall-clock budget: the schedule is planned to end at it (without --epochs), "
        "and the run stops cleanly (checkpoint, test) when it is reached",
    )
    group.add_argument(
        "--val-at-minutes",
        type=minutes_list,
        help="also validate at these training minutes, e.g. 5,10,20,40 (a time-to-accuracy curve)",
    )
    group.add_argument("--patience", type=int, help="early stopping after N epochs without better val accuracy")


def _finetuning_options(group: argparse._ArgumentGroup) -> None:
    d = DEFAULTS
    group.add_argument(
        "--finetune",
        help="auto | head | last:N | full | gradual (default auto: from pretrained weights on a CPU, last:4 on "
        "cached features at 6/7 of the model's resolution without dropout; else full)",
    )
    group.add_argument("--gradual-head-epochs", type=int, help=f"gradual: head-only epochs ({d.gradual_head_epochs})")
    group.add_argument("--layer-decay", type=float, help="LR factor per stage towards the input, e.g. 0.7")
    group.add_argument("--bn-freeze", choices=BN_FREEZE, help="BN statistics: auto = frozen in frozen layers")
    group.add_argument(
        "--cache-frozen",
        action=argparse.BooleanOptionalAction,
        help="with --finetune last:N, compute the frozen stages once per stored view and train the rest on them "
        "(default: on when --finetune auto picks last:N)",
    )
    group.add_argument(
        "--cache-views",
        type=int,
        help=f"--cache-frozen: views per image (default {d.cache_views}, fewer if memory is short)",
    )
    group.add_argument(
        "--cache-shift",
        type=int,
        help="--cache-frozen: shift the served features by up to N cells (N x the frozen prefix's stride in "
        "pixels) per axis, a fresh draw each epoch (default 1/12 of the feature map's side: 2 of 24; 0: off)",
    )
    group.add_argument("--bn-momentum", type=float, help=f"BN statistics momentum (default {d.bn_momentum})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    group.add_argument("--lr", type=float, help="base learning rate (default: per optimizer, scaled by batch/64)")
    group.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay} (never on BN and bias)")
    group.add_argument("--momentum", type=float, help=f"sgd/rmsprop momentum (default {d.momentum})")
    group.add_argument("--schedule", choices=SCHEDULES, help=f"default {d.schedule}, per step, after warmup")
    group.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 5%% of all steps)")
    group.add_argument("--min-lr", type=float, help=f"floor of the schedule (default {d.min_lr})")
    group.add_argument("--plateau-factor", type=float, help=f"plateau: LR factor (default {d.plateau_factor})")
    group.add_argument("--plateau-patience", type=int, help=f"plateau: epochs (default {d.plateau_patience})")
    group.add_argument("--step-epochs", type=int, help=f"step: decay every N epochs (default {d.step_epochs})")
    group.add_argument("--step-gamma", type=float, help=f"step: LR factor (default {d.step_gamma})")
    group.add_argument("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    group.add_argument("--ema", action="store_true", help="keep an EMA of the weights and evaluate with it")
    group.add_argument("--ema-decay", type=float, help=f"default {d.ema_decay}")
    group.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    group.add_argument("--accum-steps", type=int, help="accumulate gradients over N batches per step")


def _pipeline_options(group: argparse._ArgumentGroup) -> None:
    d = DEFAULTS
    group.add_argument(
        "--augment",
        choices=("none", "light", "randaugment", "autoaugment", "trivialaugment"),
        help=f"default {d.augment}",
    )
    group.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="random horizontal flips (default: on, except for data whose mirror images differ, e.g. digits)",
    )
    group.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="also report test accuracy with logits averaged over each image and its mirror image (default: "
        "as --flip); results.json keeps both",
    )
    group.add_argument(
        "--mixup", type=float, help="MixUp alpha (0 = off); with --cache-frozen it mixes the cached features"
    )
    group.add_argument("--cutmix", type=float, help="CutMix alpha (0 = off); --cache-frozen: as --mixup")
    group.add_argument("--workers", type=workers_arg, help="data loader processes (default auto)")


def _device_options(group: argparse._ArgumentGroup) -> None:
    d = DEFAULTS
    group.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    group.add_argument("--precision", choices=PRECISIONS, help=f"autocast dtype (default {d.precision})")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="memory format (default on)")
    group.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="save memory: store only each block's input and recompute the rest in backward, and return freed "
        "memory to the system at once (about a third of the peak, ~20%% slower steps)",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms only")


def _run_folder_options(group: argparse._ArgumentGroup) -> None:
    d = DEFAULTS
    group.add_argument(
        "--config",
        metavar="FILE",
        help="start from the settings in this YAML file (a run's config.yaml, or --print-config's output); the "
        "options typed override it",
    )
    group.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings this command would train with as YAML (for --config) and exit",
    )
    group.add_argument(
        "--output",
        help="the run folder (default: $EFFNET_RUNS/<model>-<data>-<timestamp>, EFFNET_RUNS defaulting to "
        "~/.local/share/effnet/runs)",
    )
    group.add_argument("--resume", help="continue the run in this folder exactly where it stopped")
    group.add_argument(
        "--overwrite", action="store_true", help="replace the run in --output (its files are deleted first)"
    )
    group.add_argument("--seed", type=int, help=f"default {d.seed}")
    group.add_argument("--checkpoint-every", type=int, help="also save the resume state every N steps")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (for log files)")
    group.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in RUN/tensorboard")
    group.add_argument("--report", action=argparse.BooleanOptionalAction, help="write report.html (default on)")


def cmd_train(args: argparse.Namespace) -> int:
    from effnet.training import fit  # imported here so `effnet --help` stays fast

    # `quiet` is effnet's global -q (the log level); progress bars are train's own --no-progress.
    skipped = ("func", "command", "resume", "quiet", "debug", "config", "print_config", "overwrite")
    options = {k: v for k, v in vars(args).items() if k not in skipped}
    resume = getattr(args, "resume", None)
    base = _file_config(getattr(args, "config", None), resume)
    if getattr(args, "print_config", False):
        return _print_config(base, resume, options)
    if not options.get("data") and not resume and not (base and base.data):
        print(NO_DATA_HELP)
        return 2
    model, data = options.pop("model", None), options.pop("data", None)
    result = fit(model, data, base, resume=resume, overwrite=getattr(args, "overwrite", False), **options)
    if result.results["test_acc"] is not None and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 only
        tta = result.results["test_acc_tta"]
        with_tta = f", {tta:.2%} with flip TTA" if tta is not None else ""
        print(f"test accuracy: {result.results['test_acc']:.2%}{with_tta}  (run folder: {result.run_dir})")
    return 0


def _file_config(path: str | None, resume: str | None) -> TrainConfig | None:
    """The settings of `--config FILE`, or None. A run's config.yaml names that run's folder as its
    output: a new run started from it gets a folder of its own instead of being refused."""
    if path is None:
        return None
    if resume:
        raise ValueError("--config and --resume: a resumed run keeps its own config.yaml; change settings with flags")
    if not Path(path).is_file():
        raise ValueError(f"--config {path}: no such file (write one with: effnet train --print-config > {path})")
    config = TrainConfig.load(path)
    if config.output and (Path(config.output) / "state.pt").exists():
        log.info("%s names the run folder %s, which holds that run: this run gets its own folder", path, config.output)
        config = config.replace(output=None)
    return config


def _print_config(base: TrainConfig | None, resume: str | None, options: dict) -> int:
    """What `fit` would start from, as the YAML `--config` reads (validated, so bad values fail here)."""
    import yaml

    if resume:
        base = TrainConfig.load(Path(resume) / "config.yaml")
    config = (base or TrainConfig()).replace(**options)
    sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return 0
