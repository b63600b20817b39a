"""Which backbones, fused how: every subset of the cached backbones and every fusion strategy, ranked.

:func:`compare` scores single backbones, one head on the concatenated features (``concat``), a
weighted average of single heads (``average``) and a LogisticRegression reference on the same rows
with the scoring of :mod:`catfeat.head.scoring`, and writes ``compare.csv``, ``compare.md`` and
``compare.png``.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from catfeat.extraction.stages import progress_bar
from catfeat.head.scoring import (
    DEFAULT_CLIP, DEFAULT_SEED, PROBA_FLOOR, accuracy, check_scoring, concat_features, cross_validate, cv_splits,
    encode_labels, holdout_split, log_loss)


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
        mix = np.clip(w @ pt, PROBA_FLOOR, 1.0)
        # gradient through the softmax parametrization
        g_w = -(pt / mix).mean(axis=1)
        return -np.mean(np.log(mix)), w * (g_w - w @ g_w)

    res = minimize(loss, np.zeros(len(P)), jac=True, method="L-BFGS-B")
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


def markdown_table(df) -> str:
    """``df`` as a Markdown table (floats to 4 decimals, NaN as an empty cell)."""
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


def plot_comparison(df, path: str | os.PathLike) -> Path | None:
    """A bar chart of ``compare``'s table (log loss, best row green) saved to ``path``; None without matplotlib."""
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
    return Path(path)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path; ``ValueError`` naming ``--out-dir`` when it is an existing non-folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir (out_dir) {out} is a file, not a folder; name a folder for compare.csv, "
                         "compare.md and compare.png")
    return out


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
    backbones' stacked matrix with ``backbone_widths`` (:func:`catfeat.head.estimator.stack_backbones`), by
    ``sklearn.model_selection.cross_validate`` on those rows. Writes ``compare.csv``,
    ``compare.md`` and ``compare.png`` (when matplotlib is installed) to ``out_dir`` (default: ``features_dir``). The returned
    DataFrame is sorted by log loss; ``df.attrs["summary"]`` says which fusion wins and by how much.
    ``progress``: a progress bar over the candidate heads on stderr.
    """
    import pandas as pd
    from sklearn.base import clone
    from sklearn.model_selection import cross_validate as sk_cross_validate

    from catfeat.head.estimator import FusedHead, stack_backbones

    out = check_out_dir(features_dir if out_dir is None else out_dir)
    if data is not None:
        X, y = data
    else:
        from catfeat.cache.store import load_features, models_or_cached

        X, y, _ = load_features(models_or_cached(models, features_dir), features_dir, "train")
    from catfeat.cache.rows import is_stream, sample_for_compare

    sampled = ""
    if is_stream(X):  # from the caches: the many candidate heads run on a sample held in memory
        X, y, sampled = sample_for_compare(X, y, seed)
        if sampled:
            logging.getLogger("catfeat").info(f"compare: {sampled} (streamed caches)")
    if not isinstance(X, Mapping):
        raise ValueError("compare needs features per backbone (a dict name -> array)")
    names = list(X)
    head = FusedHead(random_state=seed) if head is None else head
    classes, y_idx = encode_labels(y)
    y = np.asarray(y)
    check_scoring(y_idx, val_split, cv, clip, classes=classes, seed=seed)
    folds = cv_splits(y_idx, cv, seed) if cv else [holdout_split(y_idx, val_split, seed)]
    if "average" in strategies and len(X) > 1:
        smallest = min(np.unique(y_idx[tr], return_counts=True)[1].min() for tr, _ in folds)
        if smallest < inner_cv:
            raise ValueError(f"the 'average' fusion fits its weights by {inner_cv}-fold CV of the training rows, "
                             f"which needs at least {inner_cv} rows of each class (a class has {smallest}); "
                             "pass --strategies concat, or more images")
    n, K = len(y_idx), len(classes)
    if linear:  # checked before any work: the concatenation is one more copy of every feature
        from catfeat.cache.store import check_memory

        d = sum(np.shape(a)[1] for a in X.values())
        check_memory(3 * n * d * 4, f"compare's LogisticRegression on the concatenated {n:,} x {d} features",
                     "pass linear=False, or stream: python -m catfeat.fit --stream --compare scores a "
                     "stratified sample")

    subsets = [c for r in range(2, len(names) + 1) for c in itertools.combinations(names, r)]
    inner = len(names) if subsets and "average" in strategies and not cv else 0
    steps = len(names) + inner + (len(subsets) if "concat" in strategies else 0) + int(linear)
    bar = progress_bar(None, progress, "compare", "head", total=steps, leave=False)

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

    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare.csv", index=False)
    (out / "compare.md").write_text(f"# catfeat fusion comparison\n\n{df.attrs['summary']}\n\n" + markdown_table(df))
    png = plot_comparison(df, out / "compare.png")
    df.attrs["files"] = [str(out / "compare.csv"), str(out / "compare.md")] + ([str(png)] if png else [])
    return df


def format_table(df) -> str:
    """``compare``'s table as text for a terminal: without ``n_backbones`` and empty columns (no std
    with a holdout), floats to 4 decimals, up to 200 characters wide."""
    import pandas as pd

    shown = df.drop(columns=["n_backbones"]).dropna(axis=1, how="all")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")
