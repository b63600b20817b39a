"""catfeat.head.scoring: splits, metrics and clipping, cross-validation, tuning, submissions."""
from __future__ import annotations

import numpy as np
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.head.scoring import (
    choose_clip, clip_proba, cross_validate, cv_splits, holdout_score, holdout_split, log_loss, submission_ids,
    write_submission)
from catfeat.head.estimator import FusedHead
from conftest import make_caches

FAST = dict(preset="reference", epochs=10, batch_size=32, learning_rate=0.01)


def test_cv_folds_are_stratified_disjoint_and_cover_all_rows():
    y = np.array([0] * 60 + [1] * 40)  # sorted, unbalanced
    folds = cv_splits(y, 5, seed=3)
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(100))
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 100
        assert np.bincount(y[va]).tolist() == [12, 8]
    assert [va.tolist() for _, va in cv_splits(y, 5, seed=3)] == [va.tolist() for _, va in folds]
    with pytest.raises(ValueError, match="smallest class"):
        cv_splits(np.array([0] * 10 + [1] * 2), 3)


def test_holdout_split_is_shuffled_and_stratified():
    y = np.array([0] * 50 + [1] * 50)
    tr, va = holdout_split(y, 0.2, seed=1)
    assert len(va) == 20 and np.bincount(y[va]).tolist() == [10, 10]
    assert not set(tr) & set(va)


def test_log_loss_and_clipping():
    y = np.array([1, 0, 1])
    p = np.array([1.0, 0.0, 0.0])  # one confident mistake
    assert log_loss(y, p, clip=0.005) == pytest.approx(-np.log(0.005) / 3 - 2 * np.log(0.995) / 3)
    assert log_loss(y, p, clip=0) == pytest.approx(-np.log(1e-7) / 3)  # floored, not infinite
    assert log_loss(y, np.column_stack([1 - p, p]), 0.005) == pytest.approx(log_loss(y, p, 0.005))
    assert clip_proba(np.array([0.0, 0.5, 1.0]), 0.01).tolist() == [0.01, 0.5, 0.99]
    three = clip_proba(np.array([[1.0, 0.0, 0.0]]), 0.1)
    assert three.sum() == pytest.approx(1) and three.min() > 0
    with pytest.raises(ValueError):
        clip_proba(p, 0.7)
    # A clip helps a model with confident mistakes and costs a well-calibrated one.
    assert choose_clip(y, p) > 0
    assert choose_clip(np.array([1, 0] * 50), np.array([0.999, 0.001] * 50)) < 0.005


def test_submission_format_and_clipping(tmp_path):
    names = ["test/10.jpg", "test/2.jpg", "test/1.jpg"]
    proba = np.array([[0.0, 1.0], [0.7, 0.3], [1.0, 0.0]])
    df = write_submission(tmp_path / "sub.csv", names, proba)
    text = (tmp_path / "sub.csv").read_text().splitlines()
    assert text[0] == "id,label"
    assert [line.split(",")[0] for line in text[1:]] == ["1", "2", "10"]
    assert df["label"].tolist() == [0.005, 0.3, 0.995]
    raw = write_submission(tmp_path / "raw.csv", names, proba[:, 1], clip=0)
    assert raw["label"].tolist() == [0.0, 0.3, 1.0]
    assert submission_ids(["123.jpg", "a/b/test/7.png"]).tolist() == [123, 7]
    with pytest.raises(ValueError, match="integer id"):
        submission_ids(["test/cat.jpg"])
    with pytest.raises(ValueError, match="3 test names"):
        write_submission(tmp_path / "x.csv", names, proba[:2])


def test_cross_validate_gives_one_out_of_fold_prediction_per_row():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    X = {"a": (rng.normal(size=(120, 5)) + 2 * y[:, None]).astype(np.float32)}
    trained = FusedHead(**{**FAST, "epochs": 20, "learning_rate": 0.1})
    score = cross_validate(trained, X, y, cv=4, seed=1)
    assert score.proba.shape == (120, 2) and np.isfinite(score.proba).all()
    assert np.allclose(score.proba.sum(axis=1), 1, atol=1e-6)
    assert len(score.fold_log_loss) == 4 and score.log_loss_std >= 0
    assert score.accuracy > 0.9
    assert score.reclip(0.05).log_loss != score.log_loss
    hold = holdout_score(trained, X, y, 0.25, seed=1)
    assert len(hold.index) == 30 and hold.accuracy > 0.9


def test_cli_tune_reports_the_chosen_values(tmp_path, capsys, monkeypatch):
    import catfeat.head.scoring

    monkeypatch.setattr(catfeat.head.scoring, "TUNE_GRID", {"learning_rate": [1e-5, 3e-2]})
    feats = make_caches(tmp_path)
    rc = fit_cli.main(["--features", str(feats), "--epochs", "8", "--batch-size", "32", "--preset", "reference",
                       "--learning-rate", "1e-5", "--tune"])
    out = capsys.readouterr().out
    assert rc == 0 and "tuned by 3-fold CV on 128 rows (2 candidates" in out and "learning_rate=0.03" in out
