"""Evaluation helpers (splits, CV, log loss, submissions, compare) and `python -m catfeat.fit`."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.head.comparison import compare, fit_average_weights
from catfeat.head.scoring import (
    choose_clip, clip_proba, cross_validate, cv_splits, holdout_score, holdout_split, log_loss, submission_ids,
    write_submission)
from catfeat.head.estimator import FusedHead
from catfeat.cache.store import write_cache

FAST = dict(preset="reference", epochs=10, batch_size=32, learning_rate=0.01)


def make_caches(folder, n=160, n_test=30, dims=(10, 6), sep=(1.2, 0.4), seed=0, models=("EfficientNetLite0",
                "EfficientNetLite1"), test=True, labels=None, names=None):
    """Small caches like extract writes: cats first, then dogs (sorted names), test rows test/<id>.jpg."""
    rng = np.random.default_rng(seed)
    y = np.array([0] * (n // 2) + [1] * (n - n // 2)) if labels is None else np.asarray(labels)
    n = len(y)
    train_names = names or [f"train/{'cat' if v == 0 else 'dog'}.{i}.jpg" for i, v in enumerate(y)]
    test_names = [f"test/{i}.jpg" for i in rng.permutation(np.arange(1, n_test + 1))] if test else []
    yt = rng.integers(0, 2, n_test)
    for model, d, s in zip(models, dims, sep):
        centers = rng.normal(size=(2, d))
        tr = rng.normal(size=(n, d)) + s * centers[np.clip(y, 0, 1)]
        te = rng.normal(size=(n_test, d)) + s * centers[yt] if test else None
        write_cache(folder / f"gap_{model}.h5", model, tr, y, train_names, te, test_names)
    return folder


# -- splits and metrics ------------------------------------------------------------------------------
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


def test_average_weights_favour_the_informative_head():
    y = np.arange(200) % 2
    good = np.column_stack([1 - (0.1 + 0.8 * y), 0.1 + 0.8 * y])
    noise = np.full((200, 2), 0.5)
    w = fit_average_weights(y, [noise, good])
    assert w.sum() == pytest.approx(1) and w[1] > 0.95


# -- compare -------------------------------------------------------------------------------------------
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


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    feats = make_caches(tmp_path / "features")
    sub, head_dir = tmp_path / "sub.csv", tmp_path / "head"
    rc = fit_cli.main(["--models", "lite0,lite1", "--features", str(feats), "--epochs", "10", "--batch-size", "32",
                       "--preset", "reference", "--submission", str(sub), "--save", str(head_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "validation log loss" in out and "catfeat.fit: EfficientNetLite0+EfficientNetLite1, 160 rows" in out
    df = pd.read_csv(sub)
    assert list(df.columns) == ["id", "label"] and df["id"].tolist() == list(range(1, 31))
    assert df["label"].between(0.005, 0.995).all()
    head = FusedHead.load(head_dir)
    assert head.backbones_ == ["EfficientNetLite0", "EfficientNetLite1"] and head.dims_ == [10, 6]


def test_cli_names_the_classes_and_saves_a_head_predicting_names(tmp_path, capsys):
    feats = make_caches(tmp_path / "features", n=60)
    sub, head_dir = tmp_path / "sub.csv", tmp_path / "head"
    rc = fit_cli.main(["--models", "lite0,lite1", "--features", str(feats), "--epochs", "3", "--batch-size", "32",
                       "--preset", "reference", "--submission", str(sub), "--save", str(head_dir), "--clip", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "60 training rows (cat: 30, dog: 30)" in out
    head = FusedHead.load(head_dir)
    assert head.classes_.tolist() == ["cat", "dog"]
    from catfeat.cache.store import load_features

    Xt, _, names = load_features("lite0,lite1", feats, "test")
    p_dog = head.predict_proba(Xt)[:, 1]
    df = pd.read_csv(sub)
    by_id = dict(zip(df["id"], df["label"]))
    ids = submission_ids(names)
    np.testing.assert_allclose([by_id[i] for i in ids], p_dog, rtol=1e-5, atol=1e-6)


def test_cli_cv_writes_out_of_fold_predictions(tmp_path, capsys):
    feats = make_caches(tmp_path)
    rc = fit_cli.main(["--features", str(feats), "--cv", "3", "--epochs", "5", "--batch-size", "32",
                       "--preset", "reference", "--clip", "auto", "--oof", str(tmp_path / "oof.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "3-fold CV log loss" in out and "+-" in out and "clip chosen by CV" in out
    oof = pd.read_csv(tmp_path / "oof.csv")
    # one probability column per class name of the caches, as in predict's CSV
    assert len(oof) == 160 and list(oof.columns) == ["name", "label", "p_cat", "p_dog"]
    assert oof["p_dog"].between(0, 1).all() and np.allclose(oof["p_cat"] + oof["p_dog"], 1)
    # cats first in the caches: the cat rows should mostly get P(cat) > 1/2
    assert (oof.loc[oof["label"] == 0, "p_cat"] > 0.5).mean() > 0.7


def test_fit_report_from_python(tmp_path, capsys):
    """The CLI's work as one call: scores, the clip chosen on the training part, files, a fitted head."""
    import catfeat

    feats = make_caches(tmp_path / "features", n=120)
    lines = []
    report = catfeat.fit_report("lite0,lite1", feats, head=FusedHead(**FAST, random_state=1), clip="auto",
                                submission=tmp_path / "sub.csv", log=lines.append)
    assert isinstance(report, catfeat.FitReport)
    assert report.models == ["EfficientNetLite0", "EfficientNetLite1"] and report.n_rows == 120
    assert report.classes == ["cat", "dog"] and report.head.classes_.tolist() == ["cat", "dog"]
    assert report.score.folds == 0 and len(report.score.index) == 24 and 0 < report.score.log_loss < 0.69
    assert report.score.clip == report.clip and report.clip in (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
                                                                0.03, 0.05)
    assert report.files == {"submission": str(tmp_path / "sub.csv")} and report.submission_rows == 30
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 30
    assert any(line.startswith("clip chosen by 5-fold CV of the training part") for line in lines)
    assert lines[0] == "features: EfficientNetLite0 (10), EfficientNetLite1 (6); 120 training rows (cat: 60, dog: 60)"
    assert report.summary().startswith("EfficientNetLite0+EfficientNetLite1, 120 rows, validation log loss ")
    assert capsys.readouterr().out == ""  # nothing printed without log=

    cv = catfeat.fit_report("lite0", feats, head=FusedHead(**FAST), cv=3, clip=0.01, refit=False)
    assert cv.head is None and cv.score.folds == 3 and cv.clip == 0.01
    oof = feats / "oof_EfficientNetLite0.csv"
    assert cv.files == {"oof": str(oof)} and list(pd.read_csv(oof).columns) == ["name", "label", "p_cat", "p_dog"]
    with pytest.raises(ValueError, match="cannot write the submission"):
        catfeat.fit_report("lite0", feats, head=FusedHead(**FAST), submission=tmp_path)  # a folder


