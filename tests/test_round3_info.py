"""`catfeat info` on hostile folders, with real files: FIFOs, dangling links, control characters in
class names and file names, 10 MB attributes, links to FIFOs inside a cache, forged sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from catfeat.cache.describe import describe_caches

from conftest import REPO, fifo_and_features, stored_in, tamper, tiny_cache

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
BIG = 10 << 20  # a 10 MB attribute


def as_partial(cache):
    """A finished cache turned back into an unfinished ``.partial`` (complete=False, 2 of 4 rows)."""
    partial = cache.with_name(cache.name + ".partial")
    cache.rename(partial)

    def unfinish(f):
        f.attrs["complete"], f.attrs["rows_written"] = False, 2
    return tamper(partial, unfinish)


def info(folder, *args):
    """``python -m catfeat info FOLDER ARGS``; a hang fails the test instead of blocking it."""
    try:
        proc = subprocess.run([sys.executable, "-m", "catfeat", "info", str(folder), *args], env=ENV,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"catfeat info {' '.join(args)} blocked (it opened something that never ends)")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def table(out):
    """The table part of info's stdout: the lines before the summary and the error lines."""
    return [line for line in out.splitlines() if line and not line.startswith("catfeat.info:")]


# -- 1. FIFOs are listed, never opened ----------------------------------------------------------------
def test_fifos_are_listed_not_opened(tmp_path):
    tiny_cache(tmp_path)
    os.mkfifo(tmp_path / "gap_EfficientNetLite1.h5.partial")
    os.mkfifo(tmp_path / "gap_EfficientNetLite2.h5")
    os.symlink(tmp_path / "gap_EfficientNetLite2.h5", tmp_path / "gap_EfficientNetLite3.h5.partial")
    (tmp_path / "gap_EfficientNetLite4.h5.partial").mkdir()
    for args in ((), ("-v",)):
        proc = info(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert out.splitlines()[-1].startswith(f"catfeat.info: {tmp_path}: 5 cache files (1 complete, 4 unreadable)")
        for name in ("gap_EfficientNetLite1.h5.partial", "gap_EfficientNetLite2.h5",
                     "gap_EfficientNetLite3.h5.partial"):
            assert f"{name}: {tmp_path / name} is not a regular file (FIFO); " in out, out
        assert "gap_EfficientNetLite4.h5.partial is not a regular file (folder)" in out
    assert "gap_EfficientNetLite0.h5:\n  backbone: EfficientNetLite0" in out  # -v still lists the real cache
    df = describe_caches(tmp_path).set_index("file")
    assert df.loc["gap_EfficientNetLite0.h5", "status"] == "complete"
    assert (df.drop("gap_EfficientNetLite0.h5").status == "unreadable").all()
    assert os.path.exists(tmp_path / "gap_EfficientNetLite2.h5")  # listed, not removed


# -- 2. dangling links ---------------------------------------------------------------------------------
def test_dangling_link_is_listed_beside_the_caches(tmp_path):
    tiny_cache(tmp_path)
    os.symlink(tmp_path / "gone" / "gap_EfficientNetLite1.h5", tmp_path / "gap_EfficientNetLite1.h5")
    proc = info(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert rows[1].split()[:3] == ["gap_EfficientNetLite0.h5", "complete", "EfficientNetLite0"]
    assert rows[2].split()[:3] == ["gap_EfficientNetLite1.h5", "unreadable", "EfficientNetLite1"]
    assert (f"gap_EfficientNetLite1.h5: {tmp_path}/gap_EfficientNetLite1.h5 is a broken symbolic link (to "
            f"{tmp_path}/gone/gap_EfficientNetLite1.h5); remove it") in proc.stdout
    assert proc.stdout.splitlines()[-1] == (f"catfeat.info: {tmp_path}: 2 cache files (1 complete, 1 unreadable), "
                                            f"{proc.stdout.splitlines()[-1].rsplit(', ', 1)[1]}")
    assert "broken symbolic link" in info(tmp_path, "-v").stdout

    # nothing readable at all: the same listing, and exit 2 with one line saying so
    (tmp_path / "gap_EfficientNetLite0.h5").unlink()
    os.mkfifo(tmp_path / "gap_EfficientNetLite0.h5.partial")
    proc = info(tmp_path)
    assert proc.returncode == 2
    assert "is a broken symbolic link" in proc.stdout and "not a regular file (FIFO)" in proc.stdout
    assert proc.stderr.splitlines() == [f"catfeat info: error: none of the 2 cache files in {tmp_path} can be read "
                                        "(reasons above); extract again with `catfeat extract DATA_DIR "
                                        f"--features {tmp_path}`"]
    # an empty folder is not an error: nothing to list
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = info(empty)
    assert proc.returncode == 0 and f"no gap_*.h5 caches in {empty}" in proc.stdout


# -- 3. control characters -----------------------------------------------------------------------------
def test_control_characters_are_escaped(tmp_path):
    tiny_cache(tmp_path, classes=("cat", "do\ng"))
    tiny_cache(tmp_path, "EfficientNetLite1", classes=("c\tat", "dog"), weights="\x1b[31mred\x1b[0m")
    partial = as_partial(tiny_cache(tmp_path, "EfficientNetLite2", classes=("cat", "dog\r")))
    tamper(partial, lambda f: f.attrs.__setitem__("backend", np.bytes_(b"jax\xff")))  # not valid UTF-8
    (tmp_path / "gap_b\nad.h5").write_bytes(b"not hdf5\n")
    tamper(tmp_path / "gap_EfficientNetLite0.h5", lambda f: f.attrs.create("no\nte", "x\ny"))
    for args in ((), ("-v",)):
        proc = info(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert all(line.isprintable() for line in lines), [line for line in lines if not line.isprintable()]
        rows = table(proc.stdout)
        by_file = {r.split()[0]: r for r in rows[1:5]}
        assert list(by_file) == ["gap_EfficientNetLite0.h5", "gap_EfficientNetLite1.h5",
                                 "gap_EfficientNetLite2.h5.partial", "'gap_b\\nad.h5'"]
        assert "'cat,do\\ng'" in by_file["gap_EfficientNetLite0.h5"].split()
        assert "'c\\tat,dog'" in by_file["gap_EfficientNetLite1.h5"].split()
        assert "'\\x1b[31mred\\x1b[0m'" in by_file["gap_EfficientNetLite1.h5"].split()
        assert {"'cat,dog\\r'", "'jax\\udcff'"} <= set(by_file["gap_EfficientNetLite2.h5.partial"].split())
        assert any(line.startswith("'gap_b\\nad.h5': ") and "is not an HDF5 file" in line for line in rows[5:])
    assert "  'no\\nte': 'x\\ny'" in lines  # -v: attribute names and values escaped too
    # the DataFrame keeps the real values
    df = describe_caches(tmp_path).set_index("file")
    assert df.loc["gap_EfficientNetLite0.h5", "classes"] == "cat,do\ng"


# -- 4. huge attributes ----------------------------------------------------------------------------------
def test_huge_attributes_are_cut_when_printed(tmp_path):
    def big(f):
        f.attrs["weights"] = "w" * BIG  # a table column
        f.attrs["notes"] = "n" * BIG  # only in -v
    tamper(tiny_cache(tmp_path), big)
    tamper(tiny_cache(tmp_path, "EfficientNetLite1"), lambda f: f.attrs.__setitem__("format", "f" * BIG))
    tamper(as_partial(tiny_cache(tmp_path, "EfficientNetLite2")),
           lambda f: f.attrs.__setitem__("classes", json.dumps(["c" * BIG, "dog"])))
    for args in ((), ("-v",)):
        proc = info(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout) < 20_000, len(proc.stdout)
        assert f"{'w' * 200}... ({BIG:,} bytes)" in proc.stdout
        assert f"{'c' * 200}... ({BIG + 4:,} bytes)" in proc.stdout  # the classes cell: "ccc...,dog"
        # the error keeps its advice after the cut value
        err = [line for line in table(proc.stdout) if line.startswith("gap_EfficientNetLite1.h5: ")]
        assert len(err) == 1 and err[0].endswith("; delete it or point --features elsewhere"), err
        assert f"... ({BIG:,} bytes)" in err[0]
    assert f"  notes: {'n' * 200}... ({BIG:,} bytes)" in proc.stdout.splitlines()
    assert f"  format: {'f' * 200}... ({BIG:,} bytes)" in proc.stdout.splitlines()


# -- 5. other hostile caches -----------------------------------------------------------------------------
def test_caches_linking_to_a_fifo_or_forging_sizes_are_listed(tmp_path):
    fifo, feats = fifo_and_features(tmp_path)

    def link_to_fifo(f):
        del f["train"]
        f["train"] = h5py.ExternalLink(str(fifo), "/train")

    def forged(f):  # declares 10^10 rows (51 TB) without storing them
        del f["train"]
        f.create_dataset("train", shape=(10 ** 10, 1280), maxshape=(None, 1280), chunks=(1, 1280), dtype="float32")

    def nested_classes(f):  # json.loads would raise RecursionError
        f.attrs["classes"] = "[" * 100_000
    tamper(tiny_cache(feats), link_to_fifo)
    tamper(as_partial(tiny_cache(feats, "EfficientNetLite1")), link_to_fifo)
    tamper(as_partial(tiny_cache(feats, "EfficientNetLite2")), stored_in(fifo, 48, "test"))
    tamper(as_partial(tiny_cache(feats, "EfficientNetLite3")), forged)
    tamper(tiny_cache(feats, "EfficientNetLite4"), nested_classes)
    for args in ((), ("-v",)):
        proc = info(feats, *args)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "gap_EfficientNetLite0.h5: " in out and "'train' is an external link to " in out
        assert "gap_EfficientNetLite1.h5.partial: " in out
        assert "'test' is stored in other files" in out
        assert "unfinished 2/4 images" in out  # the forged one: its shapes are listed, nothing is read
        assert out.splitlines()[-1].startswith(f"catfeat.info: {feats}: 5 cache files (1 complete, 1 unfinished, "
                                               "3 unreadable)")
    df = describe_caches(feats).set_index("file")
    assert (df.loc["gap_EfficientNetLite3.h5.partial", ["status", "train"]] == ["unfinished", 10 ** 10]).all()
    assert df.loc["gap_EfficientNetLite4.h5", "classes"].startswith("[[[")
    for name in ("gap_EfficientNetLite0.h5", "gap_EfficientNetLite1.h5.partial", "gap_EfficientNetLite2.h5.partial"):
        assert df.loc[name, "status"] == "unreadable" and "a cache must hold its own data" in df.loc[name, "error"]


def test_link_loops_devices_and_undecodable_names_are_listed(tmp_path):
    tiny_cache(tmp_path)
    os.symlink("gap_EfficientNetLite1.h5", tmp_path / "gap_EfficientNetLite1.h5")  # a link to itself
    os.symlink("/dev/zero", tmp_path / "gap_EfficientNetLite2.h5")  # would never end if read
    with open(os.path.join(os.fsencode(tmp_path), b"gap_\xff.h5"), "wb") as f:  # not valid UTF-8
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    for args in ((), ("-v",)):
        proc = info(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1].startswith(f"catfeat.info: {tmp_path}: 4 cache files (1 complete, "
                                                       "3 unreadable)")
        assert (f"gap_EfficientNetLite1.h5: {tmp_path}/gap_EfficientNetLite1.h5 cannot be read (Too many levels "
                "of symbolic links); delete it") in proc.stdout
        assert (f"gap_EfficientNetLite2.h5: {tmp_path}/gap_EfficientNetLite2.h5 is not a regular file (character "
                "device); delete it") in proc.stdout
        assert "\n'gap_\\udcff.h5'" in proc.stdout  # shown as its repr
    rows = describe_caches(tmp_path).set_index("file")
    assert rows.loc["gap_\udcff.h5", "status"] == "unreadable"
