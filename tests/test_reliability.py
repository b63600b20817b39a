"""Reliability: a messy image folder, kills and Ctrl-C, disk errors, stale/foreign/hostile caches, NaNs."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image

from catfeat.extraction.run import run_extraction
from catfeat.cache.store import CacheError, FeatureWriter, load_features, open_cache, write_cache

from conftest import REPO, make_kaggle, save_image, wait_for_rows

FAST = dict(weights=None, batch_size=4, progress=False)


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "catfeat.extract", *map(str, args)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def png_with_declared_size(path, width, height):
    """A tiny valid PNG header that declares a huge image (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def build_corpus(root):
    """Every kind of odd file in one Kaggle-layout folder. Returns (good names, bad names)."""
    t = root / "train"
    good, bad = [], []

    def ok(name, **kw):
        save_image(t / name, len(good), **kw)
        good.append(f"train/{name}")

    ok("cat.0.jpg")
    ok("dog.0.jpg")
    for k, fmt in enumerate(["PNG", "GIF", "BMP", "WEBP"], start=1):  # other formats named .jpg
        ok(f"cat.{k}.jpg", fmt=fmt)
    ok("dog.1.jpg", mode="L")  # grayscale
    ok("dog.2.jpg", mode="CMYK")
    ok("dog.3.png", mode="RGBA")
    Image.fromarray(np.full((8, 9), 40000, np.uint16)).save(t / "dog.4.png")  # 16-bit
    good.append("train/dog.4.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(t / "dog.5.jpg", exif=exif)  # EXIF-rotated
    good.append("train/dog.5.jpg")
    ok("dog.6.jpg", size=(1, 1))
    ok("dog.7.jpg", size=(3000, 20))  # panorama
    ok("cat.8 ünïcode name.jpg")
    ok("CAT.9.jpg")
    ok("cat.9.jpg")  # same name, different case
    (t / "cat.10.jpg").write_bytes(b"")
    (t / "cat.11.jpg").write_bytes((t / "cat.0.jpg").read_bytes()[:300])
    (t / "cat.12.jpg").write_bytes(np.random.RandomState(0).bytes(5000))
    (t / "cat.13.jpg").write_text("just some text\n")
    png_with_declared_size(t / "cat.14.jpg", 100_000, 100_000)
    (t / "cat.15.jpg").mkdir()
    os.symlink(t / "nowhere.jpg", t / "cat.16.jpg")
    bad += [f"train/cat.{k}.jpg" for k in range(10, 17)]
    return good, bad


def test_bad_input_corpus(tmp_path):
    root = tmp_path / "messy"
    good, bad = build_corpus(root)
    proc = cli(root, "--models", "r50", "--weights", "none", "--out", tmp_path / "f", "--batch-size", "4",
               "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    cache = open_cache(tmp_path / "f" / "gap_ResNet50.h5")
    assert sorted(cache.names("train")) == sorted(good)
    reasons = {s["path"]: s["reason"] for s in cache.skipped()}
    assert sorted(reasons) == sorted(bad)
    for name in bad:
        assert f"skipped {name}: " in out  # every bad file is reported with its reason
    assert "empty" in reasons["train/cat.10.jpg"] and "decompression bomb" in reasons["train/cat.14.jpg"]
    assert "folder" in reasons["train/cat.15.jpg"] and "not found" in reasons["train/cat.16.jpg"]
    assert f"{len(good) + len(bad)} images processed; {len(bad)} skipped" in out
    assert np.isfinite(cache.features()).all()


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    root = make_kaggle(tmp_path / "d", n_per_class=2, n_test=0)
    locked = root / "train" / "cat.0.jpg"
    locked.chmod(0)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root reads any file: make the open fail as it would
        real_open = Image.open

        def open_as_user(fp, *a, **kw):
            if os.fspath(fp) == os.fspath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(fp))
            return real_open(fp, *a, **kw)
        monkeypatch.setattr(Image, "open", open_as_user)
    report = run_extraction(root, "r50", tmp_path / "f", **FAST)
    assert [s["path"] for s in report.skipped] == ["train/cat.0.jpg"]
    assert "permission" in report.skipped[0]["reason"]
    assert report.processed == 4 and len(open_cache(report.paths["ResNet50"]).names("train")) == 3


def test_nothing_usable_is_an_error(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    for k in range(3):
        (root / f"cat.{k}.jpg").write_text("no")
    proc = cli(root, "--models", "r50", "--weights", "none", "--out", tmp_path / "f", "--no-progress")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "none of the 3 images" in err
    assert not (tmp_path / "f" / "gap_ResNet50.h5").exists()


def test_kill_before_and_during_the_final_rename(kaggle_dir, tmp_path, monkeypatch):
    clean = open_cache(run_extraction(kaggle_dir, "r50", tmp_path / "clean", **FAST).paths["ResNet50"])

    def die(*a, **k):
        raise SystemExit("killed")

    out = tmp_path / "f"
    monkeypatch.setattr(os, "replace", die)  # dies after the partial is complete, before the rename
    with pytest.raises(SystemExit):
        run_extraction(kaggle_dir, "r50", out, **FAST)
    monkeypatch.undo()
    assert not (out / "gap_ResNet50.h5").exists()
    with h5py.File(out / "gap_ResNet50.h5.partial", "r") as f:
        assert bool(f.attrs["complete"]) is True  # complete, but under a name no reader opens
    with pytest.raises(CacheError):
        open_cache(out / "gap_ResNet50.h5")
    again = run_extraction(kaggle_dir, "r50", out, **FAST)
    assert again.processed == 0 and again.resumed == {"ResNet50": 11}
    np.testing.assert_array_equal(open_cache(out / "gap_ResNet50.h5").features(), clean.features())


def test_corrupt_partial_starts_over(kaggle_dir, tmp_path):
    out = tmp_path / "f"
    out.mkdir()
    (out / "gap_ResNet50.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # torn write
    report = run_extraction(kaggle_dir, "r50", out, **FAST)
    assert report.processed == 11 and open_cache(report.paths["ResNet50"]).features().shape == (8, 2048)


def test_ctrl_c_exits_cleanly_and_resumes(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=24, n_test=0, size=(24, 24))
    out = tmp_path / "f"
    partial = out / "gap_ResNet50.h5.partial"
    proc = cli(data, "--models", "r50", "--weights", "none", "--out", out, "--batch-size", "2", "--no-progress")
    wait_for_rows(partial, proc, 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert partial.exists() and not (out / "gap_ResNet50.h5").exists()
    proc = cli(data, "--models", "r50", "--weights", "none", "--out", out, "--batch-size", "2", "--no-progress")
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed: ResNet50@" in stdout, err
    assert open_cache(out / "gap_ResNet50.h5").features().shape == (48, 2048)


def test_disk_full_is_a_clear_error(kaggle_dir, tmp_path, monkeypatch):
    def full(self, name, values):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureWriter, "_append", full)
    with pytest.raises(OSError, match="free disk space.*rerun the same command to resume"):
        run_extraction(kaggle_dir, "r50", tmp_path / "f", **FAST)


def test_nan_features_are_refused_at_write_time(kaggle_dir, tmp_path, monkeypatch):
    from catfeat.models import forward as runtime

    real_fetch = runtime.Forward.fetch

    def poisoned(self, handle, n):
        out = real_fetch(self, handle, n).copy()
        out[0, 3] = np.nan
        return out

    monkeypatch.setattr(runtime.Forward, "fetch", poisoned)
    with pytest.raises(FloatingPointError, match="NaN/Inf features for \\['train/cat.0.jpg'\\]"):
        run_extraction(kaggle_dir, "r50", tmp_path / "f", **FAST)
    # nothing was written: no empty .partial (nor .lock) is left behind
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == []


def _valid_cache(path):
    return write_cache(path, "Xception", np.ones((4, 3)), [0, 1, 0, 1], ["a", "b", "c", "d"])


def test_foreign_truncated_and_malformed_caches(tmp_path):
    good = _valid_cache(tmp_path / "gap_Xception.h5")
    open_cache(good)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="not an HDF5 file"):
        open_cache(tmp_path / "text.h5")
    (tmp_path / "trunc.h5").write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CacheError, match="trunc.h5"):
        open_cache(tmp_path / "trunc.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["train"] = np.zeros((2, 2))
    with pytest.raises(CacheError, match="not a catfeat feature cache"):
        open_cache(tmp_path / "foreign.h5")

    def tamper(name, fn):
        path = tmp_path / name
        path.write_bytes(good.read_bytes())
        with h5py.File(path, "r+") as f:
            fn(f)
        return path

    def int_features(f):
        del f["train"]
        f["train"] = np.zeros((4, 3), np.int32)

    def short_labels(f):
        f["label"].resize(3, axis=0)

    with pytest.raises(CacheError, match="dtype int32, expected float32"):
        open_cache(tamper("dtype.h5", int_features))
    with pytest.raises(CacheError, match="inconsistent shapes"):
        open_cache(tamper("shape.h5", short_labels))


def test_huge_declared_dataset_is_refused_before_allocating(tmp_path):
    path = _valid_cache(tmp_path / "gap_Xception.h5")
    with h5py.File(path, "r+") as f:
        del f["train"], f["label"], f["train_names"]
        n = 3_000_000  # declares 3e6 x 2048 float32 = 24 GB; nothing is stored
        f.create_dataset("train", shape=(n, 2048), dtype="float32", chunks=(1024, 2048))
        f.create_dataset("label", shape=(n,), dtype="int64", chunks=(4096,))
        f.create_dataset("train_names", shape=(n,), dtype=h5py.string_dtype(), chunks=(4096,))
        f.attrs["feature_dim"] = 2048
        del f["test"]
        f.create_dataset("test", shape=(0, 2048), dtype="float32")
    assert path.stat().st_size < 10_000_000
    with pytest.raises(CacheError, match="declares \\(3000000, 2048\\) but stores only"):
        load_features("xcep", tmp_path)
