"""`python -m catfeat.fit --models xcep,incv3,irv2`: train the fused head on cached features.

Scores it on a shuffled stratified holdout (or K-fold CV), refits on every training row, and
writes a Kaggle submission and/or the saved head. ``--compare`` ranks every subset of backbones.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .cli import add_output_flags, echo, run_cli
from .outliers import read_exclude
from .predict import record_weights
from .evaluation import (DEFAULT_CLIP, DEFAULT_SEED, choose_clip, compare, cross_validate, holdout_score,
                         take_rows, write_submission)


def _finite(value: str) -> float:
    """argparse type: a finite float (NaN and Inf would train a NaN head)."""
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return v


def _clip(value: str):
    if value == "auto":
        return "auto"
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip takes a number in [0, 0.5) or 'auto', got {value!r}") from None
    if not math.isfinite(v) or not 0 <= v < 0.5:
        raise argparse.ArgumentTypeError(f"--clip must be in [0, 0.5), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m catfeat.fit",
        description="Train the fused head (concatenated GAP features -> Dropout -> Dense) on cached features, "
                    "score it, and write a Kaggle submission.")
    p.add_argument("--models", default=None, help="comma-separated backbone names or aliases "
                   "(default: every complete cache in --features)")
    p.add_argument("--features", default="features", help="folder of gap_<Model>.h5 caches (default: %(default)s)")
    p.add_argument("--preset", default="default", choices=["default", "reference"],
                   help="default: early stopping, measured defaults; reference: the classic recipe "
                        "(Dropout 0.5, Adam, 8 epochs, batch 128) (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: from the preset)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: from the preset)")
    p.add_argument("--learning-rate", type=_finite, default=None, help="Adam learning rate (default: from the preset)")
    p.add_argument("--dropout", type=_finite, default=None, help="dropout rate (default: from the preset)")
    p.add_argument("--weight-decay", type=_finite, default=None, help="L2 penalty (default: from the preset)")
    p.add_argument("--tune", action="store_true", help="pick dropout, weight decay and learning rate by a small "
                   "cross-validated search first (see catfeat.head.TUNE_GRID)")
    p.add_argument("--val-split", type=_finite, default=0.2, help="held-out share of the training rows for the "
                   "reported score (default: %(default)s)")
    p.add_argument("--cv", type=int, default=None, metavar="K", help="score by stratified K-fold CV instead "
                   "and save out-of-fold predictions")
    p.add_argument("--oof", default=None, help="where --cv writes out-of-fold predictions "
                   "(default: FEATURES/oof_<models>.csv)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of splits and training (default: %(default)s)")
    p.add_argument("--clip", type=_clip, default=DEFAULT_CLIP, help="clip probabilities to [c, 1-c] for log loss "
                   "and the submission; 0 disables; 'auto' picks c by CV (default: %(default)s)")
    p.add_argument("--exclude", default=None, metavar="FILE", help="file of training image names to leave out, "
                   "one per line (e.g. outliers)")
    p.add_argument("--submission", default=None, metavar="CSV", help="refit on all training rows and write a "
                   "Kaggle submission (id,label) for the caches' test rows")
    p.add_argument("--save", default=None, metavar="DIR", help="refit on all training rows and save the head")
    p.add_argument("--compare", action="store_true", help="also rank every subset of the backbones and fusion "
                   "strategies (writes compare.csv/.md/.png into --features)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the features from the caches in blocks instead of loading them (memory flat in "
                        "the number of rows); default: stream when they take more than 1/8 of this machine's "
                        "memory as float32. --compare then scores a stratified sample")
    add_output_flags(p, "print Keras training progress")
    return p


def _load(args):
    from .evaluation import cached_models
    from .store import CacheError, load_features

    models = args.models
    if models is None:
        models = cached_models(args.features)
        if not models:
            raise CacheError(f"no complete feature caches in {args.features}; run `catfeat extract "
                             f"DATA_DIR --features {args.features}` first or pass --models")
    from .streaming import STREAM_FRACTION, CacheRows, estimate_bytes, memory_bytes

    need = estimate_bytes(models, args.features, "train")
    args.stream = need > STREAM_FRACTION * memory_bytes() if args.stream is None else args.stream
    if args.stream:
        X = CacheRows.open(models, args.features, "train")  # names, labels and row indices only
        y, names = X.labels, X.names
        echo(args)(f"streaming {X} from the caches in blocks")
    else:
        X, y, names = load_features(models, args.features, "train")
    if len(names) == 0 or y is None:
        raise CacheError(f"the caches of {', '.join(X)} in {args.features} hold no labeled (train) rows")
    if np.any(y < 0):
        raise CacheError(f"the caches of {', '.join(X)} have {int(np.sum(y < 0))} training rows without labels "
                         "(label -1); extract from a folder whose training images are named or sorted by class")
    if len(np.unique(y)) < 2:
        raise CacheError(f"the caches of {', '.join(X)} hold only one class ({np.unique(y).tolist()}); "
                         "a classifier needs at least two")
    if args.exclude:
        drop = read_exclude(args.exclude)
        keep = np.array([n not in drop for n in names])
        if keep.all():
            _warn_exclude_nothing(args.exclude, drop, names)
        echo(args)(f"excluding {int((~keep).sum())} of {len(names)} training images listed in {args.exclude}")
        X, y, names = take_rows(X, keep), y[keep], names[keep]
    return X, y, names


def class_names(models, features_dir, y) -> list:
    """The name of each class index of ``y``: the caches' ``classes`` attribute, else the indices."""
    from .store import find_cache

    n = int(np.max(y)) + 1
    try:
        names = [str(c) for c in find_cache(models[0], features_dir).classes]
    except Exception:  # an unreadable attribute is no reason to stop: fall back to the indices
        names = []
    if len(names) < n or len(set(names)) != len(names):
        return list(range(n))
    return names


