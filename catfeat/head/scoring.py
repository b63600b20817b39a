"""Scoring heads on cached features: metrics, holdout and K-fold CV, tuning (``tune_head``), submissions.

The ranking of backbone subsets and fusion strategies is :mod:`catfeat.head.comparison`.

Every helper takes the same ``X`` forms as :class:`catfeat.head.estimator.FusedHead` (dict backbone ->
array, list of arrays, one array) and any scikit-learn classifier with ``predict_proba``.
Splits are shuffled and stratified with a fixed seed, so two estimators scored with the same
seed see the same rows.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from catfeat.extraction.stages import progress_bar

DEFAULT_CLIP = 0.005
DEFAULT_SEED = 2019
# Candidate clips for clip="auto" (0 = no clipping).
CLIP_GRID = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05)
# float32 sigmoid outputs reach exactly 0 or 1; "unclipped" log loss still needs a floor.
PROBA_FLOOR = 1e-7


# -- X helpers -------------------------------------------------------------------------------------
def n_rows(X) -> int:
    """Number of rows of ``X`` (dict, list or array of features, or a streaming CacheRows)."""
    from catfeat.cache.rows import is_stream

    if is_stream(X):
        return len(X)
    if isinstance(X, Mapping):
        return len(next(iter(X.values())))
    if isinstance(X, (list, tuple)):
        return len(X[0])
    return len(X)


def take_rows(X, idx: np.ndarray):
    """Rows ``idx`` of ``X``, keeping its form (a CacheRows gives a row subset, nothing is read)."""
    from catfeat.cache.rows import is_stream

    if is_stream(X):
        return X.subset(idx)
    if isinstance(X, Mapping):
        return {k: np.asarray(v)[idx] for k, v in X.items()}
    if isinstance(X, (list, tuple)):
        return [np.asarray(v)[idx] for v in X]
    return np.asarray(X)[idx]


def concat_features(X) -> np.ndarray:
    """One (n, sum D) float32 array from any ``X`` form (for linear models)."""
    if isinstance(X, Mapping):
        X = list(X.values())
    if isinstance(X, (list, tuple)):
        return np.concatenate([np.asarray(a, np.float32) for a in X], axis=1)
    return np.asarray(X, np.float32)


# -- metrics ---------------------------------------------------------------------------------------
def clip_proba(proba: np.ndarray, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Clip probabilities to [clip, 1 - clip]; (n, K) rows with K > 2 are renormalized."""
    p = np.asarray(proba, dtype=np.float64)
    if not clip:
        return p
    if not 0 <= clip < 0.5:
        raise ValueError(f"clip must be in [0, 0.5), got {clip}")
    p = np.clip(p, clip, 1 - clip)
    if p.ndim == 2 and p.shape[1] > 2:
        p = p / p.sum(axis=1, keepdims=True)
    return p


def _proba_of_true(y_idx: np.ndarray, proba: np.ndarray) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        return np.where(y_idx == 1, p, 1 - p)
    return p[np.arange(len(y_idx)), y_idx]


def log_loss(y_idx: Sequence[int], proba: np.ndarray, clip: float = DEFAULT_CLIP) -> float:
    """Mean log loss of class indices ``y_idx`` under ``proba`` ((n,) = P(class 1), or (n, K)).

    ``clip=0`` scores the raw probabilities (floored at 1e-7, float32 resolution).
    """
    y_idx = np.asarray(y_idx, dtype=np.int64)
    p = _proba_of_true(y_idx, clip_proba(proba, clip))
    return float(-np.mean(np.log(np.clip(p, PROBA_FLOOR, 1.0))))


def accuracy(y_idx: Sequence[int], proba: np.ndarray) -> float:
    """Share of rows whose most probable class is the true one."""
    p = np.asarray(proba)
    pred = (p > 0.5).astype(np.int64) if p.ndim == 1 else np.argmax(p, axis=1)
    return float(np.mean(pred == np.asarray(y_idx)))


def choose_clip(y_idx: Sequence[int], proba: np.ndarray, grid: Iterable[float] = CLIP_GRID) -> float:
    """The clip of ``grid`` with the lowest log loss on (out-of-fold) predictions."""
    grid = list(grid)
    losses = [log_loss(y_idx, proba, c) for c in grid]
    return float(grid[int(np.argmin(losses))])


