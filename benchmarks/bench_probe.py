"""Linear probe: are the features ImageNet features? Real weights against random ones, per backbone.

    python benchmarks/bench_probe.py                                  # lite0,lite1,lite2, 1,000 photos
    python benchmarks/bench_probe.py --models lite0 --limit 400

For each weights choice (the packaged ImageNet weights, then ``weights=None``), extracts the GAP
features of ``--limit`` labelled photos with ``catfeat.extract`` into a scratch folder, fits
scikit-learn's LogisticRegression (standardised features, C=1) on a stratified half and scores the
other half: accuracy and log loss (unclipped). Prints a table and writes it as CSV.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "small200"


def main(argv=None) -> None:
    doc = __doc__.split("\n")
    p = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--models", default="lite0,lite1,lite2", help="backbones (default: %(default)s)")
    p.add_argument("--limit", type=int, default=1000, help="labelled photos, class-balanced (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split seed and the random weights' seed")
    p.add_argument("--csv", type=Path, default=Path("bench_probe.csv"), help="output (default: %(default)s)")
    args = p.parse_args(argv)

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import catfeat
    from catfeat.models.registry import parse_models

    specs = parse_models(args.models)
    rows = []
    with tempfile.TemporaryDirectory(prefix="catfeat-probe-") as tmp:
        for weights in ("imagenet", None):
            out = Path(tmp) / str(weights)
            catfeat.extract(args.data, [s.name for s in specs], out=out, weights=weights, limit=args.limit,
                            seed=args.seed, progress=False)
            for spec in specs:
                X, y, _ = catfeat.load_features([spec.name], out)
                xtr, xte, ytr, yte = train_test_split(X[spec.name], y, test_size=0.5, stratify=y,
                                                      random_state=args.seed)
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(xtr, ytr)
                prob = clf.predict_proba(xte)
                rows.append({"backbone": spec.name, "weights": weights or "none (random)", "train": len(ytr),
                             "held_out": len(yte), "accuracy": float(np.mean(prob.argmax(1) == yte)),
                             "log_loss": float(log_loss(yte, prob, labels=clf.classes_))})
                print(f"{spec.name:20s} {rows[-1]['weights']:14s} accuracy {rows[-1]['accuracy']:.3f}  "
                      f"log loss {rows[-1]['log_loss']:.4f}", flush=True)
    print("\n| backbone | weights | accuracy | log loss |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['weights']} | {r['accuracy']:.3f} | {r['log_loss']:.4f} |")
    with open(args.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"saved {args.csv}")


if __name__ == "__main__":
    main()
