"""Hostile inputs never reach the outputs: no NaN probabilities, no silent no-op excludes, no output
paths found unwritable after training, no silent overwrites, no predictions from random weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.cli import predict as predict_cli
from catfeat.head.scoring import write_submission
from catfeat.head.estimator import FusedHead
from catfeat.cache.store import write_cache

FAST = ["--preset", "reference", "--epochs", "1", "--batch-size", "32"]
MODEL = "EfficientNetLite0"


def caches(folder, n=40, n_test=8, d=6, nan_test_rows=()):
    """One small cache: class-dependent features, test rows test/<id>.jpg, optional NaN test rows."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    train = rng.normal(size=(n, d)) + 2.0 * y[:, None]
    test = rng.normal(size=(n_test, d))
    names = [f"train/{'cat' if v == 0 else 'dog'}.{i}.jpg" for i, v in enumerate(y)]
    path = write_cache(folder / f"gap_{MODEL}.h5", MODEL, train, y, names, test,
                       [f"test/{i + 1}.jpg" for i in range(n_test)])
    if nan_test_rows:  # the writer refuses NaN: damage the file afterwards, as a bad disk or tool would
        import h5py

        with h5py.File(path, "r+") as f:
            for i in nan_test_rows:
                f["test"][i, 1] = np.nan
    return folder


def run_fit(capsys, *argv):
    rc = fit_cli.main([*argv, *FAST])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.fixture
def small_head(tmp_path):
    rng = np.random.default_rng(1)
    y = np.arange(30) % 2
    X = {MODEL: (rng.normal(size=(30, 4)) + y[:, None]).astype(np.float32)}
    head = FusedHead(preset="reference", epochs=2, batch_size=16).fit(X, y)
    return head, X


# -- 2. NaN never reaches the outputs -------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--learning-rate", "--dropout", "--weight-decay", "--val-split", "--clip"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_refuses_non_finite_hyper_parameters(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        fit_cli.main(["--features", "nowhere", f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"argument {flag}:" in err and value in err


@pytest.mark.parametrize("param", ["learning_rate", "dropout", "weight_decay", "validation_fraction", "epochs",
                                   "batch_size", "patience"])
def test_head_refuses_non_finite_hyper_parameters(param, small_head):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"{param} must be a finite number"):
            FusedHead(**{param: bad}).resolved_params()
    with pytest.raises(ValueError, match=f"{param} must be a finite number"):
        FusedHead(**{param: math.nan}).fit(*small_head[1:], np.arange(30) % 2)


def test_nan_test_row_stops_the_submission_before_training(tmp_path, capsys):
    feats = caches(tmp_path / "f", nan_test_rows=[6])
    sub = tmp_path / "sub.csv"
    rc, out, err = run_fit(capsys, "--features", str(feats), "--submission", str(sub))
    assert rc == 2 and err.count("\n") == 0 and not sub.exists() and "features:" not in out
    assert "1 test row (e.g. test/7.jpg) of 8 holds NaN in the features of EfficientNetLite0" in err
    assert "re-extract" in err


def test_head_names_nan_rows_instead_of_predicting_nan(small_head):
    head, X = small_head
    Xt = {MODEL: X[MODEL][:5].copy()}
    Xt[MODEL][[1, 3], 0] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"2 rows \(e.g. b, d\) of 5 hold NaN and Inf"):
        head.predict_proba(Xt, names=list("abcde"))
    with pytest.raises(ValueError, match=r"2 rows \(e.g. #1, #3\)"):
        head.predict(Xt)


def test_head_with_nan_weights_refuses_to_predict_and_save(small_head, tmp_path):
    head, X = small_head
    layer = head.model_.get_layer("output")
    kernel, bias = layer.get_weights()
    layer.set_weights([np.full_like(kernel, np.nan), bias])
    with pytest.raises(FloatingPointError, match="trained weights hold NaN/Inf.*lower learning rate"):
        head.predict_proba(X)
    with pytest.raises(FloatingPointError, match="trained weights hold NaN/Inf"):
        head.save(tmp_path / "head")
    assert not (tmp_path / "head" / "head.keras").exists()


def test_diverged_training_fails_in_one_line(tmp_path, capsys):
    feats = caches(tmp_path / "f")
    rc, out, err = run_fit(capsys, "--features", str(feats), "--learning-rate", "1e38", "--weight-decay", "1e30",
                           "--save", str(tmp_path / "head"))
    assert rc == 2 and err.count("\n") == 0 and "training diverged (learning rate 1e+38)" in err
    assert not (tmp_path / "head").exists()


def test_write_submission_refuses_nan_and_out_of_range(tmp_path):
    names = ["test/1.jpg", "test/2.jpg", "test/3.jpg"]
    for bad in (np.nan, np.inf, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"1 of 3 probabilities are not in \[0, 1\].*test/2.jpg"):
            write_submission(tmp_path / "s.csv", names, np.array([0.2, bad, 0.9]), clip=0)
    assert not (tmp_path / "s.csv").exists()