def encode_labels(y: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(classes, class index of each row)."""
    classes, idx = np.unique(np.asarray(y), return_inverse=True)
    return classes, idx


# -- splits ----------------------------------------------------------------------------------------
def holdout_split(y: Sequence, val_split: float = 0.2, seed: int | None = DEFAULT_SEED
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled, stratified (train, validation) row indices, each sorted."""
    import math

    from sklearn.model_selection import train_test_split

    if not 0 < val_split < 1:
        raise ValueError(f"--val-split (val_split) must be between 0 and 1, got {val_split}")
    y = np.asarray(y)
    values, counts = np.unique(y, return_counts=True)
    if len(counts) and counts.min() < 2:
        raise ValueError(f"a stratified --val-split holdout needs at least 2 rows of each class; class "
                         f"{values[counts.argmin()]} has {counts.min()}")
    n_val = math.ceil(val_split * len(y))
    if min(n_val, len(y) - n_val) < len(values):
        raise ValueError(f"--val-split {val_split:g} leaves {len(y) - n_val} training and {n_val} validation rows of "
                         f"{len(y)}; each part needs at least one row of each of the {len(values)} classes: pass "
                         "a share such as 0.2")
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=val_split, random_state=seed, shuffle=True, stratify=y)
    return np.sort(tr), np.sort(va)


