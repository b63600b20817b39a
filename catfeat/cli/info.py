"""`catfeat info [FEATURES]`: list the feature caches in a folder, finished or not."""
from __future__ import annotations

import argparse
from pathlib import Path

from catfeat.cache.describe import ERROR_CHARS, SHOWN_CHARS, cell, describe_caches, format_caches, format_size, raw_attrs
from catfeat.cache.store import CacheError
from catfeat.images.listing import printable
from catfeat.cli.common import add_output_flags, run_cli


def build_parser() -> argparse.ArgumentParser:
    """The parser of `catfeat info`."""
    p = argparse.ArgumentParser(prog="catfeat info",
                                description="List the feature caches in a folder: backbone, rows per split, "
                                            "classes, skipped images, weights, backend, precision, decoder, "
                                            "creation time and size; unfinished .partial files with their progress.")
    p.add_argument("dir", nargs="?", default=None, metavar="FEATURES", help="folder of gap_<Model>.h5 caches "
                   "(default: features)")
    p.add_argument("--features", default=None, help="the same folder, as the other commands name it")
    add_output_flags(p, "also print every attribute of each cache")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `catfeat info` with parsed ``args``; returns the exit code."""
    folder = args.dir or args.features or "features"
    df = describe_caches(folder)
    if not args.quiet:
        print(format_caches(df) if len(df) else f"no gap_*.h5 caches in {folder}")
        for root in dict.fromkeys(r for r in df["data_root"] if isinstance(r, str) and r):
            files = ", ".join(cell(f) for f, r in zip(df["file"], df["data_root"]) if r == root)
            print(f"data: {printable(root, SHOWN_CHARS)} ({files})")
    if args.verbose:
        for name in df["file"]:
            print(f"\n{cell(name)}:")
            for k, v in sorted(raw_attrs(Path(folder) / name).items()):
                print(f"  {cell(k)}: {printable(v, ERROR_CHARS if k == 'error' else SHOWN_CHARS)}")
    counts = df["status"].value_counts()
    parts = [f"{counts.get(s, 0)} {s}" for s in ("complete", "unfinished", "unreadable") if counts.get(s, 0)]
    print(f"catfeat.info: {folder}: {len(df)} cache file{'s' if len(df) != 1 else ''}"
          + (f" ({', '.join(parts)})" if parts else "")
          + (f", {format_size(float(df['size_bytes'].sum()))}" if len(df) else ""))
    if len(df) and not counts.get("complete", 0) and not counts.get("unfinished", 0):
        # The listing above says why each file is unusable; a script must not take this for success.
        raise CacheError(f"none of the {len(df)} cache files in {folder} can be read (reasons above); extract "
                         f"again with `catfeat extract DATA_DIR --features {folder}`")
    return 0


def main(argv=None) -> int:
    """`catfeat info ARGS`: parse ``argv`` and run; returns the exit code."""
    return run_cli(run, build_parser(), argv)

