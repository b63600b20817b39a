"""Shared pieces of the command-line modules: running a command, common flags, argparse types."""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import logging
import math
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

# What TensorFlow's C++ side writes on stderr while it is imported, whatever TF_CPP_MIN_LOG_LEVEL says
# (absl logs before its InitializeLog is called): absl's notice, INFO/WARNING records such as
# "oneDNN custom operations are on ..." and "This TensorFlow binary is optimized ..." with its
# second line. Errors (E/F records) and everything else are kept.
BACKEND_CHATTER = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*"
    rb"|[IW]\d{4} [\d:.]+ +\d+ [\w.\-]+:\d+\] .*"
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.\s*")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


@contextmanager
def filtered_stderr(drop: re.Pattern = BACKEND_CHATTER) -> Iterator[None]:
    """Within the block, drop the lines written to file descriptor 2 (by Python or by C/C++ code)
    that match ``drop``; the others are passed on to the real stderr as they come."""
    sys.stderr.flush()
    saved = os.dup(2)
    r, w = os.pipe()

    def pump() -> None:
        pending = b""
        while chunk := os.read(r, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not drop.fullmatch(line))
            if kept:
                _write_all(saved, kept)
        if pending and not drop.fullmatch(pending):
            _write_all(saved, pending)
        os.close(r)

    thread = threading.Thread(target=pump, name="catfeat-stderr-filter", daemon=True)
    thread.start()
    os.dup2(w, 2)
    os.close(w)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads EOF and ends
        # A process started inside the block could hold the write end open; do not wait on it.
        thread.join(timeout=5)
        if not thread.is_alive():
            os.close(saved)


class _QuietBackendImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do, and imports it inside :func:`filtered_stderr`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is not None:  # the loader instance is this spec's own: patch it, not its class
            def quiet_exec_module(module) -> None:
                with filtered_stderr():
                    exec_module(module)

            spec.loader.exec_module = quiet_exec_module
        return spec


@contextmanager
def quiet_backend_startup(enabled: bool = True) -> Iterator[None]:
    """Within the block, TensorFlow's start-up lines (:data:`BACKEND_CHATTER`) are dropped from stderr
    when it is first imported; the CLI's ``-v`` keeps them. Nothing is imported here."""
    if not enabled or "tensorflow" in sys.modules or any(isinstance(f, _QuietBackendImport) for f in sys.meta_path):
        yield
        return
    finder = _QuietBackendImport()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn expected failures into one clear line and a non-zero exit code.

    The backend's start-up chatter is kept off stderr unless ``-v`` (:func:`quiet_backend_startup`).
    """
    from catfeat.models.weights import WeightsError
    from catfeat.images.listing import ImageSetError
    from catfeat.cache.store import CacheError

    args = parser.parse_args(argv)
    expected = (CacheError, ImageSetError, WeightsError, ValueError, OSError, RuntimeError, FloatingPointError)
    with echo_library_messages():
        return _run(main, parser, args, expected)


def _run(main, parser, args, expected) -> int:
    try:
        with quiet_backend_startup(not getattr(args, "verbose", False)):
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


def add_head_flags(p: argparse.ArgumentParser, preset_help: str) -> None:
    """The head's hyper-parameters, as fit and compare take them: ``--preset``, ``--epochs``,
    ``--batch-size``, ``--learning-rate``, ``--dropout``, ``--weight-decay`` (read by :func:`head_from_args`)."""
    p.add_argument("--preset", default="default", choices=["default", "reference"], help=preset_help)
    p.add_argument("--epochs", type=int_in(1), default=None, help="epochs (default: from the preset)")
    p.add_argument("--batch-size", type=int_in(1), default=None, help="batch size (default: from the preset)")
    p.add_argument("--learning-rate", type=finite_float, default=None,
                   help="Adam learning rate (default: from the preset)")
    p.add_argument("--dropout", type=finite_float, default=None, help="dropout rate (default: from the preset)")
    p.add_argument("--weight-decay", type=finite_float, default=None, help="L2 penalty (default: from the preset)")


def head_from_args(args: argparse.Namespace):
    """The unfitted :class:`~catfeat.FusedHead` of the head flags, ``--seed`` and ``-v``."""
    from catfeat.head.estimator import FusedHead

    return FusedHead(preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, dropout=args.dropout, weight_decay=args.weight_decay,
                     random_state=args.seed, verbose=1 if args.verbose else 0)


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


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in ``[low, high]`` (argparse's error then names the flag)."""

    def parse(value: str) -> int:
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if v < low or (high is not None and v > high):
            bounds = f"between {low:,} and {high:,}" if high is not None else f"at least {low:,}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {v:,}")
        return v

    parse.__name__ = "int"  # argparse shows it in "invalid int value" messages
    return parse


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


def cv_folds(value: str) -> int:
    """argparse type of ``--cv``: a whole number of folds, at least 2 (0 or 1 would silently mean a holdout)."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cv takes a whole number of folds (e.g. 5), got {value!r}") from None
    if v < 2:
        raise argparse.ArgumentTypeError(f"--cv {v}: K-fold CV needs K >= 2 folds; leave --cv out to score on "
                                         "a --val-split holdout")
    return v


def probability(value: str) -> float:
    """argparse type: a probability, a finite number in [0, 1]."""
    v = finite_float(value)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value!r}")
    return v