def cv_splits(y: Sequence, cv: int = 5, seed: int | None = DEFAULT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled stratified K-fold (train, validation) indices."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    if cv < 2:
        raise ValueError(f"cv needs at least 2 folds, got {cv}")
    smallest = np.bincount(encode_labels(y)[1]).min() if len(y) else 0
    if smallest < cv:
        raise ValueError(f"cv={cv} folds need at least {cv} rows of each class; the smallest class has {smallest}")
    return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def check_scoring(y: Sequence, val_split: float = 0.2, cv: int | None = None, clip: float | str = DEFAULT_CLIP,
                  tune_folds: int | None = None, classes: Sequence | None = None, seed: int | None = DEFAULT_SEED
                  ) -> None:
    """Refuse, before any training, a scoring the training rows ``y`` cannot support.

    Checks ``cv`` (K >= 2 folds, each class at least K rows), else the ``val_split`` holdout, and
    the inner CVs of ``clip="auto"`` (5 folds of the training part) and tuning (``tune_folds``).
    Raises ``ValueError`` naming the CLI flag (``--cv``, ``--val-split``, ``--clip``, ``--tune``).
    """
    y = np.asarray(y)

    def smallest(rows: np.ndarray) -> tuple[Any, int]:
        values, counts = np.unique(rows, return_counts=True)
        v = values[counts.argmin()]
        return (classes[int(v)] if classes is not None else v), int(counts.min())

    if cv is not None:
        if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
            raise ValueError(f"--cv {cv}: K-fold CV needs K >= 2 folds; leave --cv out to score on a "
                             "--val-split holdout")
        name, count = smallest(y)
        if count < cv:
            raise ValueError(f"--cv {cv} needs at least {cv} training rows of each class, and class {name} has "
                             f"{count}; pass " + (f"--cv {count} or less" if count >= 2 else "more images of it"))
        part = y
    else:
        part = y[holdout_split(y, val_split, seed)[0]]
    for wanted, folds, flag, instead in ((clip == "auto" and cv is None, 5, "--clip auto", "pass a number such as "
                                          f"--clip {DEFAULT_CLIP}"),
                                         (bool(tune_folds), tune_folds, "--tune", "leave --tune out")):
        if wanted:
            name, count = smallest(part)
            if count < folds:
                where = "the training rows" if cv is not None else "the training part of the holdout"
                raise ValueError(f"{flag} picks its value by {folds}-fold CV of {where}, which needs at least "
                                 f"{folds} rows of each class, and class {name} has {count}; {instead}")


# -- scoring ---------------------------------------------------------------------------------------
@dataclass
class Score:
    """Log loss (clipped and raw) and accuracy of predictions on held-out rows.

    ``proba`` holds one row per held-out row ((n, K)); for CV it is the out-of-fold prediction of
    every row and the ``*_std`` fields hold the spread over folds.
    """

    log_loss: float
    log_loss_raw: float
    accuracy: float
    clip: float
    proba: np.ndarray
    index: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    folds: int = 0
    log_loss_std: float = float("nan")
    accuracy_std: float = float("nan")
    fold_log_loss: list = field(default_factory=list)
    fold_accuracy: list = field(default_factory=list)
    fit_seconds: float = 0.0
    fold_index: list = field(default_factory=list)

    def reclip(self, clip: float) -> "Score":
        """The same predictions scored with another clip."""
        from dataclasses import replace

        if not self.folds:
            return replace(self, clip=clip, log_loss=log_loss(self.y, self.proba, clip))
        fl = [log_loss(self.y[va], self.proba[va], clip) for va in self.fold_index]
        return replace(self, clip=clip, log_loss=float(np.mean(fl)), log_loss_std=float(np.std(fl)),
                       fold_log_loss=fl)

    def summary(self) -> str:
        if self.folds:
            return (f"{self.folds}-fold CV log loss {self.log_loss:.4f} +- {self.log_loss_std:.4f} "
                    f"(clip {self.clip:g}; unclipped {self.log_loss_raw:.4f}), "
                    f"accuracy {self.accuracy:.4f} +- {self.accuracy_std:.4f}")
        return (f"validation log loss {self.log_loss:.4f} (clip {self.clip:g}; unclipped {self.log_loss_raw:.4f}), "
                f"accuracy {self.accuracy:.4f} on {len(self.index)} rows")


def fit_predict(estimator, X, y, tr: np.ndarray, va: np.ndarray) -> tuple[np.ndarray, float]:
    """Fit a clone of ``estimator`` on rows ``tr``; (its probabilities for rows ``va``, fit seconds)."""
    from sklearn.base import clone

    est = clone(estimator)
    t = time.perf_counter()
    est.fit(take_rows(X, tr), np.asarray(y)[tr])
    seconds = time.perf_counter() - t
    return est.predict_proba(take_rows(X, va)), seconds


def check_rows(X, names: Sequence[str] | None = None) -> None:
    """Refuse NaN/Inf rows of ``X`` (a dict of arrays) before it is split, naming them by ``names``
    (one per row) or by their row in ``X``: a fold's fit would number them within the fold."""
    if isinstance(X, Mapping):
        from catfeat.cache.store import check_finite

        check_finite(X, names, what="training row")


def holdout_score(estimator, X, y: Sequence, val_split: float = 0.2, seed: int | None = DEFAULT_SEED,
                  clip: float = DEFAULT_CLIP, names: Sequence[str] | None = None) -> Score:
    """Fit a clone on a shuffled stratified ``1 - val_split`` of the rows, score the rest.

    NaN/Inf rows are refused first, named by ``names`` when given."""
    check_rows(X, names)
    classes, y_idx = encode_labels(y)
    tr, va = holdout_split(y_idx, val_split, seed)
    proba, seconds = fit_predict(estimator, X, y, tr, va)
    return Score(log_loss(y_idx[va], proba, clip), log_loss(y_idx[va], proba, 0), accuracy(y_idx[va], proba),
                 clip, proba, va, y_idx[va], classes, fit_seconds=seconds)


def cross_validate(estimator, X, y: Sequence, cv: int = 5, seed: int | None = DEFAULT_SEED,
                   clip: float = DEFAULT_CLIP, progress: bool = False, names: Sequence[str] | None = None) -> Score:
    """Stratified K-fold CV: mean +- std over folds and the out-of-fold predictions of every row.

    ``progress``: a progress bar over the folds on stderr. NaN/Inf rows are refused first, named
    by ``names`` when given.
    """
    check_rows(X, names)
    classes, y_idx = encode_labels(y)
    oof = np.zeros((len(y_idx), len(classes)))
    fl, fa, seconds = [], [], 0.0
    splits = cv_splits(y_idx, cv, seed)
    for tr, va in progress_bar(splits, progress, "CV folds", "fold", leave=False):
        proba, s = fit_predict(estimator, X, y, tr, va)
        oof[va] = proba
        seconds += s
        fl.append(log_loss(y_idx[va], proba, clip))
        fa.append(accuracy(y_idx[va], proba))
    return Score(float(np.mean(fl)), log_loss(y_idx, oof, 0), float(np.mean(fa)), clip, oof,
                 np.arange(len(y_idx)), y_idx, classes, folds=cv, log_loss_std=float(np.std(fl)),
                 accuracy_std=float(np.std(fa)), fold_log_loss=fl, fold_accuracy=fa, fit_seconds=seconds,
                 fold_index=[va for _, va in splits])


# -- tuning -----------------------------------------------------------------------------------------
# tune_head's default grid for FusedHead: the values that moved the log loss on real features, in a
# grid small enough (8 candidates x 3 folds on <= 4,000 rows) to stay under a minute on 2 cores.
TUNE_GRID: dict[str, list] = {"dropout": [0.0, 0.5], "weight_decay": [1e-4, 1e-3], "learning_rate": [3e-3, 1e-2]}
TUNE_MAX_ROWS = 4000


@dataclass
class TuneResult:
    """Outcome of :func:`tune`: the chosen parameters and every candidate's CV score."""

    best_params: dict
    best_log_loss: float
    table: Any  # pandas.DataFrame, lowest log loss first
    cv: int
    rows: int
    seconds: float
    kept_baseline: bool = False  # the lowest candidate was not clearly better than the baseline

    def summary(self) -> str:
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best_params.items())
        head = (f"tuned by {self.cv}-fold CV on {self.rows} rows ({len(self.table)} candidates, "
                f"{self.seconds:.0f} s): {chosen}; out-of-fold log loss {self.best_log_loss:.4f}")
        if self.kept_baseline:
            top = self.table.iloc[0]
            head += (f" (kept: the lowest candidate, {top['log_loss']:.4f}, was not better by more than "
                     "one standard error of the fold-wise difference)")
        return head


