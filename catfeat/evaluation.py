"""Scoring heads on cached features: holdout and K-fold CV, log loss, submissions, fusion comparisons.

Every helper takes the same ``X`` forms as :class:`catfeat.head.FusedHead` (dict backbone ->
array, list of arrays, one array) and any scikit-learn classifier with ``predict_proba``.
Splits are shuffled and stratified with a fixed seed, so two estimators scored with the same
seed see the same rows.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_CLIP = 0.005
DEFAULT_SEED = 2019
# Candidate clips for clip="auto" (0 = no clipping).
CLIP_GRID = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05)
# float32 sigmoid outputs reach exactly 0 or 1; "unclipped" log loss still needs a floor.
_EPS = 1e-7


# -- X helpers -------------------------------------------------------------------------------------
def n_rows(X) -> int:
    """Number of rows of ``X`` (dict, list or array of features, or a streaming CacheRows)."""
    from .streaming import is_stream

    if is_stream(X):
        return len(X)
    if isinstance(X, Mapping):
        return len(next(iter(X.values())))
    if isinstance(X, (list, tuple)):
        return len(X[0])
    return len(X)


def take_rows(X, idx: np.ndarray):
    """Rows ``idx`` of ``X``, keeping its form (a CacheRows gives a row subset, nothing is read)."""
    from .streaming import is_stream

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
    return float(-np.mean(np.log(np.clip(p, _EPS, 1.0))))


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
    from sklearn.model_selection import train_test_split

    if not 0 < val_split < 1:
        raise ValueError(f"val_split must be in (0, 1), got {val_split}")
    y = np.asarray(y)
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=val_split, random_state=seed, shuffle=True, stratify=y)
    return np.sort(tr), np.sort(va)


def cv_splits(y: Sequence, cv: int = 5, seed: int | None = DEFAULT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled stratified K-fold (train, validation) indices."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    if cv < 2:
        raise ValueError(f"cv needs at least 2 folds, got {cv}")
    smallest = np.bincount(encode_labels(y)[1]).min()
    if smallest < cv:
        raise ValueError(f"cv={cv} folds need at least {cv} rows of each class; the smallest class has {smallest}")
    return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


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


def _fit_predict(estimator, X, y, tr, va) -> tuple[np.ndarray, float]:
    from sklearn.base import clone

    est = clone(estimator)
    t = time.perf_counter()
    est.fit(take_rows(X, tr), np.asarray(y)[tr])
    seconds = time.perf_counter() - t
    return est.predict_proba(take_rows(X, va)), seconds


def holdout_score(estimator, X, y: Sequence, val_split: float = 0.2, seed: int | None = DEFAULT_SEED,
                  clip: float = DEFAULT_CLIP) -> Score:
    """Fit a clone on a shuffled stratified ``1 - val_split`` of the rows, score the rest."""
    classes, y_idx = encode_labels(y)
    tr, va = holdout_split(y_idx, val_split, seed)
    proba, seconds = _fit_predict(estimator, X, y, tr, va)
    return Score(log_loss(y_idx[va], proba, clip), log_loss(y_idx[va], proba, 0), accuracy(y_idx[va], proba),
                 clip, proba, va, y_idx[va], classes, fit_seconds=seconds)


def cross_validate(estimator, X, y: Sequence, cv: int = 5, seed: int | None = DEFAULT_SEED,
                   clip: float = DEFAULT_CLIP, progress: bool = False) -> Score:
    """Stratified K-fold CV: mean +- std over folds and the out-of-fold predictions of every row.

    ``progress``: a progress bar over the folds on stderr.
    """
    classes, y_idx = encode_labels(y)
    oof = np.zeros((len(y_idx), len(classes)))
    fl, fa, seconds = [], [], 0.0
    splits = cv_splits(y_idx, cv, seed)
    for tr, va in _bar(splits, progress, "CV folds", "fold"):
        proba, s = _fit_predict(estimator, X, y, tr, va)
        oof[va] = proba
        seconds += s
        fl.append(log_loss(y_idx[va], proba, clip))
        fa.append(accuracy(y_idx[va], proba))
    return Score(float(np.mean(fl)), log_loss(y_idx, oof, 0), float(np.mean(fa)), clip, oof,
                 np.arange(len(y_idx)), y_idx, classes, folds=cv, log_loss_std=float(np.std(fl)),
                 accuracy_std=float(np.std(fa)), fold_log_loss=fl, fold_accuracy=fa, fit_seconds=seconds,
                 fold_index=[va for _, va in splits])


# -- tuning -----------------------------------------------------------------------------------------
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
    from .streaming import is_stream

    if is_stream(X):
        X = X.to_arrays(f"tuning on {len(y):,} rows")  # many small fits: in memory
    candidates = list(ParameterGrid(dict(grid)))
    base = None
    if baseline is not None:
        base = {k: _plain(baseline[k]) for k in grid}
        if base not in candidates:
            candidates.append(base)
    results, folds = [], []
    for params in _bar(candidates, progress, "tune", "candidate"):
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
    best = {k: _plain(candidates[pick][k]) for k in grid}
    return TuneResult(best, float(results[pick]["log_loss"]), table, cv, len(y), time.perf_counter() - t0, kept)


def _bar(items, progress: bool, desc: str, unit: str, total: int | None = None):
    """A tqdm progress bar on stderr, disabled unless ``progress``."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, disable=not progress, leave=False, file=sys.stderr)


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