def _warn_exclude_nothing(path, drop: set[str], names) -> None:
    """One line on stderr: the --exclude file leaves every training row in."""
    if not drop:
        msg = f"{path} names no images (empty, or a CSV without flagged rows)"
    else:
        n = len(drop)
        msg = (f"none of the {n} {'name' if n == 1 else 'names'} in {path} {'matches' if n == 1 else 'match'} a "
               f"cached training image (e.g. it lists {sorted(drop)[0]!r}, the cache has {str(names[0])!r})")
        base = {os.path.basename(str(name)) for name in names}
        if any(os.path.basename(d) in base for d in drop):
            msg += "; write the names with their folder, as the cache does"
    print(f"catfeat.fit: warning: {msg}; nothing is excluded", file=sys.stderr)


def _check_writable(path, what: str, folder: bool = False) -> None:
    """Fail before any training when ``path`` (a file, or with ``folder`` a directory) cannot be written."""
    p = Path(path)
    if p.is_dir() and not folder:
        raise ValueError(f"cannot write {what} {p}: it is a folder; name a CSV file in it")
    if p.exists() and folder and not p.is_dir():
        raise ValueError(f"cannot save {what} into {p}: it is a file, not a folder")
    existing = p if folder and p.is_dir() else p.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {what} {p}: {existing} is a file, not a folder")
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {what} {p}: {existing} is not writable ({e.strerror or e})") from None
    if p.is_file() and not os.access(p, os.W_OK):
        raise ValueError(f"cannot write {what} {p}: the file is read-only")


def _load_test(models, args):
    import warnings

    from .store import load_features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty test split is reported below as an error
        if args.stream:
            from .streaming import CacheRows

            Xt = CacheRows.open(models, args.features, "test")
            test_names = Xt.names
        else:
            Xt, _, test_names = load_features(models, args.features, "test")
    if len(test_names) == 0:
        raise ValueError(f"the caches of {', '.join(models)} hold no test rows; extract a folder with a "
                         "test/ subfolder to write a submission")
    from .head import check_finite

    if not args.stream:  # streamed blocks are checked as they are read
        check_finite(Xt, test_names, what="test row")  # a NaN row would get a NaN probability
    return Xt, test_names


