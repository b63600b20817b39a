"""catfeat.head.comparison: ranking every subset of backbones and fusion strategy (`compare`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from catfeat.head.comparison import compare, fit_average_weights
from catfeat.head.estimator import FusedHead
from conftest import make_caches

FAST = dict(preset="reference", epochs=10, batch_size=32, learning_rate=0.01)


def test_average_weights_favour_the_informative_head():
    y = np.arange(200) % 2
    good = np.column_stack([1 - (0.1 + 0.8 * y), 0.1 + 0.8 * y])
    noise = np.full((200, 2), 0.5)
    w = fit_average_weights(y, [noise, good])
    assert w.sum() == pytest.approx(1) and w[1] > 0.95


def test_compare_ranks_every_subset(tmp_path):
    make_caches(tmp_path, n=200, sep=(1.0, 1.0))
    df = compare(None, tmp_path, head=FusedHead(**FAST), val_split=0.25, inner_cv=3)
    assert set(df["models"] + "/" + df["strategy"]) == {
        "EfficientNetLite0/single", "EfficientNetLite1/single",
        "EfficientNetLite0+EfficientNetLite1/concat", "EfficientNetLite0+EfficientNetLite1/average",
        "EfficientNetLite0+EfficientNetLite1/logreg"}
    assert df["log_loss"].is_monotonic_increasing and df["rank"].tolist() == [1, 2, 3, 4, 5]
    assert np.isfinite(df["log_loss"]).all() and (df["accuracy"] > 0.6).all()
    assert df.loc[0, "models"] in df.attrs["summary"] and "holdout of 50 rows" in df.attrs["summary"]
    assert (tmp_path / "compare.csv").exists() and "| rank |" in (tmp_path / "compare.md").read_text()
    avg = df[df["strategy"] == "average"].iloc[0]
    assert len(avg["weights"].split("/")) == 2
    assert pd.read_csv(tmp_path / "compare.csv").shape[0] == 5
    try:
        import matplotlib  # noqa: F401  (the chart is optional)
    except ImportError:
        assert not (tmp_path / "compare.png").exists()
    else:
        assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_with_cv(tmp_path):
    make_caches(tmp_path, n=120)
    df = compare("lite0,lite1", tmp_path, head=FusedHead(**FAST), cv=3, linear=False, out_dir=tmp_path / "cmp")
    assert len(df) == 4 and df["log_loss_std"].notna().all() and "3-fold CV" in df.attrs["summary"]
    assert (tmp_path / "cmp" / "compare.md").exists()


def test_compare_scores_the_fused_head_as_scikit_learn_does(tmp_path, monkeypatch):
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from catfeat.head.estimator import stack_backbones
    from catfeat.cache.store import load_features

    make_caches(tmp_path, n=120)
    fits = []
    real_fit = FusedHead.fit

    def spy(self, X, y, *args, **kwargs):
        fits.append((self.backbone_widths, np.ndim(X)))
        return real_fit(self, X, y, *args, **kwargs)

    monkeypatch.setattr(FusedHead, "fit", spy)
    df = compare("lite0,lite1", tmp_path, head=FusedHead(**FAST), cv=3, seed=5, clip=0, linear=False,
                 strategies=("concat",))
    # every head is fitted on one 2-D matrix told its backbones' widths
    assert fits and all(nd == 2 and isinstance(w, dict) for w, nd in fits)
    assert {tuple(w) for w, _ in fits} == {("EfficientNetLite0",), ("EfficientNetLite1",),
                                           ("EfficientNetLite0", "EfficientNetLite1")}
    monkeypatch.setattr(FusedHead, "fit", real_fit)
    blocks, y, _ = load_features("lite0,lite1", tmp_path)
    X, widths = stack_backbones(blocks)
    folds = StratifiedKFold(3, shuffle=True, random_state=5)
    row = df[df["strategy"] == "concat"].iloc[0]
    head = FusedHead(**FAST, backbone_widths=widths)
    assert row["accuracy"] == pytest.approx(cross_val_score(head, X, y, cv=folds).mean(), abs=1e-12)
    assert row["log_loss"] == pytest.approx(-cross_val_score(head, X, y, cv=folds, scoring="neg_log_loss").mean(),
                                            rel=1e-5)
