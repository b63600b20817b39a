"""The README's results table: single vs fused backbones, recipe vs default vs tuned head vs linear model.

    python -m catfeat.extract ../shared/data/dogs-vs-cats/small200 --models lite0,lite1,lite2 --limit 3000 --out /tmp/litefeat
    python benchmarks/bench_results.py --features /tmp/litefeat

Every head is scored on the same shuffled stratified holdout (catfeat.head.scoring.holdout_score) and,
with --cv K, by the same stratified K folds (cross_validate). Log loss clipped to [clip, 1-clip] and
unclipped, and accuracy. Prints Markdown tables and writes them as CSV.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> None:
    doc = __doc__.split("\n")
    p = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=Path("features"), help="cache folder (default: %(default)s)")
    p.add_argument("--models", default="lite0,lite1,lite2", help="backbones (default: %(default)s)")
    p.add_argument("--val-split", type=float, default=1 / 3, help="held-out share (default: 1/3)")
    p.add_argument("--cv", type=int, default=5, help="folds of the CV table, 0 to skip (default: %(default)s)")
    p.add_argument("--heads", default="reference,default,tune,logreg", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--csv", type=Path, default=Path("bench_results.csv"), help="output (default: %(default)s)")
    args = p.parse_args(argv)

    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from sklearn.base import BaseEstimator, ClassifierMixin

    from catfeat import FusedHead, load_features
    from catfeat.models.registry import parse_models
    from catfeat.head.comparison import markdown_table
    from catfeat.head.scoring import concat_features, cross_validate, holdout_score, tune_head

    class TunedHead(ClassifierMixin, BaseEstimator):
        """FusedHead tuned by tune_head at every fit: the search runs inside each holdout / CV fold."""

        def __init__(self, random_state=2019):
            self.random_state = random_state

        def fit(self, X, y):
            self.head_, self.tuning_ = tune_head(FusedHead(random_state=self.random_state), X, y)
            self.classes_ = self.head_.classes_
            return self

        def predict_proba(self, X):
            return self.head_.predict_proba(X)

    names = [s.name for s in parse_models(args.models)]
    X, y, _ = load_features(names, args.features)
    heads = {"reference": lambda: FusedHead(preset="reference", random_state=args.seed),
             "default": lambda: FusedHead(random_state=args.seed),
             "tune": lambda: TunedHead(random_state=args.seed),
             "logreg": lambda: LogisticRegression(C=1.0, max_iter=2000)}
    sets = [[n] for n in names] + ([names] if len(names) > 1 else [])
    rows = []
    for head in args.heads.split(","):
        for combo in sets:
            Xs = {n: X[n] for n in combo}
            if head == "logreg":
                Xs = concat_features(Xs)
            label = "+".join(combo)
            scores = {"holdout": holdout_score(heads[head](), Xs, y, args.val_split, args.seed)}
            if args.cv:
                scores[f"cv{args.cv}"] = cross_validate(heads[head](), Xs, y, args.cv, args.seed)
            for kind, s in scores.items():
                rows.append({"head": head, "features": label, "eval": kind, "log_loss": s.log_loss,
                             "log_loss_unclipped": s.log_loss_raw, "accuracy": s.accuracy,
                             "log_loss_std": getattr(s, "log_loss_std", None)})
                print(f"{head:9s} {label:60s} {kind:8s} {s.log_loss:.4f} / {s.log_loss_raw:.4f} / "
                      f"{s.accuracy:.3f}", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.csv, index=False)
    for kind in df["eval"].unique():
        sub = df[df["eval"] == kind]
        cell = sub.apply(lambda r: f"{r.log_loss:.4f} / {r.log_loss_unclipped:.4f} / {r.accuracy:.3f}", axis=1)
        table = sub.assign(cell=cell).pivot(index="head", columns="features", values="cell")
        table = table.reindex(index=[h for h in args.heads.split(",") if h in table.index],
                              columns=["+".join(c) for c in sets])
        print(f"\n{kind}: log loss (clipped) / unclipped / accuracy\n")
        print(markdown_table(table.reset_index()))
    print(f"saved {args.csv}")


if __name__ == "__main__":
    main()
