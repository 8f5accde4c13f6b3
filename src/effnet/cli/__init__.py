"""The `effnet` command line: a thin layer over the Python API.

Each module in this package adds one group of subcommands through `register(subparsers)`,
binding `func(args) -> int` (the exit status); this file dispatches, range-checks every numeric
option by its name (RANGES: `--batch-size` means the same in every command) and maps errors: our
error types and the known library ones become one line `effnet CMD: error: ...` (exit 1 for bad
data or files, 2 for bad usage); anything else is a bug and keeps its traceback. `--debug` (or
EFFNET_DEBUG=1) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import sys
import tarfile
import zipfile

# Modules of effnet.cli, one per group of subcommands. Add yours here.
COMMAND_MODULES = ["models", "compare", "predict", "train", "evaluate", "search", "bench", "cache"]


def workers_arg(value: str) -> int | str:
    """argparse type of every --workers option: 'auto' or a number of data-loader processes."""
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of processes >= 0, got {value!r}")
    return int(value)


def _ranges() -> dict:
    """Option name -> Interval: TrainConfig's, and those of the other commands' options."""
    from effnet.training.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, RANGES, UNIT, Interval

    return RANGES | {
        "top_k": AT_LEAST_1, "calibration": AT_LEAST_1, "num_classes": AT_LEAST_1, "rounds": AT_LEAST_1,
        "repeats": AT_LEAST_1, "warmup": AT_LEAST_0, "threads": AT_LEAST_1, "seeds": AT_LEAST_1,
        "budget_minutes": POSITIVE, "minutes_per_candidate": POSITIVE, "train_images": AT_LEAST_1,
        "val_images": AT_LEAST_1, "max_candidates": AT_LEAST_1, "phi": Interval(0), "alpha": POSITIVE,
        "beta": POSITIVE, "gamma": POSITIVE, "base_resolution": RANGES["img_size"], "width_mult": POSITIVE,
        "depth_mult": POSITIVE, "grid_step": POSITIVE, "target": POSITIVE, "tolerance": POSITIVE, "val_split": UNIT,
    }  # fmt: skip


def _ranged(parse: type, name: str, interval) -> object:
    def convert(text: str) -> int | float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {interval.describe()}, got {text!r}") from None
        if not interval.contains(value):
            raise argparse.ArgumentTypeError(f"must be {interval.describe()}, got {text}")
        return value

    convert.__name__ = name
    return convert


def _add_range_checks(parser: argparse.ArgumentParser, ranges: dict) -> None:
    """Every int/float option named in `ranges`, in this parser and its subcommands, rejects values
    outside its range at parse time: before any data is loaded or any model built."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                _add_range_checks(subparser, ranges)
        elif action.type in (int, float) and action.dest in ranges:
            action.type = _ranged(action.type, action.dest, ranges[action.dest])


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (the usage of `train` alone is 40 lines)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _known_error(error: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for the errors bad input causes, None for anything else (a bug)."""
    from PIL import Image, UnidentifiedImageError

    from effnet.training.config import ConfigError

    if isinstance(error, ConfigError):
        return str(error), 2
    if isinstance(error, ValueError | FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        return str(error), 1
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"WeightsError", "TrainingDiverged", "BadImageError", "YAMLError"}:
        return " ".join(str(error).split()) if "YAMLError" in names else str(error), 1
    if isinstance(error, Image.DecompressionBombError | UnidentifiedImageError):
        return f"{error}; remove the file or pass --on-bad-image skip", 1
    if isinstance(error, pickle.UnpicklingError | EOFError | tarfile.TarError | zipfile.BadZipFile):
        return f"a file is damaged or unsafe to load ({type(error).__name__}: {error}); EFFNET_DEBUG=1 shows which", 1
    torch_load = ("PytorchStreamReader failed", "Weights only load failed", "invalid header or archive is corrupted")
    if isinstance(error, RuntimeError) and str(error).startswith(torch_load):
        return f"a checkpoint is damaged ({str(error).splitlines()[0]}); EFFNET_DEBUG=1 shows which", 1
    # Ours, raised as RuntimeError: a missing optional package, a data set not downloadable offline.
    ours = ("pip install", "download=False", "could not be downloaded", "killed for lack of memory?")
    if (
        isinstance(error, RuntimeError)
        and isinstance(error.__cause__, ImportError | None)
        and any(text in str(error) for text in ours)
    ):
        return str(error), 1
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error}: {error.filename}", 1
    return None


def _version() -> str:
    """The installed distribution's version (what pip shows), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("effnet")
    except PackageNotFoundError:
        from effnet import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="effnet",
        description="EfficientNet models, transfer learning, evaluation, comparison and compound-scaling search.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (or EFFNET_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"effnet {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"effnet.cli.{name}").register(subparsers)
    _add_range_checks(parser, _ranges())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="effnet: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from effnet.runtime import keep_freed_memory  # torch with it: after parsing, so --help stays quick

    keep_freed_memory()  # every command allocates and frees large tensors in a loop
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        known = None if args.debug or os.environ.get("EFFNET_DEBUG") else _known_error(error)
        if known is None:
            raise
        print(f"effnet {args.command}: error: {known[0]}", file=sys.stderr)
        return known[1]
    except KeyboardInterrupt:
        print(f"effnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