# -- submissions -----------------------------------------------------------------------------------
_ID = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


def submission_ids(names: Sequence[str]) -> np.ndarray:
    """Integer ids of test images from their names (``test/123.jpg`` -> 123)."""
    ids = []
    for n in names:
        m = _ID.search(os.path.basename(str(n)))
        if not m:
            raise ValueError(f"cannot read an integer id from test image name {n!r} (expected e.g. test/123.jpg)")
        ids.append(int(m.group(1)))
    ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("test image names give duplicate ids")
    return ids


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


# -- fusion comparison -----------------------------------------------------------------------------
def cached_models(features_dir: str | os.PathLike = "features") -> list[str]:
    """Registry names of the backbones with a complete cache in ``features_dir``."""
    from .backbones import REGISTRY
    from .store import CacheError, cache_path, open_cache

    out = []
    for name in REGISTRY:
        path = cache_path(features_dir, name)
        if path.exists():
            try:
                open_cache(path)
            except CacheError:
                continue
            out.append(name)
    return out


def fit_average_weights(y_idx: np.ndarray, probas: Sequence[np.ndarray]) -> np.ndarray:
    """Non-negative weights summing to 1 that minimize the log loss of ``sum w_b * proba_b``."""
    from scipy.optimize import minimize

    P = np.stack([np.asarray(p, np.float64) for p in probas])  # (B, n, K)
    if len(P) == 1:
        return np.ones(1)
    rows = np.arange(P.shape[1])
    pt = P[:, rows, y_idx]  # (B, n): probability each head gives the true class

    def loss(z):
        w = np.exp(z - z.max())
        w /= w.sum()
        mix = np.clip(w @ pt, _EPS, 1.0)
        # gradient through the softmax parametrization
        g_w = -(pt / mix).mean(axis=1)
        return -np.mean(np.log(mix)), w * (g_w - w @ g_w)

    res = minimize(loss, np.zeros(len(P)), jac=True, method="L-BFGS-B")
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