def tune(estimator, X, y: Sequence, grid: Mapping[str, Sequence], cv: int = 3, seed: int | None = DEFAULT_SEED,
         max_rows: int | None = None, baseline: Mapping[str, Any] | None = None, progress: bool = False
         ) -> TuneResult:
    """Grid search by stratified K-fold CV on the unclipped out-of-fold log loss.

    Each candidate is ``clone(estimator).set_params(**candidate)`` scored on the same folds. With
    ``max_rows``, the search runs on a stratified sample of that many rows. With ``baseline``
    (the values in force before tuning; added to the grid if missing), another candidate is
    chosen only if it beats the baseline by more than one standard error of their fold-wise
    difference: on a few thousand rows the candidates' scores differ mostly by noise, and moving
    off measured defaults on noise made held-out scores worse. ``progress``: a progress bar over
    the candidates on stderr.
    """
    import pandas as pd
    from sklearn.base import clone
    from sklearn.model_selection import ParameterGrid, train_test_split

    t0 = time.perf_counter()
    y = np.asarray(y)
    rows = np.arange(len(y))
    if max_rows and len(y) > max_rows:
        rows, _ = train_test_split(rows, train_size=max_rows, random_state=seed, stratify=y)
        rows = np.sort(rows)
        X, y = take_rows(X, rows), y[rows]
    from catfeat.cache.rows import is_stream

    if is_stream(X):
        X = X.to_arrays(f"tuning on {len(y):,} rows")  # many small fits: in memory
    candidates = list(ParameterGrid(dict(grid)))
    base = None
    if baseline is not None:
        base = {k: plain_value(baseline[k]) for k in grid}
        if base not in candidates:
            candidates.append(base)
    results, folds = [], []
    for params in progress_bar(candidates, progress, "tune", "candidate", leave=False):
        s = cross_validate(clone(estimator).set_params(**params), X, y, cv, seed, clip=0.0)
        results.append({**params, "log_loss": s.log_loss_raw, "log_loss_std": s.log_loss_std,
                        "accuracy": s.accuracy, "fit_s": round(s.fit_seconds, 2), "baseline": params == base})
        folds.append(np.asarray(s.fold_log_loss))
    order = sorted(range(len(results)), key=lambda i: results[i]["log_loss"])
    pick, kept = order[0], False
    if base is not None and results[pick]["baseline"] is False:
        b = candidates.index(base)
        diff = folds[pick] - folds[b]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if diff.mean() + se >= 0:
            pick, kept = b, True
    table = pd.DataFrame([results[i] for i in order])
    best = {k: plain_value(candidates[pick][k]) for k in grid}
    return TuneResult(best, float(results[pick]["log_loss"]), table, cv, len(y), time.perf_counter() - t0, kept)