def _main(args: argparse.Namespace) -> int:
    from .head import FusedHead

    t0 = time.perf_counter()
    say, bars = echo(args), not args.quiet
    X, y, names = _load(args)
    models = list(X)
    # fail before any training
    oof = (Path(args.oof) if args.oof else Path(args.features) / f"oof_{'+'.join(models)}.csv") if args.cv else None
    for path, what, folder in ((args.submission, "the submission", False), (args.save, "the head", True),
                               (oof, "the out-of-fold predictions", False)):
        if path:
            _check_writable(path, what, folder)
    test = _load_test(models, args) if args.submission else None
    dims = X.dims if args.stream else {m: X[m].shape[1] for m in models}
    classes = class_names(models, args.features, y)
    say(f"features: {', '.join(f'{m} ({dims[m]})' for m in models)}; {len(y)} training rows "
          f"({', '.join(f'{classes[c]}: {n}' for c, n in zip(*np.unique(y, return_counts=True)))})")
    head = FusedHead(preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, dropout=args.dropout, weight_decay=args.weight_decay,
                     random_state=args.seed, verbose=1 if args.verbose else 0)
    head.resolved_params()  # reject bad values before any work
    if args.tune:
        # Tuned once, then fixed. With a holdout the search sees only the training part, so the
        # validation score stays honest; with --cv it sees every row and the CV score is optimistic.
        from .evaluation import holdout_split
        from .evaluation import tune as run_tune
        from .head import TUNE_GRID, TUNE_MAX_ROWS

        rows = np.arange(len(y)) if args.cv else holdout_split(y, args.val_split, args.seed)[0]
        now = head.resolved_params()
        result = run_tune(head, take_rows(X, rows), y[rows], TUNE_GRID, 3, args.seed, TUNE_MAX_ROWS,
                          baseline={k: now[k] for k in TUNE_GRID}, progress=bars)
        say(result.summary() + (" (chosen on all rows: the CV score below is optimistic)" if args.cv else ""))
        head.set_params(**result.best_params)

    clip = args.clip
    if args.cv:
        score = cross_validate(head, X, y, args.cv, args.seed, 0.0 if clip == "auto" else clip, progress=bars)
        if clip == "auto":
            clip = choose_clip(score.y, score.proba)
            score = score.reclip(clip)
            say(f"clip chosen by CV: {clip:g}")
        say(score.summary())
        _write_oof(oof, names, y, score)
        say(f"out-of-fold predictions: {oof}")
    else:
        if clip == "auto":
            # Chosen by CV on the training part only, so the holdout stays unseen.
            from .evaluation import holdout_split

            tr, _ = holdout_split(y, args.val_split, args.seed)
            inner = cross_validate(head, take_rows(X, tr), y[tr], 5, args.seed, 0.0, progress=bars)
            clip = choose_clip(inner.y, inner.proba)
            say(f"clip chosen by 5-fold CV of the training part: {clip:g}")
        score = holdout_score(head, X, y, args.val_split, args.seed, clip)
        say(score.summary())

    if args.compare:
        df = compare(models, args.features, head=head, val_split=args.val_split, cv=args.cv, seed=args.seed,
                     clip=clip, data=(X, y), verbose=args.verbose, progress=bars)
        with _pandas_wide():
            shown = df.drop(columns=["n_backbones"]).dropna(axis=1, how="all")  # no std with a holdout
            say(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        say(df.attrs["summary"])
        say("written: " + ", ".join(df.attrs["files"]))
        if not any(f.endswith(".png") for f in df.attrs["files"]):
            say("no compare.png: the bar chart needs matplotlib (pip install -e \".[plot]\")")

    written = []
    if args.submission or args.save:
        # Fitted on the class names, so that a saved head predicts names (`catfeat predict`'s p_<name>).
        named = isinstance(classes[0], str)
        final = head.fit(X, np.asarray(classes)[y] if named else y)
        if test is not None:
            if len(final.classes_) != 2:
                raise ValueError(f"a Kaggle submission needs 2 classes, the caches have {len(final.classes_)}")
            proba = final.predict_proba(test[0], test[1])
            # P(class 1 of the caches) = P(dog), whatever the order of the names
            col = list(final.classes_).index(classes[1])
            df = write_submission(args.submission, test[1], proba[:, col], clip)
            written.append(f"submission {args.submission} ({len(df)} rows)")
        if args.save:
            final.save(args.save)
            record_weights(args.save, args.features)  # so `catfeat.predict --head` finds the same backbones
            written.append(f"head {args.save}")
    what = f"{score.folds}-fold CV" if score.folds else "validation"
    print(f"catfeat.fit: {'+'.join(models)}, {len(y)} rows, {what} log loss {score.log_loss:.4f} "
          f"accuracy {score.accuracy:.4f}" + (f"; wrote {', '.join(written)}" if written else "")
          + f"; {time.perf_counter() - t0:.1f} s")
    return 0


def _write_oof(path: Path, names, y, score) -> None:
    import pandas as pd

    # object, not pandas' Arrow strings: those refuse file names that are not valid UTF-8
    df = pd.DataFrame({"name": pd.Series(names, dtype=object), "label": y})
    for i, c in enumerate(score.classes):
        df[f"p_{c}"] = score.proba[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, errors="surrogateescape")  # undecodable file names keep their bytes


class _pandas_wide:
    def __enter__(self):
        import pandas as pd

        self._ctx = pd.option_context("display.width", 200, "display.max_columns", 30)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def main(argv=None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
