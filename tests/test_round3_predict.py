"""Issue 22, predict and saved heads: predict repeats how the cached features were made (decoder,
TTA, ...), refuses a tampered head in one line, and refuses image arguments that name no file.

Real files throughout: caches written by the extract CLI, heads written by ``fit --save`` and then
edited, a glob pattern passed to a real ``catfeat.predict`` process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, make_kaggle

MODEL = "lite0"
NAME = "EfficientNetLite0"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# extraction variants: each changes the feature values of every image
VARIANTS = {"pillow": ["--decoder", "pillow"], "flip": ["--tta", "flip"]}


def cli(main, *args, timeout: float = 600) -> int:
    """A CLI's ``main(argv)`` in this process, on a thread: a hang fails the test instead of blocking it."""
    box: dict = {}

    def go():
        try:
            box["rc"] = main([str(a) for a in args])
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            box["error"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{args} did not finish in {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["rc"]


def run_predict(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m catfeat predict`` in a real process, with a timeout."""
    return subprocess.run([sys.executable, "-m", "catfeat", "predict", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Images larger than the input size (so that the decoders' resizes differ), one cache per
    variant, and a head saved by ``fit --save`` on each.

    ImageNet weights (lite0's ship with the package, offline): with random weights (``--weights
    none``) lite0's GAP features are ~1e-12, so every head answers the same for every image and a
    1e-5 comparison of predictions could not fail."""
    from catfeat.cli.extract import main as extract_main
    from catfeat.cli.fit import main as fit_main

    root = tmp_path_factory.mktemp("round3")
    data = make_kaggle(root / "data", n_per_class=5, n_test=2, size=(320, 280))
    out = {"root": root, "data": data}
    for variant, flags in VARIANTS.items():
        feats, head = root / f"f_{variant}", root / f"head_{variant}"
        assert cli(extract_main, data, "--models", MODEL, "--weights", "imagenet", "--features", feats, "--batch-size", "4", "--no-progress", "-q", *flags) == 0
        assert cli(fit_main, "--models", MODEL, "--features", feats, "--epochs", "3", "--save", head, "-q") == 0
        out[variant] = (feats, head)
    return out


def cached_predictions(head_dir, feats) -> dict[str, np.ndarray]:
    """The head applied to the cached features: {image name: probabilities}."""
    import catfeat

    head = catfeat.FusedHead.load(head_dir)
    out = {}
    for split in ("train", "test"):
        X, _, names = catfeat.load_features(MODEL, feats, split=split)
        out.update(zip(names, head.predict_proba(X)))
    return out


# -- 1. predict repeats the caches' decoder and TTA ------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predict_repeats_how_the_features_were_made(made, variant, tmp_path, capsys):
    from catfeat.predict import UnrecordedFeaturesWarning, predict_images
    from catfeat.cli.predict import main

    data, (feats, head_dir) = made["data"], made[variant]
    recorded = json.loads((head_dir / "head.json").read_text())["features"]
    assert recorded[NAME]["weights"] == "imagenet"
    assert recorded[NAME]["decoder"] == ("pillow" if variant == "pillow" else "opencv")
    assert recorded[NAME]["tta"] == ("flip" if variant == "flip" else "none")
    assert recorded[NAME]["input_size"] == 224 and recorded[NAME]["dtype"] == "float32"

    expected = cached_predictions(head_dir, feats)
    csv = tmp_path / "p.csv"
    alone = tmp_path / "head"
    shutil.copytree(head_dir, alone)
    (alone / "weights.json").unlink()  # head.json alone says how (no --features caches either)
    # a quoted glob (expanded by predict) and a folder
    rc = cli(main, "--head", alone, "--features", tmp_path / "nothing", str(data / "train" / "*.jpg"),
             data / "test", "--out", csv, "-q")
    err = capsys.readouterr().err
    assert rc == 0 and "warning" not in err, err
    df = pd.read_csv(csv)
    got = {os.path.relpath(f, data): row for f, row in zip(df["file"], df[["p_cat", "p_dog"]].to_numpy())}
    assert sorted(got) == sorted(expected) and len(got) == 12
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)

    # the same head without the record (as saved before it existed): today's defaults, one warning,
    # and, as these caches were not made with the defaults, other predictions
    legacy = tmp_path / "legacy"
    shutil.copytree(head_dir, legacy)
    meta = json.loads((legacy / "head.json").read_text())
    del meta["features"]
    (legacy / "head.json").write_text(json.dumps(meta))
    files = [data / n for n in expected]
    with pytest.warns(UnrecordedFeaturesWarning, match="does not record how its features were made"):
        old = predict_images(legacy, files, features_dir=feats)
    diff = np.abs(old[["p_cat", "p_dog"]].to_numpy() - np.array([expected[n] for n in expected]))
    assert (diff.max(axis=1) > 1e-5).sum() >= len(files) // 2, diff


def test_legacy_head_warns_in_one_line(made, tmp_path, capsys):
    from catfeat.cli.predict import main

    data, (feats, head_dir) = made["data"], made["flip"]
    legacy = tmp_path / "legacy"
    shutil.copytree(head_dir, legacy)
    meta = json.loads((legacy / "head.json").read_text())
    del meta["features"]
    (legacy / "head.json").write_text(json.dumps(meta))
    csv = tmp_path / "p.csv"
    rc = cli(main, "--head", legacy, data / "test", "--out", csv, "-q")
    err = capsys.readouterr().err.strip()
    assert rc == 0 and err.count("\n") == 0, err
    assert err.startswith(f"catfeat.predict: warning: {legacy / 'head.json'} does not record how its features "
                          "were made") and "re-save it with catfeat fit --save" in err
    assert len(pd.read_csv(csv)) == 2
    # record_features upgrades it from the caches: no warning, the cached path's predictions
    import warnings

    from catfeat.predict import UnrecordedFeaturesWarning, predict_images, record_features

    record_features(legacy, feats)
    expected = cached_predictions(head_dir, feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnrecordedFeaturesWarning)
        df = predict_images(legacy, [data / "test" / "1.jpg"], features_dir=None)
    np.testing.assert_allclose(df[["p_cat", "p_dog"]].to_numpy()[0], expected["test/1.jpg"], atol=1e-5)


def test_a_decoder_that_is_not_installed_is_refused(made, monkeypatch, capsys):
    from catfeat.cli.predict import main

    data, (_, head_dir) = made["data"], made["flip"]  # extracted with the default decoder, OpenCV
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails, as where it is not installed
    rc = cli(main, "--head", head_dir, data / "test")
    err = one_error_line(capsys)
    assert rc == 2 and str(head_dir / "head.json") in err, err
    assert "the features of EfficientNetLite0 were decoded by 'opencv', whose module 'cv2' is not installed" in err


# -- 2. a tampered head is one line naming the file ------------------------------------------------------------
def _edit(meta: dict, **changes) -> dict:
    return {**meta, **changes}


TAMPER = {
    "more class names than outputs": (
        lambda d: _write_meta(d, lambda m: _edit(m, classes=["cat", "dog", "bird"])),
        "head.json", "lists 3 classes ['cat', 'dog', 'bird'], but"),
    "one class name": (
        lambda d: _write_meta(d, lambda m: _edit(m, classes=["cat"])),
        "head.json", "'classes' must be a list of at least 2 class labels"),
    "a class named twice": (
        lambda d: _write_meta(d, lambda m: _edit(m, classes=["cat", "cat"])),
        "head.json", "'classes' names a class twice"),
    "widths that are not the model's": (
        lambda d: _write_meta(d, lambda m: _edit(m, dims=[1000])),
        "head.json", "says the head reads 1 input(s) of widths [1000], but"),
    "an unknown parameter": (
        lambda d: _write_meta(d, lambda m: _edit(m, params={**m["params"], "colour": "blue"})),
        "head.json", "'params' holds unknown key(s) ['colour'], not parameters of FusedHead"),
    "broken JSON": (
        lambda d: (d / "head.json").write_text((d / "head.json").read_text()[:-40]),
        "head.json", "is not valid JSON ("),
    "a JSON list": (
        lambda d: (d / "head.json").write_text("[1, 2]"),
        "head.json", "holds a JSON list, not an object"),
    "missing head.keras": (
        lambda d: (d / "head.keras").unlink(),
        "", "holds no saved head: head.keras missing"),
    "another head's head.keras": (
        lambda d: shutil.copy(d.parent / "other" / "head.keras", d / "head.keras"),
        "head.keras", "is not the model saved with"),
    "damaged head.keras": (
        lambda d: (d / "head.keras").write_bytes((d / "head.keras").read_bytes()[:300]),
        "head.keras", "is not the model saved with"),
    "a damaged head.keras without a digest": (
        lambda d: (_write_meta(d, lambda m: {k: v for k, v in m.items() if k != "model_sha256"}),
                   (d / "head.keras").write_bytes(b"PK\x03\x04 not a zip")),
        "head.keras", "cannot be loaded as a Keras model"),
    "an unknown decoder": (
        lambda d: _write_meta(d, lambda m: _edit(m, features={NAME: {**m["features"][NAME], "decoder": "turbo"}})),
        "head.json", "were decoded by 'turbo', which is not one of opencv, pillow"),
    "another input size": (
        lambda d: _write_meta(d, lambda m: _edit(m, features={NAME: {**m["features"][NAME], "input_size": 300}})),
        "head.json", "were made at input size 300 and EfficientNetLite0 takes 224"),
}


def _write_meta(d, change) -> None:
    (d / "head.json").write_text(json.dumps(change(json.loads((d / "head.json").read_text()))))


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_head_is_one_line_naming_the_file(made, case, tmp_path, capsys):
    from catfeat.cli.predict import main

    tamper, file, what = TAMPER[case]
    head = tmp_path / "head"
    shutil.copytree(made["pillow"][1], head)
    shutil.copytree(made["flip"][1], tmp_path / "other")  # same shapes, other weights
    tamper(head)
    rc = cli(main, "--head", head, made["data"] / "test", timeout=300)
    err = one_error_line(capsys)
    assert rc == 2 and err.startswith("catfeat predict: error: "), err
    assert str(head / file) in err and what in err, err


def test_untouched_copy_of_a_saved_head_loads(made, tmp_path):
    """The tampering cases above start from a head that loads: the failures are theirs."""
    import catfeat

    shutil.copytree(made["pillow"][1], tmp_path / "head")
    head = catfeat.FusedHead.load(tmp_path / "head")
    assert head.feature_recipes_[NAME]["decoder"] == "pillow" and list(head.classes_) == ["cat", "dog"]


# -- 3. image arguments that name no file -------------------------------------------------------------------------
def test_pattern_matching_nothing_exits_2(made, tmp_path):
    head = made["pillow"][1]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    pattern = str(tmp_path / "*.jpg")
    r = run_predict("--head", head, pattern, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"catfeat predict: error: {pattern!r} matches no file: "
                                                 "nothing predicted; check the names")
    assert r.stdout == ""
    # a glob that matches, beside a literal path that does not exist and a folder without images
    some = str(made["data"] / "test" / "*.jpg")
    missing = made["data"] / "test" / "99.jpg"
    r = run_predict("--head", head, some, missing, empty, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"catfeat predict: error: {str(missing)!r} does not exist; folder {str(empty)!r} holds no image "
        "file (.jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, .tiff): nothing predicted; check the names")
