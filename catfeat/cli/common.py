"""Shared pieces of the command-line modules: running a command, common flags, argparse types."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from typing import Callable, Sequence


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn expected failures into one clear line and a non-zero exit code."""
    from catfeat.models.registry import WeightsError
    from catfeat.images.listing import ImageSetError
    from catfeat.cache.store import CacheError

    args = parser.parse_args(argv)
    expected = (CacheError, ImageSetError, WeightsError, ValueError, OSError, RuntimeError, FloatingPointError)
    with echo_library_messages():
        return _run(main, parser, args, expected)


def _run(main, parser, args, expected) -> int:
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except expected as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        if getattr(e, "hdf5_unusable", False):
            # HDF5 failed mid-write (disk full): its exit handlers would retry the write and crash,
            # so leave now; the file on disk is resumable from its last marker.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


class _Echo(logging.Handler):
    """The library's messages as plain lines: warnings on stderr, the rest on stdout (as they are then)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        print(self.format(record), file=stream, flush=True)


@contextlib.contextmanager
def echo_library_messages():
    """Print what catfeat logs (``logging.getLogger("catfeat")``, INFO and up) while a command runs."""
    logger = logging.getLogger("catfeat")
    handler, saved = _Echo(), (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def add_output_flags(p: argparse.ArgumentParser, verbose_help: str = "more detail") -> None:
    """``-q/--quiet`` (no progress bars, only the summary line and errors) and ``-v/--verbose``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars; print only the summary and errors")
    g.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def add_alias(p: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """A hidden old spelling of an option: same ``dest``, no help, kept for one release."""
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def echo(args: argparse.Namespace) -> Callable[..., None]:
    """``print`` unless ``--quiet``: for the lines before a command's summary."""
    return (lambda *a, **k: None) if getattr(args, "quiet", False) else print


def finite_float(value: str) -> float:
    """argparse type: a finite float (NaN and Inf would train a NaN head)."""
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return v


def clip_value(value: str) -> float | str:
    """argparse type of ``--clip``: a number in [0, 0.5), or ``"auto"``."""
    if value == "auto":
        return "auto"
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip takes a number in [0, 0.5) or 'auto', got {value!r}") from None
    if not math.isfinite(v) or not 0 <= v < 0.5:
        raise argparse.ArgumentTypeError(f"--clip must be in [0, 0.5), got {v}")
    return v
