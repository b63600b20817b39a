"""Benchmark: FusedHead fit time and validation log loss next to scikit-learn's LogisticRegression.

    python benchmarks/bench_head.py                      # synthetic 25,000 x (2048+2048+1536)
    python benchmarks/bench_head.py --features features/ --models xcep,incv3,irv2

Every method is fitted on the same shuffled stratified split and scored on the same held-out rows
(log loss clipped to [0.005, 0.995] and unclipped, accuracy). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def synthetic(rows: int, dims: list[int], seed: int = 0) -> tuple[dict, np.ndarray]:
    """GAP-like features: non-negative, correlated within a backbone, class signal in a few directions."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    X = {}
    for i, d in enumerate(dims):
        latent = rng.normal(size=(rows, 32)).astype(np.float32)
        latent[:, 0] += np.where(y == 1, 1.2, -1.2)  # the class lives in one latent direction
        mix = rng.normal(scale=1 / np.sqrt(32), size=(32, d)).astype(np.float32)
        f = latent @ mix + rng.normal(scale=0.7, size=(rows, d)).astype(np.float32)
        X[f"synthetic{i}_{d}"] = np.maximum(f, 0, dtype=np.float32)
    return X, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default=None, help="folder of gap_<Model>.h5 caches (default: synthetic data)")
    p.add_argument("--models", default=None, help="backbones to load from --features (default: all cached)")
    p.add_argument("--rows", type=int, default=25000, help="synthetic rows (default: %(default)s)")
    p.add_argument("--dims", default="2048,2048,1536", help="synthetic backbone dims (default: %(default)s)")
    p.add_argument("--val-split", type=float, default=0.2, help="held-out share (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--presets", default="default,reference", help="FusedHead presets to time")
    p.add_argument("--repeat", type=int, default=2, help="fits per head preset; the fastest is reported "
                   "(the first includes one-off tracing)")
    p.add_argument("--tune", action="store_true", help="also time tune_head(FusedHead()) (search + final fit)")
    p.add_argument("--no-logreg", action="store_true", help="skip LogisticRegression")
    p.add_argument("--logreg-c", type=float, default=1.0, help="C of LogisticRegression (default: %(default)s)")
    p.add_argument("--json", default="bench_head.json", help="output file (default: %(default)s)")
    args = p.parse_args(argv)

    from catfeat.head.scoring import (
        accuracy, concat_features, encode_labels, holdout_split, log_loss, take_rows, tune_head)
    from catfeat.head.estimator import FusedHead

    if args.features:
        from catfeat.cache.store import cached_models
        from catfeat.cache.store import load_features

        X, y, _ = load_features(args.models or cached_models(args.features), args.features)
        source = f"{args.features} ({', '.join(X)})"
    else:
        X, y = synthetic(args.rows, [int(d) for d in args.dims.split(",")], args.seed)
        source = "synthetic"
    _, y_idx = encode_labels(y)
    tr, va = holdout_split(y_idx, args.val_split, args.seed)
    Xtr, Xva = take_rows(X, tr), take_rows(X, va)
    n, d = len(y), sum(a.shape[1] for a in X.values())
    print(f"data: {source}, {n} rows x {d} features, fit on {len(tr)}, score on {len(va)}", flush=True)

    rows = []
    runs = [(f"FusedHead(preset={s!r})", {"preset": s}, args.repeat) for s in args.presets.split(",") if s]
    if args.tune:
        runs.append(("tune_head(FusedHead())", None, 1))
    for label, kwargs, repeat in runs:
        best = None
        tuning = None
        for _ in range(max(1, repeat)):
            t = time.perf_counter()
            if kwargs is None:  # the search and the final fit
                head, tuning = tune_head(FusedHead(random_state=args.seed), Xtr, y[tr])
            else:
                head = FusedHead(**kwargs, random_state=args.seed).fit(Xtr, y[tr])
            fit_s = time.perf_counter() - t
            if best is None or fit_s < best[0]:
                best = (fit_s, head)
        fit_s, head = best
        t = time.perf_counter()
        proba = head.predict_proba(Xva)
        pred_s = time.perf_counter() - t
        if tuning is not None:
            print(f"  {tuning.summary()}")
        rows.append({"method": label, "fit_s": fit_s, "predict_s": pred_s,
                     "epochs_run": len(head.history_.get("loss", [])), "best_epoch": head.n_epochs_,
                     "log_loss": log_loss(y_idx[va], proba), "log_loss_raw": log_loss(y_idx[va], proba, 0),
                     "accuracy": accuracy(y_idx[va], proba), "params": head.params_})
        print(f"  {rows[-1]['method']}: {fit_s:.2f} s", flush=True)
    if not args.no_logreg:
        from sklearn.linear_model import LogisticRegression

        A, B = concat_features(Xtr), concat_features(Xva)
        lr = LogisticRegression(C=args.logreg_c, max_iter=2000)
        t = time.perf_counter()
        lr.fit(A, y[tr])
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        proba = lr.predict_proba(B)
        pred_s = time.perf_counter() - t
        rows.append({"method": f"LogisticRegression(C={args.logreg_c:g}, lbfgs)", "fit_s": fit_s,
                     "predict_s": pred_s, "epochs_run": int(np.max(lr.n_iter_)), "best_epoch": None,
                     "log_loss": log_loss(y_idx[va], proba), "log_loss_raw": log_loss(y_idx[va], proba, 0),
                     "accuracy": accuracy(y_idx[va], proba), "params": {"C": args.logreg_c}})
        print(f"  {rows[-1]['method']}: {fit_s:.2f} s", flush=True)

    print("\n| method | fit s | predict s | epochs (LR: iterations) | log loss (clip 0.005) | unclipped | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ep = r["epochs_run"] if r["best_epoch"] is None else f"{r['epochs_run']} (best {r['best_epoch']})"
        print(f"| {r['method']} | {r['fit_s']:.2f} | {r['predict_s']:.2f} | {ep} | {r['log_loss']:.4f} | "
              f"{r['log_loss_raw']:.4f} | {r['accuracy']:.4f} |")
    import keras

    out = {"data": source, "rows": n, "features": d, "train_rows": len(tr), "val_rows": len(va),
           "seed": args.seed, "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "keras": keras.__version__, "backend": keras.backend.backend(), "results": rows}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
