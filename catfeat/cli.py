"""Shared pieces of the `python -m catfeat.<command>` entry points."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn expected failures into one clear line and a non-zero exit code."""
    from .backbones import WeightsError
    from .images import ImageSetError
    from .store import CacheError

    args = parser.parse_args(argv)
    expected = (CacheError, ImageSetError, WeightsError, ValueError, OSError, RuntimeError, FloatingPointError)
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