def tune_head(head, X, y: Sequence, grid: Mapping[str, Sequence] | None = None, cv: int = 3,
              seed: int | None = None, max_rows: int | None = TUNE_MAX_ROWS, refit: bool = True,
              progress: bool = False) -> tuple[Any, TuneResult]:
    """``(tuned, tuning)``: a :class:`~catfeat.FusedHead` with the hyper-parameters of ``grid`` picked by CV.

    Searches ``grid`` (default :data:`TUNE_GRID`) with :func:`tune`, keeping ``head``'s values in
    force (explicit or from its preset) unless a candidate beats them by more than one standard
    error; ``seed`` (default: the head's ``random_state``) fixes the folds (the candidates keep the
    head's ``random_state``); ``max_rows`` caps the rows searched (a stratified sample). ``tuned``
    is a clone of ``head`` with the chosen values set, fitted on every row of ``X`` unless ``refit=False`` (as
    ``GridSearchCV.best_estimator_``); ``head`` itself is not changed. ``X`` takes every form
    ``FusedHead.fit`` takes, a streamed ``CacheRows`` included (the search loads its sample in memory).
    """
    from sklearn.base import clone

    grid = dict(TUNE_GRID if grid is None else grid)
    now = head.resolved_params()
    unknown = sorted(set(grid) - set(now))
    if unknown:
        raise ValueError(f"the grid names unknown hyper-parameters {unknown}; tunable: {sorted(now)}")
    if seed is None:
        params = head.get_params()
        seed = params["random_state"] if params.get("seed") is None else params["seed"]  # seed: deprecated alias
    tuning = tune(clone(head).set_params(verbose=0), X, y, grid, cv, seed, max_rows,
                  baseline={k: now[k] for k in grid}, progress=progress)
    tuned = clone(head).set_params(**tuning.best_params)
    return (tuned.fit(X, y) if refit else tuned), tuning


def plain_value(v):
    """A NumPy scalar as the Python value (JSON- and repr-friendly); anything else unchanged."""
    return v.item() if isinstance(v, np.generic) else v


# -- submissions -----------------------------------------------------------------------------------
_ID = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


def submission_ids(names: Sequence[str]) -> np.ndarray:
    """Integer ids of test images from their names (``test/123.jpg`` -> 123).

    int64, or Python ints (dtype object) when an id does not fit int64 (``99999999999999999999.jpg``):
    they still sort numerically and are written digit for digit.
    """
    ids, seen = [], {}
    for n in names:
        m = _ID.search(os.path.basename(str(n)))
        if not m:
            raise ValueError(f"cannot read an integer id from test image name {n!r} (expected e.g. test/123.jpg)")
        i = int(m.group(1))
        if i in seen:
            raise ValueError(f"test images {seen[i]!r} and {n!r} give the same id {i}; a submission needs one "
                             "row per id: rename or remove one of them")
        seen[i] = n
        ids.append(i)
    if ids and max(ids) > np.iinfo(np.int64).max:
        return np.asarray(ids, dtype=object)
    return np.asarray(ids, dtype=np.int64)


def write_submission(path: str | os.PathLike, names: Sequence[str], proba_dog: np.ndarray,
                     clip: float = DEFAULT_CLIP):
    """Write a Kaggle Dogs vs Cats submission (``id,label``, ids ascending, P(dog) clipped).

    ``proba_dog`` is the probability of class 1 per test image ((n,) or the (n, 2) of
    ``predict_proba``). ``clip=0`` writes raw probabilities; NaN or values outside [0, 1] are refused.
    Returns the DataFrame written.
    """
    import pandas as pd

    p = np.asarray(proba_dog, dtype=np.float64)
    if p.ndim == 2:
        if p.shape[1] != 2:
            raise ValueError(f"a Dogs vs Cats submission needs 2 classes, got probabilities of shape {p.shape}")
        p = p[:, 1]
    if len(p) != len(names):
        raise ValueError(f"{len(names)} test names but {len(p)} predictions")
    bad = np.flatnonzero(~(np.isfinite(p) & (p >= 0) & (p <= 1)))
    if len(bad):
        raise ValueError(f"refusing to write {path}: {len(bad)} of {len(p)} probabilities are not in [0, 1] "
                         f"(e.g. {p[bad[0]]} for {names[bad[0]]}); every test image needs a probability")
    df = pd.DataFrame({"id": submission_ids(names), "label": clip_proba(p, clip)}).sort_values("id", kind="stable")
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df.reset_index(drop=True)