def test_cli_errors_are_one_line(tmp_path, capsys):
    def run(*argv):
        rc = fit_cli.main([*argv, "--epochs", "1", "--preset", "reference"])
        err = capsys.readouterr().err.strip()
        return rc, err

    feats = make_caches(tmp_path / "ok")
    rc, err = run("--models", "lite0,lite2", "--features", str(feats))
    assert rc == 2 and "no feature cache" in err and "gap_EfficientNetLite2.h5" in err and err.count("\n") == 0
    make_caches(tmp_path / "mixed", models=("EfficientNetLite0",))
    make_caches(tmp_path / "mixed", models=("EfficientNetLite1",), n=150, dims=(6,))
    rc, err = run("--models", "lite0,lite1", "--features", str(tmp_path / "mixed"))
    assert rc == 2 and "hold different images" in err
    make_caches(tmp_path / "unlabeled", models=("EfficientNetLite0",), labels=[-1] * 40,
                names=[f"train/{i}.jpg" for i in range(40)])
    rc, err = run("--models", "lite0", "--features", str(tmp_path / "unlabeled"))
    assert rc == 2 and "without labels" in err
    make_caches(tmp_path / "notest", models=("EfficientNetLite0",), test=False)
    rc, err = run("--models", "lite0", "--features", str(tmp_path / "notest"), "--submission",
                  str(tmp_path / "s.csv"))
    assert rc == 2 and "no test rows" in err and not (tmp_path / "s.csv").exists()
    rc, err = run("--features", str(tmp_path / "empty"))
    assert rc == 2 and "no complete feature caches" in err


def test_cli_exclude_and_compare(tmp_path, capsys):
    feats = make_caches(tmp_path)
    (tmp_path / "drop.txt").write_text("train/cat.0.jpg\ntrain/dog.159.jpg\n")
    rc = fit_cli.main(["--features", str(feats), "--epochs", "5", "--batch-size", "32", "--preset", "reference",
                       "--exclude", str(tmp_path / "drop.txt"), "--compare"])
    out = capsys.readouterr().out
    assert rc == 0 and "excluding 2 of 160" in out and "158 rows" in out
    assert "wins with log loss" in out or "no fusion beats" in out
    assert (feats / "compare.csv").exists()


def test_cli_exclude_reads_an_outliers_csv(tmp_path, capsys):
    """The ranked CSV of `python -m catfeat outliers` drops its flagged training rows, and only those."""
    feats = make_caches(tmp_path)
    pd.DataFrame({"file": ["train/cat.3.jpg", "train/dog.100.jpg", "train/cat.4.jpg"], "label": [0, 1, 0],
                  "votes": [2, 2, 0], "flagged": [True, True, False]}).to_csv(tmp_path / "outliers.csv", index=False)
    rc = fit_cli.main(["--features", str(feats), "--epochs", "3", "--exclude", str(tmp_path / "outliers.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "excluding 2 of 160" in out and "158 rows" in out


def test_cli_subprocess_help():
    res = subprocess.run([sys.executable, "-m", "catfeat.fit", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for flag in ("--models", "--cv", "--clip", "--submission", "--save", "--compare", "--preset", "--val-split"):
        assert flag in res.stdout


def test_cli_tune_reports_the_chosen_values(tmp_path, capsys, monkeypatch):
    import catfeat.head.estimator

    monkeypatch.setattr(catfeat.head.estimator, "TUNE_GRID", {"learning_rate": [1e-5, 3e-2]})
    feats = make_caches(tmp_path)
    rc = fit_cli.main(["--features", str(feats), "--epochs", "8", "--batch-size", "32", "--preset", "reference",
                       "--learning-rate", "1e-5", "--tune"])
    out = capsys.readouterr().out
    assert rc == 0 and "tuned by 3-fold CV on 128 rows (2 candidates" in out and "learning_rate=0.03" in out
