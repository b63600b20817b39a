"""`catfeat COMMAND ...` (and `python -m catfeat COMMAND ...`): every command under one name.

Each command is a module of this package (`catfeat/cli/`) with ``build_parser()`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from catfeat.cli import compare, extract, fit, info, outliers, predict
from catfeat.cli.common import run_cli

# name -> (module with build_parser and run, one-line help)
COMMANDS = {
    "extract": (extract, "cache GAP features of pretrained backbones for a folder of images"),
    "fit": (fit, "train the fused head on cached features, score it, write a submission / the head"),
    "compare": (compare, "rank every subset of the backbones and every fusion strategy"),
    "outliers": (outliers, "flag training images that look like neither class to ImageNet classifiers"),
    "predict": (predict, "predict image files with a saved head and its backbones"),
    "info": (info, "list the feature caches in a folder, finished or not"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--help``, ``--version`` and the list of commands."""
    from catfeat import __version__

    width = max(map(len, COMMANDS))
    p = argparse.ArgumentParser(
        prog="catfeat", usage="catfeat [-h] [--version] COMMAND [ARGS ...]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transfer learning by bottleneck features: cache GAP features of pretrained backbones once, "
                    "train a small fused head on them in seconds.",
        epilog="commands:\n" + "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items())
               + "\n\n`catfeat COMMAND --help` describes each; every command takes -q/--quiet and -v/--verbose.")
    p.add_argument("--version", action="version", version=f"catfeat {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return p


def command(name: str) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]:
    """The parser (its prog set to ``catfeat NAME``) and the run function of one subcommand."""
    module = COMMANDS[name][0]
    parser = module.build_parser()
    parser.prog = f"catfeat {name}"
    return parser, module.run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``catfeat`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        parser, run = command(argv[0])
        return run_cli(run, parser, argv[1:])
    build_parser().parse_args(argv)  # prints --help / --version, or the error, and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
