"""`python -m catfeat.fit --models xcep,incv3,irv2`: train the fused head on cached features.

Scores it on a shuffled stratified holdout (or K-fold CV), refits on every training row, and
writes a Kaggle submission and/or the saved head. ``--compare`` ranks every subset of backbones.
The work is :func:`catfeat.fit_report`; this module parses the arguments and prints.
"""
from __future__ import annotations

import argparse

from catfeat.cli.common import (
    add_head_flags, add_output_flags, clip_value, cv_folds, echo, finite_float, head_from_args, probability, run_cli)
from catfeat.head.scoring import DEFAULT_CLIP, DEFAULT_SEED
from catfeat.head.report import fit_report


def build_parser() -> argparse.ArgumentParser:
    """The parser of `catfeat fit` (prog `python -m catfeat.fit`; the dispatcher renames it)."""
    p = argparse.ArgumentParser(
        prog="python -m catfeat.fit",
        description="Train the fused head (concatenated GAP features -> Dropout -> Dense) on cached features, "
                    "score it, and write a Kaggle submission.")
    p.add_argument("--models", default=None, help="comma-separated backbone names or aliases "
                   "(default: every complete cache in --features)")
    p.add_argument("--features", default="features", help="folder of gap_<Model>.h5 caches (default: %(default)s)")
    add_head_flags(p, "default: early stopping, measured defaults; reference: the classic recipe "
                      "(Dropout 0.5, Adam, 8 epochs, batch 128) (default: %(default)s)")
    p.add_argument("--tune", action="store_true", help="pick dropout, weight decay and learning rate by a small "
                   "cross-validated search first (see catfeat.head.scoring.TUNE_GRID)")
    p.add_argument("--val-split", type=finite_float, default=0.2, help="held-out share of the training rows for the "
                   "reported score (default: %(default)s)")
    p.add_argument("--cv", type=cv_folds, default=None, metavar="K", help="score by stratified K-fold CV instead "
                   "and save out-of-fold predictions (K >= 2)")
    p.add_argument("--oof", default=None, help="where --cv writes out-of-fold predictions "
                   "(default: FEATURES/oof_<models>.csv)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of splits and training (default: %(default)s)")
    p.add_argument("--clip", type=clip_value, default=DEFAULT_CLIP, help="clip probabilities to [c, 1-c] for log loss "
                   "and the submission; 0 disables; 'auto' picks c by CV (default: %(default)s)")
    p.add_argument("--exclude", default=None, metavar="FILE", help="file of training image names to leave out, "
                   "one per line (e.g. outliers)")
    p.add_argument("--submission", default=None, metavar="CSV", help="refit on all training rows and write a "
                   "Kaggle submission (id,label) for the caches' test rows")
    p.add_argument("--positive-class", default=None, metavar="NAME", help="the class whose probability the "
                   "submission's label column holds (default: the class named dog, in any case)")
    p.add_argument("--fill-missing", type=probability, default=None, metavar="P", help="write probability P "
                   "(e.g. 0.5) for test images skipped at extraction instead of refusing the submission")
    p.add_argument("--save", default=None, metavar="DIR", help="refit on all training rows and save the head")
    p.add_argument("--compare", action="store_true", help="also rank every subset of the backbones and fusion "
                   "strategies (writes compare.csv/.md/.png into --features)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the features from the caches in blocks instead of loading them (memory flat in "
                        "the number of rows); default: stream when they take more than 1/8 of this machine's "
                        "memory as float32. --compare then scores a stratified sample")
    add_output_flags(p, "print Keras training progress")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `catfeat fit` with parsed ``args``; returns the exit code."""
    report = fit_report(args.models, args.features, head=head_from_args(args), val_split=args.val_split, cv=args.cv, seed=args.seed,
                        clip=args.clip, tune=args.tune, exclude=args.exclude, stream=args.stream,
                        compare=args.compare, oof=args.oof, submission=args.submission, save=args.save,
                        positive_class=args.positive_class, fill_missing=args.fill_missing,
                        refit=False, log=echo(args), progress=not args.quiet)
    print(f"catfeat.fit: {report.summary()}")
    return 0


def main(argv=None) -> int:
    """`python -m catfeat.fit ARGS`: parse ``argv`` and run; returns the exit code."""
    return run_cli(run, build_parser(), argv)