def test_image_predictions_never_return_nan(small_head, tmp_path):
    from conftest import save_image
    from catfeat.predict import predict_images

    head, _ = small_head
    files = [save_image(tmp_path / f"{i}.jpg", i) for i in range(3)]

    def nan_model(arrays, training=False):
        out = np.full((len(arrays[0]), 1), 0.7, np.float32)
        out[-1] = np.nan
        return out

    with pytest.raises(FloatingPointError, match=r"NaN/Inf for 1 of 3 images \(e.g. .*2.jpg\)"):
        predict_images(None, files, predictor=(nan_model, head))


# -- 9a. an --exclude that excludes nothing says so ------------------------------------------------------
def test_exclude_matching_nothing_warns(tmp_path, capsys):
    feats = caches(tmp_path / "f")
    empty, other = tmp_path / "empty.txt", tmp_path / "other.txt"
    empty.write_text("\n")
    other.write_text("cat.0.jpg\ndog.1.jpg\n")
    rc, out, err = run_fit(capsys, "--features", str(feats), "--exclude", str(empty))
    assert rc == 0 and err == f"catfeat.fit: warning: {empty} names no images (empty, or a CSV without flagged " \
                                "rows); nothing is excluded"
    rc, out, err = run_fit(capsys, "--features", str(feats), "--exclude", str(other))
    assert rc == 0 and err.count("\n") == 0 and "excluding 0 of 40" in out
    assert (f"none of the 2 names in {other} match a cached training image (e.g. it lists 'cat.0.jpg', the cache "
            "has 'train/cat.0.jpg'); write the names with their folder") in err


# -- 9b. unwritable outputs fail before training ------------------------------------------------------------
def test_unwritable_outputs_fail_before_training(tmp_path, capsys):
    feats = caches(tmp_path / "f")
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    cases = [
        (["--submission", str(tmp_path)], "cannot write the submission", "it is a folder"),
        (["--submission", str(a_file / "sub.csv")], "cannot write the submission", "plain.txt is a file"),
        (["--save", str(a_file)], "cannot save the head into", "it is a file, not a folder"),
        (["--save", str(a_file / "deeper" / "head")], "cannot write the head", "plain.txt is a file"),
        (["--cv", "2", "--oof", str(a_file / "oof.csv")], "cannot write the out-of-fold", "plain.txt is a file"),
    ]
    for extra, what, why in cases:
        rc, out, err = run_fit(capsys, "--features", str(feats), *extra)
        assert rc == 2 and what in err and why in err and err.count("\n") == 0, (extra, err)
        assert "features:" not in out  # nothing trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "plain.txt"]


# -- 9c. --export does not overwrite --------------------------------------------------------------------------
def test_export_refuses_to_overwrite(small_head, tmp_path, capsys):
    head, _ = small_head
    head.save(tmp_path / "head")
    target = tmp_path / "model.keras"
    target.write_text("keep me")
    rc = predict_cli.main(["--head", str(tmp_path / "head"), "--export", str(target)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"catfeat predict: error: {target} exists; pass --force (overwrite=True) " \
                              "to replace it"
    assert target.read_text() == "keep me"
    with pytest.raises(FileExistsError):
        predict_cli.export(head.model_, target)
    assert "model" in predict_cli.export(head.model_, target, overwrite=True)
    assert target.read_bytes()[:2] == b"PK"  # a .keras zip


# -- 9d. random backbone weights are refused unless asked ---------------------------------------------------
def test_random_weights_are_refused_unless_asked(small_head, tmp_path, capsys):
    from catfeat.models.weights import WeightsError
    from catfeat.predict import build_predictor, resolve_weights

    head, _ = small_head
    head.save(tmp_path / "head")
    (tmp_path / "head" / "weights.json").write_text(json.dumps({MODEL: "none(seed=0)"}))
    with pytest.raises(WeightsError, match=r"random weights \(EfficientNetLite0: none\(seed=0\)\).*no ImageNet "
                                           r"knowledge.*meaningless.*--allow-random-weights"):
        build_predictor(tmp_path / "head", features_dir=None)
    with pytest.raises(WeightsError, match="random weights"):
        resolve_weights(tmp_path / "head", [MODEL], weights="none", features_dir=None)
    assert resolve_weights(tmp_path / "head", [MODEL], features_dir=None, allow_random=True) == {MODEL: (None, 0)}
    img = tmp_path / "1.jpg"
    img.write_bytes(b"")
    rc = predict_cli.main(["--head", str(tmp_path / "head"), "--features", str(tmp_path), str(img)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "meaningless" in err
    # ImageNet weights pass
    (tmp_path / "head" / "weights.json").write_text(json.dumps({MODEL: "imagenet"}))
    assert resolve_weights(tmp_path / "head", [MODEL], features_dir=None) == {MODEL: ("imagenet", 0)}
