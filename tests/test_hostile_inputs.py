"""Hostile inputs, with real files: undecodable file names, FIFOs and links to them, mixed layouts,
huge images in the decode pool, 32-bit TIFFs, and skip lines printed once."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from catfeat.images.listing import ByteBudget, DecodeError, ImageSetError, list_images, read_rgb
from catfeat.images.reader import iter_batches
from catfeat.cache.store import load_features, open_cache

from conftest import REPO, make_kaggle, save_image

MODEL = "lite0" if importlib.util.find_spec("catfeat.models.lite") else "r50"
CACHE = "gap_EfficientNetLite0.h5" if MODEL == "lite0" else "gap_ResNet50.h5"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
BAD = os.fsdecode(b"cat.13.\xff.jpg")  # not valid UTF-8: Python reads it with a surrogate escape
BAD_EMPTY = os.fsdecode(b"cat.14.\xfe.jpg")


def run(module, *args, timeout=240):
    """A catfeat CLI in a subprocess; a hang fails the test (TimeoutExpired) instead of blocking it."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def extract(data, out, *extra, timeout=240):
    return run("catfeat.extract", data, "--models", MODEL, "--weights", "none", "--out", out,
               "--batch-size", "4", "--no-progress", *extra, timeout=timeout)


def once(text, line):
    assert text.count(line) == 1, f"{line!r} appears {text.count(line)} times in:\n{text}"


@pytest.fixture
def bad_names(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=1, size=(24, 24))
    save_image(data / "train" / BAD, 7, (24, 24))
    (data / "train" / BAD_EMPTY).write_bytes(b"")
    return data


