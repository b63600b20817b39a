"""Hostile and mismatched caches with real files: renamed, short, fused from different folders,
reading other files (external storage, links, a FIFO), planted symlinks, and a really full disk."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.extraction.run import run_extraction
from catfeat.outliers import find_outliers
from catfeat.cache.store import CacheError, load_features, open_cache

from conftest import REPO, TINY_NAMES, fifo_and_features, make_kaggle, stored_in, tamper, tiny_cache

FAST = dict(weights=None, batch_size=4, progress=False)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}


# -- 3. caches from different sources ---------------------------------------------------------------
def test_renamed_cache_is_refused(tmp_path, capsys):
    tiny_cache(tmp_path).rename(tmp_path / "gap_EfficientNetLite1.h5")
    msg = "holds features of 'EfficientNetLite0', not EfficientNetLite1 as its name says; rename it back"
    with pytest.raises(CacheError, match=msg):
        open_cache(tmp_path / "gap_EfficientNetLite1.h5")
    with pytest.raises(CacheError, match=msg):
        load_features("lite1", tmp_path)
    assert fit_cli.main(["--models", "lite1", "--features", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def test_short_complete_cache_is_damaged_not_reused(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=2, size=(16, 16))
    out = tmp_path / "f"
    path = run_extraction(data, "lite0", out, **FAST).paths["EfficientNetLite0"]

    def cut(f):  # drop the last training row but keep the attributes (complete, n_images=8)
        for ds in ("train", "label", "train_names"):
            f[ds].resize(f[ds].shape[0] - 1, axis=0)
    tamper(path, cut)
    msg = "is damaged: it declares n_images=8, rows_written=8 but holds 5 train \\+ 2 test rows and 0 skipped"
    with pytest.raises(CacheError, match=msg):
        open_cache(path)
    with pytest.raises(CacheError, match=msg):  # extract does not "reuse" it
        run_extraction(data, "lite0", out, **FAST)
    report = run_extraction(data, "lite0", out, force=True, **FAST)
    assert report.processed == 8 and report.reused == []
    assert open_cache(path).features().shape == (6, 1280)


def test_caches_of_different_folders_are_not_fused(tmp_path, capsys):
    out = tmp_path / "f"
    a = make_kaggle(tmp_path / "a", n_per_class=2, n_test=0, size=(16, 16))
    b = make_kaggle(tmp_path / "b", n_per_class=2, n_test=0, size=(20, 20))  # same file names, other images
    run_extraction(a, "lite0", out, **FAST)
    run_extraction(b, "lite1", out, **FAST)
    with pytest.raises(CacheError, match="the caches of EfficientNetLite0 and EfficientNetLite1 come from different "
                                         "images \\(images_fingerprint: gap_EfficientNetLite0.h5 has '[0-9a-f]{64}'"
                                         ".*--models EfficientNetLite0,EfficientNetLite1$"):
        load_features("lite0,lite1", out)
    assert fit_cli.main(["--models", "lite0,lite1", "--features", str(out)]) == 2
    assert "come from different images (images_fingerprint" in capsys.readouterr().err
    with pytest.raises(CacheError, match="come from different images"):
        find_outliers("lite0,lite1", str(out), weights=None)
    # join="inner" is the explicit opt-in for different image sets
    X, _, names = load_features("lite0,lite1", out, join="inner")
    assert len(names) == 4


def test_source_attributes_compared_only_when_both_known(tmp_path):
    tiny_cache(tmp_path, "EfficientNetLite0")  # write_cache: empty fingerprint, no data_root = unknown
    tiny_cache(tmp_path, "EfficientNetLite1", images_fingerprint="abc", data_root="/x", layout="kaggle")
    assert load_features("lite0,lite1", tmp_path)[0]["EfficientNetLite0"].shape == (4, 3)
    tiny_cache(tmp_path, "EfficientNetLite0", layout="class_folders")
    with pytest.raises(CacheError, match="layout: gap_EfficientNetLite0.h5 has 'class_folders', "
                                         "gap_EfficientNetLite1.h5 has 'kaggle'"):
        load_features("lite0,lite1", tmp_path)
    tiny_cache(tmp_path, "EfficientNetLite0", images_fingerprint="abc", data_root="/moved/copy", layout="kaggle")
    load_features("lite0,lite1", tmp_path)  # same images (fingerprint) in another folder: fine
    tiny_cache(tmp_path, "EfficientNetLite0", images_fingerprint="abc", data_root="/x", layout="kaggle",
                classes='["dog", "cat"]')
    for join in ("exact", "inner"):
        with pytest.raises(CacheError, match="classes: "):
            load_features("lite0,lite1", tmp_path, join=join)


# -- 7. caches that point at other files ------------------------------------------------------------
def test_external_storage_links_and_virtual_datasets_are_refused(tmp_path):
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"s3cr3t!!" * 6)  # 48 bytes = 4 x 3 float32
    other = tiny_cache(secret.parent)
    feats = tmp_path / "f"
    feats.mkdir()
    path = feats / "gap_EfficientNetLite0.h5"

    def planted(fn):
        shutil.copy(other, path)
        return tamper(path, fn)

    planted(stored_in(secret, 48))
    with pytest.raises(CacheError, match="'train' is stored in other files \\(.*secret.bin\\); a cache must hold "
                                         "its own data, refusing to read it"):
        open_cache(path)
    with pytest.raises(CacheError, match="stored in other files"):
        load_features("lite0", feats)
    if os.path.getsize("/etc/passwd") >= 48:
        planted(stored_in("/etc/passwd", 48))
        with pytest.raises(CacheError, match="stored in other files \\(/etc/passwd\\)"):
            load_features("lite0", feats)

    def ext_link(f):
        del f["train"]
        f["train"] = h5py.ExternalLink(str(other), "/train")
    planted(ext_link)
    with pytest.raises(CacheError, match="'train' is an external link to .*gap_EfficientNetLite0.h5:/train"):
        open_cache(path)

    def soft_link(f):
        del f["test"]
        f["test"] = h5py.SoftLink("/train")
    planted(soft_link)
    with pytest.raises(CacheError, match="'test' is a soft link to /train"):
        open_cache(path)

    def virtual(f):
        layout = h5py.VirtualLayout(shape=(4, 3), dtype="float32")
        layout[:] = h5py.VirtualSource(str(other), "train", shape=(4, 3))
        del f["train"]
        f.create_virtual_dataset("train", layout)
    planted(virtual)
    with pytest.raises(CacheError, match="'train' is a virtual dataset"):
        open_cache(path)

    # a cache validated earlier and swapped afterwards is checked again on every read
    shutil.copy(other, path)
    cache = open_cache(path)
    tamper(path, stored_in(secret, 48))
    with pytest.raises(CacheError, match="stored in other files"):
        cache.features()

    # a cache path that is a FIFO is refused before anything opens it
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(CacheError, match="is not a regular file"):
        open_cache(path)


def test_external_fifo_does_not_hang_fit_or_resume(tmp_path):
    fifo, feats = fifo_and_features(tmp_path)
    tamper(tiny_cache(feats), stored_in(fifo, 48))
    try:
        proc = subprocess.run([sys.executable, "-m", "catfeat.fit", "--models", "lite0", "--features", str(feats)],
                              env=ENV, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("fit blocked reading a FIFO named by external storage")
    assert proc.returncode == 2, proc.stderr
    assert "'train' is stored in other files" in proc.stderr and "Traceback" not in proc.stderr

    # a planted .partial with the same trick is started over, not resumed (nor read)
    partial = feats / "gap_EfficientNetLite1.h5.partial"
    shutil.copy(feats / "gap_EfficientNetLite0.h5", partial)
    script = ("import numpy as np; from catfeat.cache.store import FeatureWriter; "
              f"w = FeatureWriter({str(feats / 'gap_EfficientNetLite1.h5')!r}, {{}}, {TINY_NAMES!r}, "
              "np.zeros(4, int), ['train'] * 4, 3); print('resumed_from', w.resumed_from); "
              "w.close(discard_empty=False)")
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("resuming a planted partial blocked reading a FIFO")
    assert proc.returncode == 0, proc.stderr
    assert "resumed_from 0" in proc.stdout and "starting" in proc.stderr and "stored in other files" in proc.stderr
    with h5py.File(partial, "r") as f:
        assert f["train"].external is None


# -- 8. planted symlinks -----------------------------------------------------------------------------
def test_planted_symlinks_are_never_written_through(tmp_path, caplog):
    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=0, size=(16, 16))
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "f"
    out.mkdir()
    final = out / "gap_EfficientNetLite0.h5"
    os.symlink(outside / "evil.h5", out / "gap_EfficientNetLite0.h5.partial")  # dangling
    os.symlink(outside / "evil.lock", out / "gap_EfficientNetLite0.h5.lock")  # dangling
    run_extraction(data, "lite0", out, **FAST)
    assert list(outside.iterdir()) == []  # nothing created where the links pointed
    assert final.is_file() and not final.is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [final.name]  # no .partial, no .lock left
    err = caplog.text  # the library says it through logging.getLogger("catfeat"); the CLI prints it on stderr
    assert "gap_EfficientNetLite0.h5.partial, a symbolic link to" in err and "its target was not touched" in err

    # a partial link to an existing file: the link goes, the file is untouched
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, out / "gap_EfficientNetLite0.h5.partial")
    final.unlink()
    run_extraction(data, "lite0", out, **FAST)
    assert victim.read_text() == "keep me" and final.is_file() and not final.is_symlink()

    # a cache path that is a link is not reused silently, and --force replaces the link, not its target
    elsewhere = outside / "gap_EfficientNetLite0.h5"
    final.rename(elsewhere)
    os.symlink(elsewhere, final)
    before = elsewhere.read_bytes()
    with pytest.raises(CacheError, match="is a symbolic link \\(to .*\\), not a cache catfeat wrote; remove the "
                                         "link, or rerun with --force"):
        run_extraction(data, "lite0", out, **FAST)
    run_extraction(data, "lite0", out, force=True, **FAST)
    assert final.is_file() and not final.is_symlink() and elsewhere.read_bytes() == before
    assert sorted(p.name for p in outside.iterdir()) == ["gap_EfficientNetLite0.h5", "victim.txt"]


# -- 4 and 9. a really full disk ---------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)`` mounts a tmpfs of ``size`` (root only) and returns its folder."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        return mnt
    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def extract_cli(*args, python=None):
    cmd = [sys.executable, "-c", python, *map(str, args)] if python else \
        [sys.executable, "-m", "catfeat.extract", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def enlarge(mnt):
    subprocess.run(["mount", "-o", "remount,size=50m", str(mnt)], check=True)


# 40 training then 40 test images: lite0 rows (1280 float32) go into one chunk per split of 40 rows
# (200 KB), so the test chunk is the write that does not fit a 600 KB disk.
def disk_data(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=20, n_test=40, size=(8, 8))
    return [data, "--models", "lite0", "--weights", "none", "--batch-size", "20", "--no-progress"]


def test_full_disk_is_one_line_and_resumes(tmp_path, small_disk):
    disk = small_disk("600k")
    args = disk_data(tmp_path)
    proc = extract_cli(*args, "--out", disk)
    assert proc.returncode == 2, proc.stderr  # not 139 (segfault)
    lines = [ln for ln in proc.stderr.splitlines() if "catfeat" in ln]
    assert len(lines) == 1 and lines[0].startswith("python -m catfeat.extract: error: writing ")
    assert "No space left on device" in lines[0]
    assert ("the rows already written are kept: free disk space or fix the folder's permissions, then rerun the "
            "same command to resume") in lines[0]
    assert "Traceback" not in proc.stderr and "HDF5-DIAG" not in proc.stderr
    with h5py.File(disk / "gap_EfficientNetLite0.h5.partial", "r") as f:
        # the writer flushes once a second (FLUSH_SECONDS): the second training batch may still have
        # been in memory, unflushed, when the test chunk did not fit; either way a batch-aligned prefix
        done = int(f.attrs["rows_written"])
        assert done in (20, 40) and f["train"].shape == (done, 1280)
    assert not (disk / "gap_EfficientNetLite0.h5.lock").exists()

    enlarge(disk)
    proc = extract_cli(*args, "--out", disk)
    assert proc.returncode == 0 and f"resumed: EfficientNetLite0@{done}" in proc.stdout, proc.stderr
    ref = extract_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    got = open_cache(disk / "gap_EfficientNetLite0.h5")
    want = open_cache(tmp_path / "ref" / "gap_EfficientNetLite0.h5")
    for split in ("train", "test"):
        assert list(got.names(split)) == list(want.names(split))
        np.testing.assert_allclose(got.features(split), want.features(split), rtol=1e-4, atol=1e-5)
    assert got.features("test").shape == (40, 1280)
    assert sorted(p.name for p in disk.iterdir()) == ["gap_EfficientNetLite0.h5"]


def test_hdf5_failing_mid_write_exits_cleanly(tmp_path, small_disk):
    """The free-space check is the first defense; if HDF5 still meets a full disk (another program
    filled it meanwhile) the CLI exits with the same line instead of crashing in HDF5's exit handlers."""
    disk = small_disk("300k")
    no_check = ("import sys; from catfeat.cache.store import FeatureWriter; "
                "FeatureWriter._check_space = lambda self, need: None; "
                "from catfeat.cli.extract import main; sys.exit(main(sys.argv[1:]))")
    args = [*disk_data(tmp_path), "--out", disk]
    proc = extract_cli(*args, python=no_check)
    assert proc.returncode == 2, proc.stderr  # not 139
    lines = [ln for ln in proc.stderr.splitlines() if "catfeat" in ln or "Traceback" in ln or "Error" in ln]
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert "rerun the same command to resume" in lines[0]
    assert not (disk / "gap_EfficientNetLite0.h5.lock").exists()
    enlarge(disk)
    proc = extract_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert open_cache(disk / "gap_EfficientNetLite0.h5").features("test").shape == (40, 1280)