def _markdown(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else ("" if v is None or (
                isinstance(v, float) and math.isnan(v)) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(df, path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure  # not pyplot: the caller's backend (e.g. inline) stays as it is
    except ImportError:
        return None
    labels = [f"{m} ({s})" for m, s in zip(df["models"], df["strategy"])]
    fig = Figure(figsize=(8, 0.35 * len(df) + 1.2))
    ax = fig.subplots()
    colors = ["tab:green" if i == 0 else "tab:blue" for i in range(len(df))]
    ax.barh(labels[::-1], df["log_loss"].to_numpy()[::-1], color=colors[::-1],
            xerr=df["log_loss_std"].to_numpy()[::-1] if df["log_loss_std"].notna().any() else None)
    ax.set_xlabel("log loss (lower is better)")
    ax.set_title("catfeat: fusion comparison")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def compare(models: str | Sequence[str] | None = None, features_dir: str | os.PathLike = "features", *,
            head=None, val_split: float = 0.2, cv: int | None = None, seed: int | None = DEFAULT_SEED,
            clip: float = DEFAULT_CLIP, strategies: Sequence[str] = ("concat", "average"),
            linear: bool = True, inner_cv: int = 5, out_dir: str | os.PathLike | None = None,
            data: tuple | None = None, verbose: bool = False, progress: bool = False):
    """Score every non-empty subset of backbones the same way and rank them by log loss.

    Strategies per subset of 2+ backbones: ``"concat"`` (one head on the concatenated features)
    and ``"average"`` (single-backbone heads averaged with weights fitted on out-of-fold
    predictions of the training rows only). A ``LogisticRegression`` (C=1) on the concatenation of
    all backbones is added as a reference row when ``linear``. Rows are scored on a shuffled
    stratified ``val_split`` holdout, or by ``cv``-fold CV when given, with the same rows and seed
    for every row of the table. Every head is built and scored as with scikit-learn: on the
    backbones' stacked matrix with ``backbone_widths`` (:func:`catfeat.head.stack_backbones`), by
    ``sklearn.model_selection.cross_validate`` on those rows. Writes ``compare.csv``, ``compare.md`` and ``compare.png``
    (when matplotlib is installed) to ``out_dir`` (default: ``features_dir``). The returned
    DataFrame is sorted by log loss; ``df.attrs["summary"]`` says which fusion wins and by how much.
    ``progress``: a progress bar over the candidate heads on stderr.
    """
    import pandas as pd

    from sklearn.base import clone
    from sklearn.model_selection import cross_validate as sk_cross_validate

    from .head import FusedHead, stack_backbones

    if data is not None:
        X, y = data
    else:
        from .store import load_features

        if models is None:
            models = cached_models(features_dir)
            if not models:
                raise ValueError(f"no complete feature caches in {features_dir}")
        X, y, _ = load_features(models, features_dir, "train")
    from .streaming import is_stream, sample_for_compare

    sampled = ""
    if is_stream(X):  # from the caches: the many candidate heads run on a sample held in memory
        X, y, sampled = sample_for_compare(X, y, seed)
        if sampled:
            print(f"compare: {sampled} (streamed caches)", flush=True)
    if not isinstance(X, Mapping):
        raise ValueError("compare needs features per backbone (a dict name -> array)")
    names = list(X)
    head = FusedHead(random_state=seed) if head is None else head
    classes, y_idx = encode_labels(y)
    y = np.asarray(y)
    folds = cv_splits(y_idx, cv, seed) if cv else [holdout_split(y_idx, val_split, seed)]
    n, K = len(y_idx), len(classes)
    if linear:  # checked before any work: the concatenation is one more copy of every feature
        from .streaming import check_memory

        d = sum(np.shape(a)[1] for a in X.values())
        check_memory(3 * n * d * 4, f"compare's LogisticRegression on the concatenated {n:,} x {d} features",
                     "pass linear=False, or stream: python -m catfeat.fit --stream --compare scores a "
                     "stratified sample")

    subsets = [c for r in range(2, len(names) + 1) for c in itertools.combinations(names, r)]
    inner = len(names) if subsets and "average" in strategies and not cv else 0
    steps = len(names) + inner + (len(subsets) if "concat" in strategies else 0) + int(linear)
    bar = _bar(None, progress, "compare", "head", total=steps)

    def say(msg):
        if verbose:
            (bar.write if progress else print)(msg)

    def fused(combo) -> tuple:
        """(head, X) for backbones ``combo`` as a scikit-learn user builds them: one 2-D matrix and
        the head told its backbone widths (the same model as one input per backbone)."""
        Xs, widths = stack_backbones({b: X[b] for b in combo})
        est = clone(head)
        return (est.set_params(backbone_widths=widths) if "backbone_widths" in est.get_params() else est), Xs

    def run(est, Xs) -> tuple[np.ndarray, float]:
        """Held-out predictions (n, K) (NaN rows never held out) and total fit seconds, by
        scikit-learn's ``cross_validate`` on the folds."""
        r = sk_cross_validate(est, Xs, y, cv=folds, return_estimator=True, return_indices=True, error_score="raise")
        out = np.full((n, K), np.nan)
        for fitted, va in zip(r["estimator"], r["indices"]["test"]):
            out[va] = fitted.predict_proba(Xs[va])
        return out, float(np.sum(r["fit_time"]))

    # (backbones, strategy) -> (held-out proba, fit seconds[, average weights])
    preds: dict[tuple[tuple[str, ...], str], tuple] = {}
    singles = {}
    for b in names:
        say(f"compare: {b}")
        singles[b] = run(*fused((b,)))
        preds[((b,), "single")] = singles[b]
        bar.update()

    # Weights of the average are fitted without the rows they are scored on: with CV, on the
    # out-of-fold predictions of the other folds; with a holdout, on inner CV of the training rows.
    inner_oof: dict[str, np.ndarray] = {}
    if subsets and "average" in strategies and not cv:
        tr = folds[0][0]
        for b in names:
            say(f"compare: inner CV of {b} for the average's weights")
            est, Xb = fused((b,))
            inner_oof[b] = cross_validate(est, Xb[tr], y[tr], inner_cv, seed).proba
            bar.update()

    for combo in subsets:
        if "concat" in strategies:
            say(f"compare: {'+'.join(combo)} (concat)")
            preds[(combo, "concat")] = run(*fused(combo))
            bar.update()
        if "average" in strategies:
            mix = np.full((n, K), np.nan)
            weights = []
            for tr, va in folds:
                if cv:
                    w = fit_average_weights(y_idx[tr], [singles[b][0][tr] for b in combo])
                else:
                    w = fit_average_weights(y_idx[tr], [inner_oof[b] for b in combo])
                weights.append(w)
                mix[va] = sum(wi * singles[b][0][va] for wi, b in zip(w, combo))
            preds[(combo, "average")] = (mix, sum(singles[b][1] for b in combo), np.mean(weights, axis=0))
    if linear:
        from sklearn.linear_model import LogisticRegression

        say("compare: LogisticRegression on the concatenation")
        lr = LogisticRegression(C=1.0, max_iter=2000)
        preds[(tuple(names), "logreg")] = run(lr, concat_features(X))
        bar.update()
    bar.close()

    rows = []
    for (combo, strategy), value in preds.items():
        proba, secs = value[0], value[1]
        fl, fa = [], []
        for _, va in folds:
            fl.append(log_loss(y_idx[va], proba[va], clip))
            fa.append(accuracy(y_idx[va], proba[va]))
        held = np.concatenate([va for _, va in folds])
        row = {"models": "+".join(combo), "strategy": strategy, "n_backbones": len(combo),
               "log_loss": float(np.mean(fl)), "log_loss_std": float(np.std(fl)) if cv else float("nan"),
               "log_loss_raw": log_loss(y_idx[held], proba[held], 0), "accuracy": float(np.mean(fa)),
               "accuracy_std": float(np.std(fa)) if cv else float("nan"), "fit_s": round(secs, 2),
               "weights": "/".join(f"{w:.2f}" for w in value[2]) if len(value) > 2 else ""}
        rows.append(row)
    df = pd.DataFrame(rows).sort_values(["log_loss", "n_backbones"], kind="stable").reset_index(drop=True)
    best_single = df[df["strategy"] == "single"].iloc[0]
    df["vs_best_single"] = df["log_loss"] - best_single["log_loss"]
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    win = df.iloc[0]
    protocol = f"{cv}-fold CV" if cv else f"holdout of {len(folds[0][1])} rows (val_split {val_split:g})"
    if sampled:
        protocol += f", {sampled}"
    if win["strategy"] == "single":
        verdict = f"no fusion beats the best single backbone {win['models']} (log loss {win['log_loss']:.4f})"
    else:
        verdict = (f"{win['models']} ({win['strategy']}) wins with log loss {win['log_loss']:.4f}, "
                   f"{-win['vs_best_single']:.4f} lower ({-win['vs_best_single'] / best_single['log_loss']:.0%}) "
                   f"than the best single backbone {best_single['models']} ({best_single['log_loss']:.4f})")
    fused = df[df["strategy"].isin(["concat", "average"])]
    if len(fused) and fused.iloc[0]["rank"] != 1:
        f0 = fused.iloc[0]
        verdict += f"; best head fusion {f0['models']} ({f0['strategy']}) {f0['log_loss']:.4f}"
    df.attrs["summary"] = f"{verdict}; {protocol}, seed {seed}, clip {clip:g}"
    df.attrs["protocol"] = protocol

    out = Path(features_dir if out_dir is None else out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare.csv", index=False)
    (out / "compare.md").write_text(f"# catfeat fusion comparison\n\n{df.attrs['summary']}\n\n" + _markdown(df))
    png = _plot(df, out / "compare.png")
    df.attrs["files"] = [str(out / "compare.csv"), str(out / "compare.md")] + ([str(png)] if png else [])
    return df