# -- 1. a file name that is not valid UTF-8 ---------------------------------------------------------
def test_undecodable_name_is_one_row_that_round_trips(bad_names, tmp_path):
    out = tmp_path / "f"
    r = extract(bad_names, out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and not (out / (CACHE + ".partial")).exists()
    cache = open_cache(out / CACHE)
    assert f"train/{BAD}" in list(cache.names("train"))  # the same str os.listdir gives
    assert (bad_names / cache.names("train")[list(cache.names("train")).index(f"train/{BAD}")]).is_file()
    assert [s["path"] for s in cache.skipped()] == [f"train/{BAD_EMPTY}"]
    once(r.stdout + r.stderr, f"skipped {f'train/{BAD_EMPTY}'!r}: empty file (0 bytes)")
    assert "9 images processed; 1 skipped" in r.stdout  # 7 train + 1 test + 2 odd names, one unreadable
    again = extract(bad_names, out)
    assert again.returncode == 0 and "reused: " in again.stdout, again.stderr
    # fit reads the names, trains, and writes them back out byte for byte
    from catfeat.cli import fit

    oof = tmp_path / "oof.csv"
    assert fit.main(["--models", MODEL, "--features", str(out), "--cv", "2", "--epochs", "2",
                     "--oof", str(oof)]) == 0
    assert b"cat.13.\xff.jpg" in oof.read_bytes()
    X, y, names = load_features(MODEL, out)
    assert len(names) == 7 and f"train/{BAD}" in names


def test_undecodable_name_with_the_ray_engine(bad_names, tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    out = tmp_path / "f"
    r = extract(bad_names, out, "--engine", "ray", "--shards", "2", timeout=400)
    if r.returncode != 0 and "cannot start or reach" in r.stderr:
        pytest.skip(f"Ray cannot start here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr
    cache = open_cache(out / CACHE)
    assert f"train/{BAD}" in list(cache.names("train"))
    assert [s["path"] for s in cache.skipped()] == [f"train/{BAD_EMPTY}"]
    once(r.stdout + r.stderr, f"skipped {f'train/{BAD_EMPTY}'!r}: ")


# -- 5. FIFOs and links to them are never opened ------------------------------------------------------
def special_files(train):
    os.mkfifo(train / "fifo")
    os.symlink(train / "fifo", train / "cat.5.jpg")  # a link to a FIFO, named like an image
    os.mkfifo(train / "cat.6.jpg")  # a FIFO named like an image
    return ["train/cat.5.jpg", "train/cat.6.jpg"]


def test_fifos_are_reported_once_not_opened(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=1, size=(24, 24))
    skipped = special_files(data / "train")
    (data / "train" / "cat.7.jpg").write_text("not an image")
    skipped.append("train/cat.7.jpg")
    out = tmp_path / "f"
    r = extract(data, out, timeout=120)
    assert r.returncode == 0, r.stderr
    cache = open_cache(out / CACHE)
    reasons = {s["path"]: s["reason"] for s in cache.skipped()}
    assert sorted(reasons) == skipped
    assert reasons["train/cat.5.jpg"].startswith("not a regular file (FIFO)")
    assert reasons["train/cat.6.jpg"].startswith("not a regular file (FIFO)")
    both = r.stdout + r.stderr
    for name in skipped:  # each skipped file is printed exactly once, live or in the final list
        once(both, f"skipped {name}: ")
    assert "8 images processed; 3 skipped" in r.stdout


def test_read_rgb_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "link.jpg")
    result = {}

    def go():
        for p in (fifo, tmp_path / "link.jpg"):
            try:
                read_rgb(p)
            except DecodeError as e:
                result[p.name] = str(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "read_rgb blocked on a FIFO"
    assert result == {"x.jpg": "not a regular file (FIFO); only image files are read, remove it or rename it",
                      "link.jpg": "not a regular file (FIFO); only image files are read, remove it or rename it"}


def test_predict_reports_a_fifo_instead_of_hanging(tmp_path):
    import catfeat
    from catfeat.predict import record_weights

    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=0, size=(24, 24))
    catfeat.run_extraction(data, MODEL, tmp_path / "f", weights=None, batch_size=4, progress=False)
    X, y, _ = catfeat.load_features(MODEL, tmp_path / "f")
    catfeat.FusedHead(epochs=1, early_stopping=False, random_state=0).fit(X, y).save(tmp_path / "head")
    record_weights(tmp_path / "head", tmp_path / "f")
    folder = tmp_path / "new"
    save_image(folder / "a.jpg", 1, (24, 24))
    os.mkfifo(folder / "b.jpg")
    os.mkfifo(tmp_path / "c.jpg")
    csv = tmp_path / "p.csv"
    r = run("catfeat", "predict", "--head", tmp_path / "head", folder, tmp_path / "c.jpg", "--csv", csv,
            "--allow-random-weights", timeout=120)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    errors = dict(zip(df["file"].map(os.path.basename), df["error"]))
    assert errors["a.jpg"] == ""
    assert errors["b.jpg"].startswith("not a regular file (FIFO)")
    assert errors["c.jpg"].startswith("not a regular file (FIFO)")


# -- 6. mixed layouts ---------------------------------------------------------------------------------
def test_flat_images_beside_a_subfolder_are_refused(tmp_path):
    root = tmp_path / "flat"
    for k in range(2):
        save_image(root / f"cat.{k}.jpg", k, (16, 16))
        save_image(root / f"dog.{k}.jpg", 10 + k, (16, 16))
    save_image(root / "extra" / "x.jpg", 20, (16, 16))
    with pytest.raises(ImageSetError, match=r"mixes 4 loose image\(s\) \(e.g. 'cat.0.jpg'\) with 1 subfolder\(s\) "
                                            r"of images \(e.g. 'extra/'\)"):
        list_images(root)
    r = extract(root, tmp_path / "f", timeout=120)
    assert r.returncode == 2 and "mixes 4 loose image(s)" in r.stderr and "Traceback" not in r.stderr
    (root / "extra").rename(root / ".extra")  # hidden subfolders are ignored
    images = list_images(root)
    assert images.layout == "flat" and len(images) == 4


def test_class_folders_under_train(tmp_path):
    root = tmp_path / "d"
    for k in range(2):
        save_image(root / "train" / "cat" / f"{k}.jpg", k, (16, 16))
        save_image(root / "train" / "dog" / f"{k}.jpg", 10 + k, (16, 16))
    save_image(root / "test" / "1.jpg", 30, (16, 16))
    images = list_images(root)
    assert images.names == ["train/cat/0.jpg", "train/cat/1.jpg", "train/dog/0.jpg", "train/dog/1.jpg", "test/1.jpg"]
    assert images.labels.tolist() == [0, 0, 1, 1, -1] and images.classes == ["cat", "dog"]
    save_image(root / "train" / "cat.9.jpg", 9, (16, 16))
    with pytest.raises(ImageSetError, match="mixes 1 loose image"):
        list_images(root)
    (root / "train" / "cat.9.jpg").unlink()
    save_image(root / "test" / "cat" / "2.jpg", 31, (16, 16))
    with pytest.raises(ImageSetError, match="test images are unlabelled"):
        list_images(root)


def test_loose_images_beside_train_and_test_are_refused_not_ignored(tmp_path):
    root = make_kaggle(tmp_path / "d", n_per_class=2, n_test=1, size=(16, 16))
    save_image(root / "cat.99.jpg", 99, (16, 16))
    with pytest.raises(ImageSetError, match=r"holds 1 loose image\(s\) \(e.g. 'cat.99.jpg'\) beside train/ and test/"):
        list_images(root)
    r = extract(root, tmp_path / "f", timeout=120)
    assert r.returncode == 2 and "beside train/ and test/" in r.stderr and "Traceback" not in r.stderr
    (root / "cat.99.jpg").rename(root / ".cat.99.jpg")  # hidden: ignored
    assert len(list_images(root)) == 5


# -- 9a. bytes of full-size images in the decode pool -------------------------------------------------
def test_decode_pool_is_bounded_by_bytes(tmp_path):
    paths = [save_image(tmp_path / f"big{k}.png", k, (400, 300)) for k in range(6)]
    paths.insert(3, save_image(tmp_path / "huge.png", 9, (800, 600)))  # alone larger than the budget
    one = 400 * 300 * 4
    budget = ByteBudget(int(1.5 * one))  # room for one 400x300 image at a time
    seen = []
    batches = list(iter_batches(paths, [32], batch_size=2, workers=4, budget=budget))
    for b in batches:
        seen += b.ok.tolist()
    assert all(seen) and len(seen) == 7
    assert budget.used == 0  # everything released
    assert budget.peak == 800 * 600 * 4  # the huge one ran, alone; never two at once
    free = ByteBudget(10 * 800 * 600 * 4)
    list(iter_batches(paths, [32], batch_size=2, workers=4, budget=free))
    assert free.peak >= 800 * 600 * 4


# -- 9b. 32-bit float and integer TIFFs ---------------------------------------------------------------
@pytest.mark.parametrize("mode,values,want", [
    ("F", np.linspace(0.0, 1.0, 64, dtype=np.float32), 127.5),  # floats in [0, 1]
    ("F", np.linspace(0.0, 255.0, 64, dtype=np.float32), 127.5),  # floats in 0..255
    ("I", np.linspace(0, 2**31 - 1, 64).astype(np.int32), 127.5),  # full 32-bit range
    ("I", np.linspace(0, 65535, 64).astype(np.int32), 127.5),  # 16-bit range in a 32-bit file
])
def test_32bit_tiffs_are_scaled(tmp_path, mode, values, want):
    arr = np.tile(values, (16, 1))
    path = tmp_path / "x.tif"
    Image.fromarray(arr, mode=mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    rgb = np.asarray(read_rgb(path))
    assert abs(rgb.mean() - want) < 3, rgb.mean()  # not black, not washed out
    assert rgb.min() <= 2 and rgb.max() >= 253
