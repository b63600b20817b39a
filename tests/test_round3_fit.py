"""Hostile input, round three: fit, submissions and labels, with real files.

Real extractions (``--weights none``) of folders holding an unreadable test image, a test image
whose id does not fit int64, class folders differing in case and training images whose names are
not valid UTF-8; real tampered HDF5 caches; a real FIFO; every CLI in a subprocess with a timeout.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from catfeat.head.scoring import submission_ids, write_submission
from catfeat.head.estimator import FusedHead
from catfeat.cache.store import CacheError, load_features, open_cache, write_cache
from catfeat.cache.rows import CacheRows

from conftest import REPO, make_kaggle, real_data, save_image

MODEL = "lite0" if importlib.util.find_spec("catfeat.models.lite") else "r50"
FULL = "EfficientNetLite0" if MODEL == "lite0" else "ResNet50"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FAST = ["--preset", "reference", "--epochs", "1", "--batch-size", "32"]
HUGE = "99999999999999999999"  # > 2**63: no int64 holds it
BAD_NAMES = [os.fsdecode(b"cat.9001.\xf1.png"), os.fsdecode(b"dog.9002.\xf2.png"), os.fsdecode(b"cat.9003.\xf3.png")]


def run(*args, timeout=180):
    """``python -m catfeat ...`` in a subprocess; a hang fails the test (TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, env=ENV, timeout=timeout)


def err_of(r) -> str:
    return r.stderr.decode("utf-8", "surrogateescape")


def error_line(r) -> str:
    """The last stderr line, after checking that it is the only error and no traceback."""
    err = err_of(r)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def extract(data, out, weights="none"):
    r = run("catfeat.extract", data, "--models", MODEL, "--weights", weights, "--out", out, "--batch-size", "4",
            "--no-progress")
    assert r.returncode == 0, err_of(r)
    return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def kaggle_feats(tmp_path_factory):
    """A real Kaggle folder, extracted with random weights: an empty test/2.jpg and a test image whose
    id exceeds int64."""
    root = tmp_path_factory.mktemp("round3")
    data = make_kaggle(root / "data", n_per_class=6, n_test=3, size=(32, 24))
    (data / "test" / "2.jpg").write_bytes(b"")  # unreadable: skipped at extraction
    save_image(data / "test" / f"{HUGE}.jpg", 7, (32, 24))
    save_image(data / "test" / "10.jpg", 8, (32, 24))
    return extract(data, root / "f")


