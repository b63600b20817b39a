"""`python -m catfeat.fit` and catfeat.fit_report: the CLI's output, files and one-line errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.head.scoring import submission_ids
from catfeat.head.estimator import FusedHead
from conftest import make_caches

FAST = dict(preset="reference", epochs=10, batch_size=32, learning_rate=0.01)


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
