"""The `effnet` command line: a thin layer over the Python API.

Each module in this package adds one group of subcommands through `register(subparsers)`,
binding `func(args) -> int` (the exit status); this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules of effnet.cli, one per group of subcommands. Add yours here.
COMMAND_MODULES = ["models", "compare", "predict", "train", "evaluate", "search", "bench", "cache"]


def workers_arg(value: str) -> int | str:
    """argparse type of every --workers option: 'auto' or a number of data-loader processes."""
    return value if value == "auto" else int(value)


def _version() -> str:
    """The installed distribution's version (what pip shows), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("effnet")
    except PackageNotFoundError:
        from effnet import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effnet",
        description="EfficientNet models, transfer learning, evaluation, comparison and compound-scaling search.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--version", action="version", version=f"effnet {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"effnet.cli.{name}").register(subparsers)
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
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Errors we raise for bad input carry their own explanation; no traceback for users.
        print(f"effnet {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"effnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