def small_caches(folder, n=40, n_test=4, classes=("cat", "dog"), seed=0):
    """A small real cache (written by catfeat's own writer) with class-dependent features."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    names = [f"train/{classes[v]}.{i}.jpg" for i, v in enumerate(y)]
    write_cache(folder / "gap_EfficientNetLite0.h5", "EfficientNetLite0", rng.normal(size=(n, 6)) + 2.0 * y[:, None],
                y, names, rng.normal(size=(n_test, 6)), [f"test/{i + 1}.jpg" for i in range(n_test)], classes=classes)
    return folder, names


# -- 1. the positive class is found by name --------------------------------------------------------------
def test_submission_is_p_dog_whatever_the_case_of_the_class_folders(tmp_path):
    # Random-weight features carry nothing, so the head learns the class prior: twice as many Dog
    # images make P(Dog) > 1/2 and P(cat) < 1/2 for every test image.
    data = tmp_path / "data"
    for k in range(8):
        save_image(data / "train" / "Dog" / f"{k}.jpg", 10 + k, (32, 24))
    for k in range(4):
        save_image(data / "train" / "cat" / f"{k}.jpg", 20 + k, (32, 24))
    for k in range(1, 4):
        save_image(data / "test" / f"{k}.jpg", 30 + k, (32, 24))
    feats = extract(data, tmp_path / "f")
    assert open_cache(feats / f"gap_{FULL}.h5").classes == ["Dog", "cat"]  # sorted case-sensitively: Dog first
    sub, head_dir = tmp_path / "sub.csv", tmp_path / "head"
    r = run("catfeat", "fit", "--features", feats, "--submission", sub, "--save", head_dir, "--clip", "0",
            "--preset", "reference", "--epochs", "40", "--learning-rate", "0.05")
    assert r.returncode == 0, err_of(r)
    head = FusedHead.load(head_dir)
    Xt, _, names = load_features(MODEL, feats, "test")
    p = head.predict_proba(Xt)[:, list(head.classes_).index("Dog")]
    rows = read_csv(sub)
    assert list(rows[0]) == ["id", "label"]
    want = {int(n.split("/")[-1].split(".")[0]): v for n, v in zip(names, p)}
    assert {int(r["id"]): float(r["label"]) for r in rows} == pytest.approx(want, abs=1e-6)
    assert (p > 0.55).all()  # the prior of Dog, not of cat: the check above can fail


def test_classes_without_a_dog_need_positive_class(tmp_path):
    feats, _ = small_caches(tmp_path / "f", classes=("bird", "fish"))
    sub = tmp_path / "sub.csv"
    r = run("catfeat", "fit", "--features", feats, "--submission", sub, *FAST)
    line = error_line(r)
    assert r.returncode == 2 and not sub.exists()
    assert "'bird', 'fish'" in line and "--positive-class NAME" in line
    r = run("catfeat", "fit", "--features", feats, "--submission", sub, "--positive-class", "Trout", *FAST)
    assert r.returncode == 2 and "--positive-class 'Trout' is not one of" in error_line(r) and not sub.exists()
    r = run("catfeat", "fit", "--features", feats, "--submission", sub, "--positive-class", "fish",
            "--save", tmp_path / "head", "--clip", "0", *FAST)
    assert r.returncode == 0, err_of(r)
    head = FusedHead.load(tmp_path / "head")
    Xt, _, _ = load_features(MODEL, feats, "test")
    p_fish = head.predict_proba(Xt)[:, list(head.classes_).index("fish")]
    assert [float(r["label"]) for r in read_csv(sub)] == pytest.approx(p_fish.tolist(), abs=1e-6)


def test_fit_report_positive_class_from_python(tmp_path):
    import catfeat

    feats, _ = small_caches(tmp_path / "f", classes=("Dog", "cat"))
    kw = dict(head=FusedHead(preset="reference", epochs=1), clip=0, refit=False)
    rep = catfeat.fit_report("lite0", feats, submission=tmp_path / "a.csv", **kw)
    p_dog = rep.head.predict_proba(load_features("lite0", feats, "test")[0])[:, list(rep.head.classes_).index("Dog")]
    assert [float(r["label"]) for r in read_csv(tmp_path / "a.csv")] == pytest.approx(p_dog.tolist(), abs=1e-6)
    rep = catfeat.fit_report("lite0", feats, submission=tmp_path / "b.csv", positive_class="cat", **kw)
    p_cat = rep.head.predict_proba(load_features("lite0", feats, "test")[0])[:, list(rep.head.classes_).index("cat")]
    assert [float(r["label"]) for r in read_csv(tmp_path / "b.csv")] == pytest.approx(p_cat.tolist(), abs=1e-6)
    feats2, _ = small_caches(tmp_path / "g", classes=("Dog", "dog"))
    with pytest.raises(ValueError, match="2 classes are called dog.*--positive-class NAME"):
        catfeat.fit_report("lite0", feats2, submission=tmp_path / "c.csv", **kw)
    assert not (tmp_path / "c.csv").exists()


# -- 2. a submission covers every test image; 4. ids beyond int64 ------------------------------------------
def test_skipped_test_image_stops_the_submission_unless_filled(kaggle_feats, tmp_path):
    skipped = [s for s in open_cache(kaggle_feats / f"gap_{FULL}.h5").skipped() if s["path"].startswith("test/")]
    assert [s["path"] for s in skipped] == ["test/2.jpg"]  # really skipped by the extraction
    sub = tmp_path / "sub.csv"
    r = run("catfeat", "fit", "--features", kaggle_feats, "--submission", sub, *FAST)
    line = error_line(r)
    assert r.returncode == 2 and not sub.exists() and b"features:" not in r.stdout  # before training
    assert "1 of 5 test images" in line and "test/2.jpg (empty file (0 bytes))" in line
    assert "--fill-missing P" in line

    r = run("catfeat", "fit", "--features", kaggle_feats, "--submission", sub, "--fill-missing", "0.5", *FAST)
    assert r.returncode == 0, err_of(r)
    warn = [ln for ln in err_of(r).splitlines() if "warning:" in ln]
    assert len(warn) == 1 and "test/2.jpg" in warn[0] and "--fill-missing" in warn[0]
    rows = read_csv(sub)
    ids = [int(r["id"]) for r in rows]
    assert ids == sorted([1, 2, 3, 10, int(HUGE)])  # every test image, numerically sorted, the huge id intact
    assert rows[-1]["id"] == HUGE
    assert float(rows[ids.index(2)]["label"]) == 0.5
    assert all(0 < float(r["label"]) < 1 for r in rows)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_fill_missing_must_be_a_probability(value, tmp_path, capsys):
    from catfeat.cli.main import main

    with pytest.raises(SystemExit) as e:  # argument parsing: nothing is loaded
        main(["fit", "--features", str(tmp_path), "--submission", str(tmp_path / "s.csv"), f"--fill-missing={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "argument --fill-missing: expected a" in err and not (tmp_path / "s.csv").exists()


def test_ids_beyond_int64_sort_numerically(tmp_path):
    names = [f"test/{HUGE}.jpg", "test/10.jpg", "test/9.jpg", f"test/{int(HUGE) - 1}.jpg"]
    assert submission_ids(names).tolist() == [int(HUGE), 10, 9, int(HUGE) - 1]
    df = write_submission(tmp_path / "s.csv", names, np.array([0.1, 0.2, 0.3, 0.4]), clip=0)
    assert df["id"].tolist() == [9, 10, int(HUGE) - 1, int(HUGE)]
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "id,label", "9,0.3", "10,0.2", f"{int(HUGE) - 1},0.4", f"{HUGE},0.1"]
    with pytest.raises(ValueError, match="give the same id 7"):
        submission_ids(["test/7.jpg", "test/007.jpg"])


# -- 3. labels are checked against the cache's classes ---------------------------------------------------
@pytest.mark.parametrize("bad, dtype", [(3, np.int64), (10 ** 8, np.int64), (2 ** 63 - 1, np.int64),
                                        (2 ** 63, np.uint64), (-5, np.int64)])
def test_labels_outside_the_classes_are_refused(bad, dtype, tmp_path):
    feats, names = small_caches(tmp_path / "f")
    path = feats / "gap_EfficientNetLite0.h5"
    with h5py.File(path, "r+") as f:  # tampered after writing, as an editor or another tool would
        labels = f["label"][()].astype(dtype)
        labels[5] = bad
        del f["label"]
        f.create_dataset("label", data=labels)
    match = f"gap_EfficientNetLite0.h5: label {bad} of 'train/dog.5.jpg'"
    with pytest.raises(CacheError, match=match):
        load_features("lite0", feats)
    with pytest.raises(CacheError, match=match):
        CacheRows.open("lite0", feats)  # the streaming path reads the labels the same way
    if bad == 10 ** 8:  # the CLI, once: one line, exit 2 (it used to build a 1e8-entry class list)
        r = run("catfeat", "fit", "--features", feats, *FAST, timeout=120)
        line = error_line(r)
        assert r.returncode == 2 and str(bad) in line and "gap_EfficientNetLite0.h5" in line and "classes" in line


def test_labels_of_a_cache_without_class_names_are_bounded_by_its_rows(tmp_path):
    feats, _ = small_caches(tmp_path / "f")
    path = feats / "gap_EfficientNetLite0.h5"
    with h5py.File(path, "r+") as f:
        del f.attrs["classes"]
        f["label"][7] = 10 ** 8
    with pytest.raises(CacheError, match="label 100000000 .* records no class names"):
        load_features("lite0", feats)


# -- 5. library errors name the flag -------------------------------------------------------------------
def _cli_cases(tmp_path):
    feats, names = small_caches(tmp_path / "f", n=40)
    tiny, _ = small_caches(tmp_path / "tiny", n=6)  # 3 rows per class
    everything = tmp_path / "all.txt"
    everything.write_text("\n".join(names) + "\n")
    cats = tmp_path / "cats.txt"
    cats.write_text("\n".join(n for n in names if "/cat." in n) + "\n")
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    return {
        "val-split": (["fit", "--features", feats, "--val-split", "0.9999"], "--val-split 0.9999"),
        "clip-auto": (["fit", "--features", tiny, "--clip", "auto"], "--clip auto"),
        "exclude-all": (["fit", "--features", feats, "--exclude", everything], f"--exclude {everything}"),
        "exclude-class": (["fit", "--features", feats, "--exclude", cats], "leaves only rows of class dog"),
        "out-dir": (["compare", "--features", feats, "--out-dir", a_file], f"--out-dir (out_dir) {a_file}"),
        "cv0": (["fit", "--features", feats, "--cv", "0"], "argument --cv"),
        "cv1": (["compare", "--features", feats, "--cv", "1"], "argument --cv"),
        "cv-negative": (["fit", "--features", feats, "--cv", "-3"], "argument --cv"),
        "cv-big": (["fit", "--features", tiny, "--cv", "4"], "--cv 4 needs at least 4 training rows"),
    }


@pytest.mark.parametrize("case", ["val-split", "clip-auto", "exclude-all", "exclude-class", "out-dir", "cv0", "cv1",
                                  "cv-negative", "cv-big"])
def test_bad_values_are_one_line_naming_the_flag(case, tmp_path):
    argv, flag = _cli_cases(tmp_path)[case]
    r = run("catfeat", *argv, *FAST, timeout=120)
    assert r.returncode == 2, err_of(r)
    assert flag in error_line(r)
    assert b"features:" not in r.stdout  # refused before any training


def test_fit_report_refuses_cv_below_two_from_python(tmp_path):
    import catfeat

    feats, _ = small_caches(tmp_path / "f")
    for cv in (0, 1, -2):
        with pytest.raises(ValueError, match=f"--cv {cv}: K-fold CV needs K >= 2"):
            catfeat.fit_report("lite0", feats, cv=cv, head=FusedHead(preset="reference", epochs=1))


# -- 6. the outliers CSV round-trips into fit --exclude; 8. outliers refuses random weights -----------------
def test_outliers_refuses_random_weights_unless_asked(kaggle_feats, tmp_path):
    out = tmp_path / "o.csv"
    r = run("catfeat", "outliers", "--features", kaggle_feats, "--out", out)
    line = error_line(r)
    assert r.returncode == 2 and not out.exists()
    assert "random weights" in line and f"{FULL}: none(seed=" in line and "--allow-random-weights" in line
    r = run("catfeat", "outliers", "--features", kaggle_feats, "--out", out, "--allow-random-weights")
    assert r.returncode == 0 and out.is_file(), err_of(r)


def test_outliers_csv_with_undecodable_names_round_trips_into_exclude(tmp_path):
    """Real photos plus planted non-animal images whose names are not valid UTF-8, ImageNet weights."""
    import shutil

    from PIL import Image, ImageDraw

    if MODEL != "lite0":
        pytest.skip("needs the Lite0 ImageNet weights")
    src, train = real_data("original"), tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for k in range(5):
        shutil.copy(src / f"cat.{k}.jpg", train / f"cat.{k}.jpg")
        shutil.copy(src / f"dog.{1000 + k}.jpg", train / f"dog.{1000 + k}.jpg")
    Image.new("RGB", (200, 160), (30, 90, 220)).save(train / BAD_NAMES[0])
    Image.new("RGB", (200, 200), (250, 250, 40)).save(train / BAD_NAMES[1])
    page = Image.new("RGB", (240, 180), "white")
    for i in range(8):
        ImageDraw.Draw(page).text((10, 10 + 20 * i), "INVOICE 2019 total due: $1,234.56", fill="black")
    page.save(train / BAD_NAMES[2])
    feats = extract(tmp_path / "data", tmp_path / "f", weights="imagenet")
    cached = list(open_cache(feats / f"gap_{FULL}.h5").names("train"))
    assert all(f"train/{n}" in cached for n in BAD_NAMES)
    out = tmp_path / "outliers.csv"
    r = run("catfeat", "outliers", "--features", feats, "--out", out)
    assert r.returncode == 0, err_of(r)
    flagged = {row["file"] for row in read_csv(out) if row["flagged"] == "True"}
    assert flagged & {f"train/{n}" for n in BAD_NAMES}, "no undecodable name flagged: the round trip is untested"
    oof = tmp_path / "oof.csv"
    r = run("catfeat", "fit", "--features", feats, "--exclude", out, "--cv", "2", "--oof", oof, *FAST)
    assert r.returncode == 0, err_of(r)
    assert f"excluding {len(flagged)} of {len(cached)} training images" in r.stdout.decode()
    assert {row["name"] for row in read_csv(oof)} == set(cached) - flagged


def test_plain_exclude_list_with_undecodable_names(tmp_path):
    from catfeat.outliers import read_exclude

    name = "train/" + BAD_NAMES[0]
    path = tmp_path / "ex.txt"
    path.write_bytes(b"train/cat.1.jpg\n" + name.encode("utf-8", "surrogateescape") + b"\n")
    assert read_exclude(path) == {"train/cat.1.jpg", name}
    # a CSV whose names look like NaN or numbers stays text
    path.write_bytes(b"file,flagged\nNA,True\n007,true\nnull,False\n")
    assert read_exclude(path) == {"NA", "007"}


# -- 7. --exclude a FIFO -------------------------------------------------------------------------------
def test_exclude_fifo_is_refused_not_read(tmp_path):
    feats, _ = small_caches(tmp_path / "f")
    fifo = tmp_path / "exclude.txt"
    os.mkfifo(fifo)
    for cmd in ("fit", "compare"):
        r = run("catfeat", cmd, "--features", feats, "--exclude", fifo, *FAST, timeout=60)  # a hang fails here
        line = error_line(r)
        assert r.returncode == 2 and f"--exclude {fifo} is not a regular file (FIFO)" in line
    folder = tmp_path / "dir"
    folder.mkdir()
    r = run("catfeat", "fit", "--features", feats, "--exclude", folder, *FAST, timeout=60)
    assert r.returncode == 2 and "is a folder" in error_line(r)
