"""Train and score the fused head on cached features, in one call: what `catfeat fit` does, for Python.

:func:`fit_report` loads the caches (checking the labels), optionally tunes the head on the
training part, picks the probability clip by inner CV, scores on a shuffled stratified holdout or
by K-fold CV (writing the out-of-fold predictions), optionally ranks the fusions, refits on every
training row and writes a Kaggle submission and/or the saved head::

    report = catfeat.fit_report("lite0,lite1", "features/", cv=5, clip="auto")
    report.score.log_loss, report.clip, report.head.predict_proba(X_new)
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from catfeat.head.scoring import (
    DEFAULT_CLIP, DEFAULT_SEED, Score, TuneResult, check_scoring, choose_clip, cross_validate, holdout_score,
    holdout_split, submission_ids, take_rows, tune_head, write_submission)
from catfeat.cache.store import CacheError, find_cache, load_features, models_or_cached
from catfeat.cache.rows import STREAM_FRACTION, CacheRows, estimate_bytes, is_stream
from catfeat.images.listing import memory_bytes

Log = Callable[[str], None]


@dataclass
class FitReport:
    """What :func:`fit_report` measured and wrote.

    ``head`` is fitted on every training row (its ``classes_`` are the class names when the caches
    have them), or None with ``refit=False`` and nothing to write. ``files`` maps ``"oof"``,
    ``"submission"`` and ``"head"`` to the paths written; ``comparison`` is :func:`catfeat.compare`'s
    table with ``compare=True``. ``filled`` lists the test images written with ``fill_missing``.
    """

    models: list[str]
    n_rows: int
    classes: list
    score: Score
    clip: float
    head: Any = None
    tuning: TuneResult | None = None
    comparison: Any = None
    files: dict[str, str] = field(default_factory=dict)
    submission_rows: int = 0
    seconds: float = 0.0
    filled: list = field(default_factory=list)

    def summary(self) -> str:
        """One line: backbones, rows, the score, what was written, the time."""
        what = f"{self.score.folds}-fold CV" if self.score.folds else "validation"
        written = []
        if "submission" in self.files:
            written.append(f"submission {self.files['submission']} ({self.submission_rows} rows)")
        if "head" in self.files:
            written.append(f"head {self.files['head']}")
        return (f"{'+'.join(self.models)}, {self.n_rows} rows, {what} log loss {self.score.log_loss:.4f} "
                f"accuracy {self.score.accuracy:.4f}" + (f"; wrote {', '.join(written)}" if written else "")
                + f"; {self.seconds:.1f} s")


def fit_report(models: str | Sequence[str] | None = None, features_dir: str | os.PathLike = "features", *,
               head=None, val_split: float = 0.2, cv: int | None = None, seed: int | None = DEFAULT_SEED,
               clip: float | str = DEFAULT_CLIP, tune: bool = False, exclude: str | os.PathLike | None = None,
               stream: bool | None = None, compare: bool = False, oof: str | os.PathLike | bool | None = None,
               submission: str | os.PathLike | None = None, save: str | os.PathLike | None = None,
               positive_class: str | None = None, fill_missing: float | None = None,
               refit: bool = True, log: Log | None = None, progress: bool = False) -> FitReport:
    """Score the fused head on the caches of ``models`` (default: every complete cache) and refit it.

    ``head``: the unfitted :class:`~catfeat.FusedHead` whose hyper-parameters to use (default
    ``FusedHead(random_state=seed)``). The score is on a shuffled stratified ``val_split`` holdout,
    or by ``cv``-fold CV, whose out-of-fold predictions go to ``oof`` (default
    ``features_dir/oof_<models>.csv``; False: not written) with one ``p_<class name>`` column per
    class. ``clip="auto"`` picks the clip by CV: of the training part with a holdout (so the
    holdout stays unseen), of every row with ``cv``. ``tune`` searches ``catfeat.head.scoring.TUNE_GRID``
    first, on the training part only with a holdout. ``exclude``: a file of training image names
    to leave out. ``stream``: read the caches in blocks (default: when the features would take
    more than 1/8 of the memory). ``compare``: also rank the backbone subsets and fusions.
    ``submission`` (a CSV) and ``save`` (a folder) are written by a head refitted on every training
    row, as is ``report.head`` unless ``refit=False``. Output paths are checked before any
    training. The submission's label is the probability of ``positive_class`` (default: the class
    named dog, in any case; other class names must name it). A submission covers every test image:
    those skipped at extraction are refused before training, or written with probability
    ``fill_missing`` (with a warning on stderr). ``log`` receives the progress lines (e.g.
    ``print``); ``progress`` shows bars on stderr.
    """
    from catfeat.head.estimator import FusedHead

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    X, y, names = load_training(models, features_dir, stream=stream, exclude=exclude, log=say)
    models = list(X)
    streamed = is_stream(X)
    # fail before any training
    if cv and oof is not False:
        oof = Path(oof) if oof else Path(features_dir) / f"oof_{'+'.join(models)}.csv"
    else:
        oof = None
    for path, what, folder in ((submission, "the submission", False), (save, "the head", True),
                               (oof, "the out-of-fold predictions", False)):
        if path:
            _check_writable(path, what, folder)
    classes = class_names(models, features_dir, y)
    check_scoring(y, val_split, cv, clip, 3 if tune else None, classes, seed)
    positive = None
    if submission or positive_class is not None:
        positive = positive_index(classes, positive_class, needed=bool(submission))
    test, missing = None, {}
    if submission:
        if len(classes) != 2:
            raise ValueError(f"a Kaggle submission needs 2 classes, the caches have {len(classes)} "
                             f"({', '.join(map(str, classes))})")
        test = _load_test(models, features_dir, streamed)
        missing = missing_test_images(models, features_dir, test[1])
        if missing and fill_missing is None:
            raise ValueError(_missing_message(missing, len(test[1]) + len(missing)))
        if fill_missing is not None and not (np.isfinite(fill_missing) and 0 <= fill_missing <= 1):
            raise ValueError(f"--fill-missing (fill_missing) must be a probability in [0, 1], got {fill_missing}")
        submission_ids([*test[1], *missing])  # names without an id, or clashing ids, fail before training
    say(describe_training(X, y, classes))
    head = FusedHead(random_state=seed) if head is None else head
    head.resolved_params()  # reject bad values before any work
    tuning = None
    if tune:
        # Tuned once, then fixed. With a holdout the search sees only the training part, so the
        # validation score stays honest; with cv it sees every row and the CV score is optimistic.
        rows = np.arange(len(y)) if cv else holdout_split(y, val_split, seed)[0]
        _, tuning = tune_head(head, take_rows(X, rows), y[rows], seed=seed, refit=False, progress=progress)
        say(tuning.summary() + (" (chosen on all rows: the CV score below is optimistic)" if cv else ""))
        head.set_params(**tuning.best_params)

    files: dict[str, str] = {}
    if cv:
        score = cross_validate(head, X, y, cv, seed, 0.0 if clip == "auto" else clip, progress=progress)
        if clip == "auto":
            clip = choose_clip(score.y, score.proba)
            score = score.reclip(clip)
            say(f"clip chosen by CV: {clip:g}")
        say(score.summary())
        if oof is not None:
            write_oof(oof, names, y, score, classes)
            files["oof"] = str(oof)
            say(f"out-of-fold predictions: {oof}")
    else:
        if clip == "auto":
            # Chosen by CV on the training part only, so the holdout stays unseen.
            tr, _ = holdout_split(y, val_split, seed)
            inner = cross_validate(head, take_rows(X, tr), y[tr], 5, seed, 0.0, progress=progress)
            clip = choose_clip(inner.y, inner.proba)
            say(f"clip chosen by 5-fold CV of the training part: {clip:g}")
        score = holdout_score(head, X, y, val_split, seed, clip)
        say(score.summary())

    comparison = None
    if compare:
        from catfeat.head.comparison import compare as run_compare, format_table

        comparison = run_compare(models, features_dir, head=head, val_split=val_split, cv=cv, seed=seed, clip=clip,
                                 data=(X, y), verbose=bool(head.verbose), progress=progress)
        say(format_table(comparison))
        say(comparison.attrs["summary"])
        say("written: " + ", ".join(comparison.attrs["files"]))
        if not any(f.endswith(".png") for f in comparison.attrs["files"]):
            say("no compare.png: the bar chart needs matplotlib (pip install -e \".[plot]\")")

    final, n_sub = None, 0
    if refit or submission or save:
        # Fitted on the class names, so that a saved head predicts names (`catfeat predict`'s p_<name>).
        named = isinstance(classes[0], str)
        final = head.fit(X, np.asarray(classes)[y] if named else y)
        if test is not None:
            proba = final.predict_proba(test[0], test[1])
            # the positive class found by name (dog), not by its place in the sorted class list
            col = list(final.classes_).index(classes[positive])
            names, p = list(test[1]), proba[:, col]
            if missing:
                names += list(missing)
                p = np.concatenate([p, np.full(len(missing), float(fill_missing))])
                _warn(f"{len(missing)} test image(s) skipped at extraction written with probability "
                      f"{fill_missing:g} (--fill-missing): {_list_missing(missing)}")
            n_sub = len(write_submission(submission, names, p, clip))
            files["submission"] = os.fspath(submission)
        if save:
            from catfeat.predict import record_weights

            final.save(save, features=features_dir)  # records how the features were made, for predict
            record_weights(save, features_dir)  # weights.json, as read by heads saved before that record
            files["head"] = os.fspath(save)
    return FitReport(models, len(y), list(classes), score, float(clip), final, tuning, comparison, files, n_sub,
                     time.perf_counter() - t0, list(missing))


def load_training(models: str | Sequence[str] | None, features_dir: str | os.PathLike = "features", *,
                  stream: bool | None = None, exclude: str | os.PathLike | None = None, log: Log | None = None):
    """``(X, y, names)`` of the labeled training rows, checked: labels present, 2+ classes.

    ``models=None`` takes every complete cache in ``features_dir``. ``X`` is a dict of arrays, or a
    :class:`~catfeat.cache.rows.CacheRows` with ``stream`` (default: when the features would take
    more than ``STREAM_FRACTION`` of this machine's memory). ``exclude``: a file of image names to
    leave out (one per line, or an outliers CSV). Raises :class:`~catfeat.CacheError`.
    """
    from catfeat.outliers import read_exclude

    say = log or (lambda _msg: None)
    models = models_or_cached(models, features_dir)
    if stream is None:
        stream = estimate_bytes(models, features_dir, "train") > STREAM_FRACTION * memory_bytes()
    if stream:
        X = CacheRows.open(models, features_dir, "train")  # names, labels and row indices only
        y, names = X.labels, X.names
        say(f"streaming {X} from the caches in blocks")
    else:
        X, y, names = load_features(models, features_dir, "train")
    if len(names) == 0 or y is None:
        raise CacheError(f"the caches of {', '.join(X)} in {features_dir} hold no labeled (train) rows")
    if np.any(y < 0):
        raise CacheError(f"the caches of {', '.join(X)} have {int(np.sum(y < 0))} training rows without labels "
                         "(label -1); extract from a folder whose training images are named or sorted by class")
    if len(np.unique(y)) < 2:
        raise CacheError(f"the caches of {', '.join(X)} hold only one class ({np.unique(y).tolist()}); "
                         "a classifier needs at least two")
    if exclude:
        drop = read_exclude(exclude)
        keep = np.array([n not in drop for n in names])
        if keep.all():
            _warn_exclude_nothing(exclude, drop, names)
        if not keep.any():
            raise CacheError(f"--exclude {exclude} lists all {len(names)} training images; nothing is left to "
                             "train on: check that it is the intended file")
        left = np.unique(y[keep])
        if len(left) < 2:
            only = class_names(list(X), features_dir, y)[int(left[0])]
            raise CacheError(f"--exclude {exclude} leaves only rows of class {only} ({int(keep.sum())} of "
                             f"{len(names)}); a classifier needs at least two classes")
        say(f"excluding {int((~keep).sum())} of {len(names)} training images listed in {exclude}")
        X, y, names = take_rows(X, keep), y[keep], names[keep]
    if not stream:  # streamed blocks are checked as they are read
        from catfeat.cache.store import check_finite

        check_finite(X, names, what="training row")  # named here: the folds only know row numbers
    return X, y, names


def class_names(models: Sequence[str], features_dir: str | os.PathLike, y: np.ndarray) -> list:
    """The name of each class index of ``y``: the caches' ``classes`` attribute, else the indices."""
    n = int(np.max(y)) + 1
    try:
        names = [str(c) for c in find_cache(models[0], features_dir).classes]
    except Exception:  # an unreadable attribute is no reason to stop: fall back to the indices
        names = []
    if len(names) < n or len(set(names)) != len(names):
        return list(range(n))
    return names


def describe_training(X, y: np.ndarray, classes: Sequence) -> str:
    """``features: A (1280), B (1536); 200 training rows (cat: 100, dog: 100)``."""
    dims = X.dims if is_stream(X) else {m: np.shape(a)[1] for m, a in X.items()}
    return (f"features: {', '.join(f'{m} ({d})' for m, d in dims.items())}; {len(y)} training rows "
            f"({', '.join(f'{classes[c]}: {n}' for c, n in zip(*np.unique(y, return_counts=True)))})")


def write_oof(path: str | os.PathLike, names: Sequence[str], y: np.ndarray, score: Score,
              classes: Sequence | None = None) -> None:
    """Out-of-fold predictions as CSV: ``name``, ``label`` and one ``p_<class>`` column per class.

    ``classes`` names the class indices of ``score.classes`` (e.g. from :func:`class_names`);
    without it the columns are named by the labels themselves.
    """
    import pandas as pd

    # object, not pandas' Arrow strings: those refuse file names that are not valid UTF-8
    df = pd.DataFrame({"name": pd.Series(names, dtype=object), "label": y})
    for i, c in enumerate(score.classes):
        df[f"p_{c if classes is None else classes[int(c)]}"] = score.proba[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, errors="surrogateescape")  # undecodable file names keep their bytes


def positive_index(classes: Sequence, positive_class: str | None = None, needed: bool = True) -> int | None:
    """Index in ``classes`` of the class whose probability a Kaggle submission holds.

    ``positive_class`` names it (exact, else case-insensitive); by default it is the class named
    dog in any case. Raises ``ValueError`` naming the classes and ``--positive-class`` when there
    is no such class (None when not ``needed``) or the name is ambiguous.
    """
    names = [str(c) for c in classes]
    listed = ", ".join(repr(c) for c in names)
    if positive_class is not None:
        if str(positive_class) in names:
            return names.index(str(positive_class))
        hits = [i for i, c in enumerate(names) if c.lower() == str(positive_class).lower()]
        if len(hits) == 1:
            return hits[0]
        raise ValueError(f"--positive-class {positive_class!r} is not one of the classes of the caches ({listed})"
                         + ("; several match it in other case: give it exactly" if hits else ""))
    hits = [i for i, c in enumerate(names) if c.lower() == "dog"]
    if len(hits) == 1:
        return hits[0]
    if not needed:
        return None
    why = (f"{len(hits)} classes are called dog in different case" if hits
           else "the submission's label is P(dog) and no class is called dog")
    raise ValueError(f"the classes of the caches are {listed}: {why}; name the class whose probability to "
                     "write with --positive-class NAME (positive_class=NAME)")


def missing_test_images(models: Sequence[str], features_dir: str | os.PathLike, test_names) -> dict[str, str]:
    """``{name: reason}`` of the test images (``test/...``) the caches skipped at extraction."""
    have = set(map(str, test_names))
    out: dict[str, str] = {}
    for m in models:
        for s in find_cache(m, features_dir).skipped():
            name = str(s["path"])
            if name.startswith("test/") and name not in have:
                out.setdefault(name, str(s["reason"]))
    return dict(sorted(out.items()))


def _list_missing(missing: dict[str, str], show: int = 3) -> str:
    from catfeat.images.listing import shown

    text = "; ".join(f"{shown(n)} ({r})" for n, r in list(missing.items())[:show])
    return text + (f"; and {len(missing) - show} more" if len(missing) > show else "")


def _missing_message(missing: dict[str, str], n_test: int) -> str:
    return (f"{len(missing)} of {n_test} test images have no features (skipped at extraction), so the submission "
            f"would lack their ids: {_list_missing(missing)}. Replace them and extract again (--force), or pass "
            "--fill-missing P (fill_missing=P, e.g. 0.5) to write probability P for them")


def _warn(msg: str) -> None:
    """A warning of `catfeat fit`, through the library's logger (the CLI prints it on stderr)."""
    logging.getLogger("catfeat").warning(f"catfeat.fit: warning: {msg}")


def _warn_exclude_nothing(path, drop: set[str], names) -> None:
    """A warning: the exclude file leaves every training row in."""
    if not drop:
        msg = f"{path} names no images (empty, or a CSV without flagged rows)"
    else:
        n = len(drop)
        msg = (f"none of the {n} {'name' if n == 1 else 'names'} in {path} {'matches' if n == 1 else 'match'} a "
               f"cached training image (e.g. it lists {sorted(drop)[0]!r}, the cache has {str(names[0])!r})")
        base = {os.path.basename(str(name)) for name in names}
        if any(os.path.basename(d) in base for d in drop):
            msg += "; write the names with their folder, as the cache does"
    _warn(f"{msg}; nothing is excluded")


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


def _load_test(models: Sequence[str], features_dir, streamed: bool):
    """(test X, test names) for the submission; refuses caches without test rows, and NaN rows."""
    import warnings

    from catfeat.cache.store import check_finite

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty test split is reported below as an error
        if streamed:
            Xt = CacheRows.open(models, features_dir, "test")
            test_names = Xt.names
        else:
            Xt, _, test_names = load_features(models, features_dir, "test")
    if len(test_names) == 0:
        raise ValueError(f"the caches of {', '.join(models)} hold no test rows; extract a folder with a "
                         "test/ subfolder to write a submission")
    if not streamed:  # streamed blocks are checked as they are read
        check_finite(Xt, test_names, what="test row")  # a NaN row would get a NaN probability
    return Xt, test_names
