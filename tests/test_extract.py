"""Extraction end to end: caches, reuse, staleness, resume after a crash, bad files, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from catfeat.models.registry import get_backbone
from catfeat.extraction.run import LockedError, run_extraction
from catfeat.images.decoders import get_decoder
from catfeat.images.listing import list_images
from catfeat.models.forward import Forward
from catfeat.cache.store import CacheError, FeatureWriter, StaleCacheError, load_features, open_cache

from conftest import REPO, make_kaggle, real_data, save_image, wait_for_rows

FAST = dict(weights=None, batch_size=4, progress=False)


def run_cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "catfeat.extract", *map(str, args)], capture_output=True,
                          text=True, env=env, **kw)


def direct_features(root, names, model, seed=0):
    spec = get_backbone(model)
    decode = get_decoder("auto").decode  # what run_extraction uses by default
    imgs = np.stack([decode(root / n, [spec.input_size])[spec.input_size] for n in names])
    return Forward(spec, None, seed=seed, batch_size=4)(imgs)


def read(path, ds):
    with h5py.File(path, "r") as f:
        return f[ds][()]


@pytest.mark.backend_neutral
def test_cli_two_keras_backbones_of_two_input_sizes(tmp_path):
    """One CLI run, two backbones of different input sizes (224 and 299) end to end. The other two Keras
    backbones share this path; test_backbones.py builds all four and checks their shapes, which is all
    they add (compiling InceptionResNetV2 and Xception cost minutes here, under JAX most of all).
    TensorFlow only: under JAX, test_predict's fixture extracts two input sizes (lite0, lite1) and the
    resume, TTA and weights-file tests below run the forward pass."""
    kaggle_dir = make_kaggle(tmp_path / "data", n_per_class=4, n_test=4)
    out = tmp_path / "features"
    r = run_cli(kaggle_dir, "--models", "r50,incv3", "--weights", "none", "--out", out,
                "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "catfeat.extract: 12 images processed; 0 skipped" in r.stdout
    images = list_images(kaggle_dir)
    train_names = [n for n, s in zip(images.names, images.split) if s == "train"]
    for name, dim in (("ResNet50", 2048), ("InceptionV3", 2048)):
        cache = open_cache(out / f"gap_{name}.h5")
        assert cache.features("train").shape == (8, dim) and cache.features("test").shape == (4, dim)
        assert cache.features("train").dtype == np.float32
        assert list(cache.names("train")) == train_names
        assert list(cache.names("test")) == ["test/1.jpg", "test/2.jpg", "test/3.jpg", "test/4.jpg"]
        assert cache.labels().tolist() == [0] * 4 + [1] * 4
        assert cache.attrs["backbone"] == name and cache.attrs["weights"] == "none(seed=0)"
        assert json.loads(cache.attrs["classes"]) == ["cat", "dog"]
        assert cache.attrs["input_size"] == get_backbone(name).input_size
        # the cached rows are the backbone's output for exactly those images, in that order
        want = direct_features(kaggle_dir, train_names, name)
        np.testing.assert_allclose(read(out / f"gap_{name}.h5", "train"), want, rtol=1e-4, atol=1e-5)
    X, y, names = load_features("r50,incv3", out)
    assert X["ResNet50"].shape == (8, 2048) and X["InceptionV3"].shape == (8, 2048)
    assert y.tolist() == [0] * 4 + [1] * 4 and list(names) == train_names


@pytest.mark.backend_neutral
def test_reuse_stale_and_force(kaggle_dir, tmp_path):
    out = tmp_path / "f"
    first = run_extraction(kaggle_dir, "r50", out, **FAST)
    path = first.paths["ResNet50"]
    mtime = path.stat().st_mtime_ns
    again = run_extraction(kaggle_dir, "r50", out, **FAST)
    assert again.reused == ["ResNet50"] and again.processed == 0 and path.stat().st_mtime_ns == mtime

    with pytest.raises(StaleCacheError, match="weights"):
        run_extraction(kaggle_dir, "r50", out, seed=1, **FAST)
    with pytest.raises(StaleCacheError, match="precision"):
        run_extraction(kaggle_dir, "r50", out, precision="mixed_bfloat16", **FAST)
    assert path.stat().st_mtime_ns == mtime  # a refusal leaves the old cache alone
    save_image(kaggle_dir / "train" / "cat.50.jpg", 50)  # other images, same recipe: the cache grows
    grown = run_extraction(kaggle_dir, "r50", out, **FAST)
    assert grown.processed == 1 and grown.grown["ResNet50"]["kept"] == 11
    assert open_cache(path).features().shape == (9, 2048)
    rebuilt = run_extraction(kaggle_dir, "r50", out, force=True, seed=1, **FAST)
    assert rebuilt.processed == 12 and open_cache(path).features().shape == (9, 2048)


def test_interrupted_run_resumes_to_identical_features(kaggle_dir, tmp_path, monkeypatch):
    clean = run_extraction(kaggle_dir, "r50", tmp_path / "clean", **FAST)
    want = {ds: read(clean.paths["ResNet50"], ds) for ds in ("train", "test", "train_names", "label")}

    out = tmp_path / "crash"
    calls = {"n": 0}
    original = FeatureWriter.write

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "write", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(kaggle_dir, "r50", out, **FAST)
    monkeypatch.setattr(FeatureWriter, "write", original)
    final = out / "gap_ResNet50.h5"
    assert not final.exists() and (out / "gap_ResNet50.h5.partial").exists()
    with pytest.raises(CacheError, match="unfinished"):
        open_cache(final)

    resumed = run_extraction(kaggle_dir, "r50", out, **FAST)
    assert resumed.resumed == {"ResNet50": 8} and resumed.processed == 3
    for ds, values in want.items():
        np.testing.assert_array_equal(read(final, ds), values)
    assert not (out / "gap_ResNet50.h5.partial").exists()


@pytest.mark.backend_neutral
def test_sigkill_then_resume(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=16, n_test=0, size=(24, 24))
    out = tmp_path / "f"
    partial = out / "gap_ResNet50.h5.partial"
    proc = subprocess.Popen([sys.executable, "-m", "catfeat.extract", str(data), "--models", "r50",
                             "--weights", "none", "--out", str(out), "--batch-size", "2", "--no-progress"],
                            env={**os.environ, "PYTHONPATH": str(REPO), "HDF5_USE_FILE_LOCKING": "FALSE"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = wait_for_rows(partial, proc, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if rows < 6 or rows >= 32:
        pytest.skip(f"could not catch the run mid-way (rows_written={rows})")
    assert not (out / "gap_ResNet50.h5").exists()
    r = run_cli(data, "--models", "r50", "--weights", "none", "--out", out, "--batch-size", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resumed: ResNet50@" in r.stdout or "starting" in r.stderr
    feats = open_cache(out / "gap_ResNet50.h5").features()
    names = list_images(data).names
    np.testing.assert_allclose(feats, direct_features(data, names, "r50"), rtol=1e-4, atol=1e-5)


@pytest.mark.backend_neutral
def test_corrupt_files_are_skipped_and_recorded(kaggle_dir, tmp_path):
    (kaggle_dir / "train" / "cat.2.jpg").write_text("not a jpeg")
    (kaggle_dir / "test" / "2.jpg").write_bytes(b"")
    report = run_extraction(kaggle_dir, "r50", tmp_path / "f", **FAST)
    cache = open_cache(report.paths["ResNet50"])
    assert "train/cat.2.jpg" not in list(cache.names("train")) and cache.features().shape[0] == 7
    assert list(cache.names("test")) == ["test/1.jpg", "test/3.jpg"]
    reasons = {s["path"]: s["reason"] for s in cache.skipped()}
    assert set(reasons) == {"train/cat.2.jpg", "test/2.jpg"} and "empty" in reasons["test/2.jpg"]
    assert report.skipped == cache.skipped()
    assert cache.labels().tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_local_weights_file_round_trip(kaggle_dir, tmp_path):
    from catfeat.models.registry import build_backbone

    wfile = tmp_path / "r50_seed5.weights.h5"
    build_backbone("r50", None, seed=5).save_weights(wfile)
    by_path = run_extraction(kaggle_dir, "r50", tmp_path / "a", weights=wfile, batch_size=4, progress=False)
    by_seed = run_extraction(kaggle_dir, "r50", tmp_path / "b", weights=None, seed=5, batch_size=4, progress=False)
    a, b = (open_cache(r.paths["ResNet50"]) for r in (by_path, by_seed))
    assert a.attrs["weights"].startswith("sha256:")
    np.testing.assert_allclose(a.features(), b.features(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one backbone"):
        run_extraction(kaggle_dir, "r50,incv3", tmp_path / "c", weights=wfile, progress=False)


@pytest.mark.backend_neutral
def test_concurrent_extraction_is_refused(kaggle_dir, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "f"
    out.mkdir()
    fd = os.open(out / "gap_ResNet50.h5.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockedError, match="another catfeat extraction"):
            run_extraction(kaggle_dir, "r50", out, **FAST)
    finally:
        os.close(fd)


@pytest.mark.backend_neutral
def test_cli_errors_are_one_clear_line(tmp_path):
    r = run_cli(tmp_path / "missing", "--weights", "none")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(tmp_path, "--models", "vgg99")
    assert r.returncode == 2 and "unknown backbone 'vgg99'" in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0 and "--models" in r.stdout and "InceptionResNetV2 (irv2)" in r.stdout


@pytest.mark.backend_neutral
def test_real_photos(tmp_path):
    root = real_data("original")
    report = run_extraction(root, "r50", tmp_path / "f", limit=6, **FAST)
    cache = open_cache(report.paths["ResNet50"])
    assert cache.features().shape == (6, 2048) and np.isfinite(cache.features()).all()
    assert sorted(cache.labels().tolist()) == [0, 0, 0, 1, 1, 1]


def test_flip_tta_is_recorded_reproducible_and_a_mean_of_mirrors(tmp_path):
    from PIL import Image

    root = tmp_path / "d"
    save_image(root / "cat.0.jpg", 1, size=(64, 64), fmt="PNG")
    Image.open(root / "cat.0.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(root / "cat.1.jpg", format="PNG")
    save_image(root / "dog.0.jpg", 2, size=(64, 64), fmt="PNG")
    plain = open_cache(run_extraction(root, "r50", tmp_path / "plain", **FAST).paths["ResNet50"])
    tta = open_cache(run_extraction(root, "r50", tmp_path / "tta", tta="flip", **FAST).paths["ResNet50"])
    again = open_cache(run_extraction(root, "r50", tmp_path / "tta2", tta="flip", **FAST).paths["ResNet50"])
    assert tta.attrs["tta"] == "flip" and plain.attrs["tta"] == "none"
    np.testing.assert_array_equal(tta.features(), again.features())
    p, t = plain.features(), tta.features()
    assert np.abs(t - p).max() > 1e-3
    # image 1 is image 0 mirrored: with TTA both get the mean of the two plain feature vectors
    np.testing.assert_allclose(t[0], (p[0] + p[1]) / 2, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(t[1], t[0], rtol=1e-3, atol=1e-4)
    with pytest.raises(StaleCacheError, match="tta"):
        run_extraction(root, "r50", tmp_path / "plain", tta="flip", **FAST)


@pytest.mark.backend_neutral
def test_default_batch_size_follows_the_device(kaggle_dir, tmp_path, monkeypatch):
    import catfeat.extraction.run
    from catfeat.models import forward as runtime

    seen, real_iter = [], catfeat.extraction.run.iter_batches

    def spy(paths, sizes, batch_size, **kw):
        seen.append(batch_size)
        return real_iter(paths, sizes, batch_size, **kw)
    monkeypatch.setattr("catfeat.extraction.run.iter_batches", spy)
    for has_gpu, expected in ((False, runtime.CPU_BATCH), (True, runtime.GPU_BATCH)):
        monkeypatch.setattr(runtime, "_has_gpu", lambda: has_gpu)
        report = run_extraction(kaggle_dir, "r50", tmp_path / str(has_gpu), weights=None, progress=False)
        assert report.processed == 11 and seen[-1] == expected
