"""`catfeat compare`: rank every subset of the cached backbones and every fusion strategy."""
from __future__ import annotations

import argparse
import time

from catfeat.cli.common import (
    add_head_flags, add_output_flags, clip_value, cv_folds, echo, finite_float, head_from_args, run_cli)
from catfeat.head.scoring import DEFAULT_CLIP, DEFAULT_SEED


def _number_clip(value: str) -> float:
    v = clip_value(value)
    if v == "auto":
        raise argparse.ArgumentTypeError("catfeat compare takes a number for --clip ('auto' is fit's)")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The parser of `catfeat compare`."""
    p = argparse.ArgumentParser(
        prog="catfeat compare",
        description="Score every subset of the cached backbones and every fusion strategy (one head on the "
                    "concatenation, a weighted average of single heads, and a LogisticRegression reference) "
                    "on the same rows, rank them by log loss, and write compare.csv, compare.md and compare.png. "
                    "The same ranking as `catfeat fit --compare`, without fitting the final head.")
    p.add_argument("--models", default=None, help="comma-separated backbone names or aliases "
                   "(default: every complete cache in --features)")
    p.add_argument("--features", default="features", help="folder of gap_<Model>.h5 caches (default: %(default)s)")
    p.add_argument("--out-dir", default=None, metavar="DIR", help="where to write compare.csv/.md/.png "
                   "(default: --features)")
    p.add_argument("--strategies", default="concat,average", help="fusions of 2+ backbones: concat, average "
                   "(default: %(default)s)")
    p.add_argument("--no-logreg", action="store_true", help="leave out the LogisticRegression reference row")
    add_head_flags(p, "hyperparameters of the heads, as in fit (default: %(default)s)")
    p.add_argument("--val-split", type=finite_float, default=0.2, help="held-out share of the training rows "
                   "(default: %(default)s)")
    p.add_argument("--cv", type=cv_folds, default=None, metavar="K", help="score by stratified K-fold CV instead "
                   "(K >= 2)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of splits and training (default: %(default)s)")
    p.add_argument("--clip", type=_number_clip, default=DEFAULT_CLIP, help="clip probabilities to [c, 1-c] for "
                   "log loss; 0 disables (default: %(default)s)")
    p.add_argument("--exclude", default=None, metavar="FILE", help="file of training image names to leave out, "
                   "one per line (e.g. outliers.csv)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the caches in blocks and score the candidates on a stratified sample (default: "
                        "when the features take more than 1/8 of this machine's memory as float32)")
    add_output_flags(p, "print each candidate as it trains, and Keras training progress")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `catfeat compare` with parsed ``args``; returns the exit code."""
    from catfeat.head.comparison import check_out_dir, compare, format_table
    from catfeat.head.report import class_names, describe_training, load_training

    t0 = time.perf_counter()
    say = echo(args)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = sorted(set(strategies) - {"concat", "average"})
    if bad:
        raise ValueError(f"unknown strategy {bad[0]!r}; --strategies takes concat and/or average")
    if args.out_dir is not None:
        check_out_dir(args.out_dir)  # before loading anything
    X, y, _ = load_training(args.models, args.features, stream=args.stream, exclude=args.exclude, log=say)
    say(describe_training(X, y, class_names(list(X), args.features, y)))
    head = head_from_args(args)
    head.resolved_params()  # reject bad values before any work
    df = compare(list(X), args.features, head=head, val_split=args.val_split, cv=args.cv, seed=args.seed,
                 clip=args.clip, strategies=strategies, linear=not args.no_logreg, out_dir=args.out_dir,
                 data=(X, y), verbose=args.verbose, progress=not args.quiet)
    say(format_table(df))
    if not any(f.endswith(".png") for f in df.attrs["files"]):
        say("no compare.png: the bar chart needs matplotlib (pip install -e \".[plot]\")")
    print(f"catfeat.compare: {len(df)} candidates; {df.attrs['summary']}; wrote {', '.join(df.attrs['files'])}; "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    """`catfeat compare ARGS`: parse ``argv`` and run; returns the exit code."""
    return run_cli(run, build_parser(), argv)
