"""Hostile input, round three (cache and extraction): planted links under the Ray engine's ``.parts``,
an unfinished cache of another request, a features folder deleted mid-run, NaN rows named by image."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.extraction import ray_engine
from catfeat.head.scoring import cross_validate
from catfeat.extraction.run import run_extraction
from catfeat.head.estimator import FusedHead
from catfeat.cache.store import CacheError, FeatureWriter, StalePartialError, open_cache, write_cache

from conftest import REPO, make_kaggle, ray_parts_after_crash, wait_for_rows

FAST = dict(weights=None, batch_size=4, progress=False)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "HDF5_USE_FILE_LOCKING": "FALSE"}
# lite0 is the cheapest backbone to build; ResNet50 when catfeat.models.lite is not there
MODEL, NAME = ("lite0", "EfficientNetLite0") if importlib.util.find_spec("catfeat.models.lite") else ("r50", "ResNet50")


def extract_proc(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "catfeat.extract", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def catfeat_lines(err: str) -> list[str]:
    """catfeat's own lines of stderr (TensorFlow may log its start-up there too)."""
    return [line for line in err.splitlines() if "catfeat" in line]


def extract_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catfeat.extract", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def tree(folder) -> dict:
    """Every path under ``folder`` with its bytes (files), its target (links) or None (folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return out


# -- 1. the Ray engine's parts never go through a planted link ---------------------------------------
@pytest.fixture(scope="module")
def ray_data(tmp_path_factory):
    return make_kaggle(tmp_path_factory.mktemp("ray") / "data", n_per_class=4, n_test=2, size=(16, 16))


def ray_extract(data, out):
    return run_extraction(data, MODEL, out, engine="ray", engine_options={"shards": 2}, **FAST)


def assert_complete(out, n=10):
    cache = open_cache(out / f"gap_{NAME}.h5")
    assert len(cache) == n and cache.attrs["complete"] is True
    assert not (out / f"gap_{NAME}.h5").is_symlink()


def test_ray_parts_link_is_removed_not_followed(ray_cluster, ray_data, tmp_path, caplog):
    # .parts -> a folder holding <Backbone>/ with a sentinel: the old cleanup deleted that folder
    outside = tmp_path / "outside"
    (outside / NAME / "0123456789abcdef").mkdir(parents=True)
    (outside / NAME / "sentinel.txt").write_text("keep me")
    (outside / NAME / "0123456789abcdef" / "shard-00000.h5").write_text("not catfeat's to delete")
    before = tree(outside)
    out = tmp_path / "f"
    out.mkdir()
    os.symlink(outside, out / ".parts")
    ray_extract(ray_data, out)
    assert tree(outside) == before  # nothing written there, nothing deleted
    assert_complete(out)
    assert not os.path.lexists(out / ".parts")
    err = caplog.text  # the library says it through logging.getLogger("catfeat"); the CLI prints it on stderr
    assert f"{out / '.parts'}, a symbolic link to {outside}" in err and "its target was not touched" in err

    # .parts/<Backbone> -> a folder with a sentinel
    other = tmp_path / "other"
    other.mkdir()
    (other / "sentinel.txt").write_text("keep me too")
    out2 = tmp_path / "f2"
    (out2 / ".parts").mkdir(parents=True)
    os.symlink(other, out2 / ".parts" / NAME)
    ray_extract(ray_data, out2)
    assert tree(other) == {"sentinel.txt": b"keep me too"}
    assert_complete(out2)
    assert not os.path.lexists(out2 / ".parts")


def test_ray_part_file_links_and_foreign_files_survive(ray_cluster, ray_data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "f"
    parts = ray_parts_after_crash(monkeypatch, out, lambda: ray_extract(ray_data, out))
    assert [p.name for p in parts] == ["shard-00000.h5", "shard-00001.h5"]
    key = parts[0].parent
    # unfinished parts of another request are refused (before Ray starts), not deleted by the next run
    before = tree(out)
    with pytest.raises(CacheError, match=f"{out / '.parts' / NAME} holds 2 parts \\(10 images done\\) of an "
                                         "unfinished Ray extraction built differently \\(dtype: parts have "
                                         "'float32', asked 'float16'\\).*--force"):
        run_extraction(ray_data, MODEL, out, engine="ray", engine_options={"shards": 2}, dtype="float16", **FAST)
    assert tree(out) == before
    said = []  # --force goes on, saying the parts will go
    ray_engine.check_other_requests(key.parent / "another-request", {**open_cache(parts[0]).attrs, "dtype": "float16"},
                                    2, True, said.append)
    assert said == [f"catfeat: {key.parent} holds 2 parts (10 images done) built differently (dtype changed); "
                    "--force: they are deleted when this run completes"]
    # a finished part swapped for a link to a (valid) part elsewhere: must be recomputed, not read
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.h5"
    shutil.move(parts[1], victim)
    os.symlink(victim, parts[1])
    stray = outside / "stray.h5"
    stray.write_text("a file the cleanup must not follow a link to")
    os.symlink(stray, key / "shard-00009.h5")  # a link named like a part of no shard
    (key / "notes.txt").write_text("not a part")  # a file catfeat did not write
    before = tree(outside)

    report = ray_extract(ray_data, out)
    assert report.resumed == {NAME: 5} and report.processed == 5  # shard 1 recomputed
    assert_complete(out)
    assert tree(outside) == before
    # the cleanup deleted the parts and removed the links, and left the foreign file (so its folders)
    assert tree(out / ".parts") == {NAME: None, f"{NAME}/{key.name}": None,
                                     f"{NAME}/{key.name}/notes.txt": b"not a part"}
    err = caplog.text  # through logging, as above
    assert f"{parts[1]}, a symbolic link to {victim}" in err


# -- 2. an unfinished cache of another request is refused, not discarded ----------------------------
def test_partial_of_another_request_is_refused_then_resumed(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=16, n_test=0, size=(24, 24))
    out = tmp_path / "f"
    partial = out / "gap_ResNet50.h5.partial"
    cmd = [data, "--models", "r50", "--weights", "none", "--out", out, "--batch-size", "2", "--no-progress"]
    proc = extract_proc(*cmd)
    rows = wait_for_rows(partial, proc, 6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    with h5py.File(partial, "r") as f:
        rows = int(f.attrs["rows_written"])
    if rows < 6 or rows >= 32:
        pytest.skip(f"could not catch the run mid-way (rows_written={rows})")
    before = partial.read_bytes()

    r = extract_cli(*cmd, "--dtype", "float16")
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert "Traceback" not in err and len(catfeat_lines(err)) == 1, err
    assert f"{partial} is an unfinished cache ({rows} of 32 images done) built differently" in err
    assert "dtype: partial has 'float32', asked 'float16'" in err and "--force" in err
    assert partial.read_bytes() == before  # untouched: same rows, same bytes
    with pytest.raises(StalePartialError, match="weights: partial has 'none\\(seed=0\\)', asked 'none\\(seed=1\\)'"):
        run_extraction(data, "r50", out, weights=None, seed=1, batch_size=2, progress=False)
    assert partial.read_bytes() == before

    r = extract_cli(*cmd)
    assert r.returncode == 0, r.stderr
    assert f"resumed: ResNet50@{rows}" in r.stdout
    assert open_cache(out / "gap_ResNet50.h5").features().shape == (32, 2048)


def test_force_starts_a_partial_of_another_request_over(tmp_path, monkeypatch):
    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=2, size=(16, 16))
    out = tmp_path / "f"
    original = FeatureWriter.write

    def crash_on_second(self, start, *args, **kwargs):
        if start >= 4:
            raise KeyboardInterrupt
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "write", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(data, MODEL, out, **FAST)
    monkeypatch.undo()
    partial = out / f"gap_{NAME}.h5.partial"
    before = partial.read_bytes()
    with pytest.raises(StalePartialError, match="dtype: partial has 'float32', asked 'float16'"):
        run_extraction(data, MODEL, out, dtype="float16", **FAST)
    assert partial.read_bytes() == before
    said = []
    report = run_extraction(data, MODEL, out, dtype="float16", force=True, log=said.append, **FAST)
    assert report.processed == 8 and not report.resumed
    assert any(f"starting {partial} over (--force): dtype changed; its 4 images done are discarded" in s
               for s in said)
    cache = open_cache(report.paths[NAME])
    assert cache.attrs["dtype"] == "float16" and len(cache) == 8 and not partial.exists()


# -- 3. the features folder deleted while the run writes ---------------------------------------------
def test_features_folder_removed_mid_run_says_nothing_was_kept(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=16, n_test=0, size=(24, 24))
    out = tmp_path / "f"
    partial = out / "gap_ResNet50.h5.partial"
    proc = extract_proc(data, "--models", "r50", "--weights", "none", "--out", out, "--batch-size", "2",
                        "--no-progress")
    rows = wait_for_rows(partial, proc, 4)
    shutil.rmtree(out)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the extraction hung after its folder was deleted")
    if proc.returncode == 0 or rows < 4:
        pytest.skip(f"could not catch the run mid-way (rows_written={rows})")
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(catfeat_lines(err)) == 1, err
    assert f"{partial} (its folder {out} too) was removed during the run; nothing was kept" in err
    assert "rerun the same command to start over" in err and "kept:" not in err
    assert not out.exists()  # nothing recreated behind the user's back


# -- 4. NaN/Inf rows are named by their image files ---------------------------------------------------
def test_write_time_nan_names_images_and_counts(tmp_path):
    names = [f"train/cat.{i}.jpg" for i in range(8)]
    w = FeatureWriter(tmp_path / "gap_X.h5", {"backbone": "X"}, names, np.zeros(8, int), ["train"] * 8, 3)
    feats = np.ones((8, 3), np.float32)
    feats[1:, 2] = np.nan  # 7 of 8 rows
    with pytest.raises(FloatingPointError) as e:
        w.write(0, np.ones(8, bool), feats, {})
    msg = str(e.value)
    assert ("X produced NaN/Inf features for ['train/cat.1.jpg', 'train/cat.2.jpg', 'train/cat.3.jpg', "
            "'train/cat.4.jpg', 'train/cat.5.jpg'] and 2 more (7 of the 8 images of this batch)") in msg
    w.close()


def nan_training_cache(folder, rows=(6, 13), n=40, d=6):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    names = [f"train/{'cat' if v == 0 else 'dog'}.{i}.jpg" for i, v in enumerate(y)]
    path = write_cache(folder / f"gap_{NAME}.h5", NAME, rng.normal(size=(n, d)) + 2.0 * y[:, None], y, names,
                       rng.normal(size=(4, d)), [f"test/{i + 1}.jpg" for i in range(4)])
    with h5py.File(path, "r+") as f:  # the writer refuses NaN: damage the file as a bad disk or tool would
        for i in rows:
            f["train"][i, 1] = np.nan
    return folder, names


@pytest.mark.parametrize("mode", [[], ["--cv", "3"], ["--stream"]])
def test_fit_names_nan_training_images(tmp_path, capsys, mode):
    feats, _ = nan_training_cache(tmp_path / "f")
    rc = fit_cli.main(["--features", str(feats), "--preset", "reference", "--epochs", "1", *mode])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err
    # streamed, the rows are checked as each block is read (here the 32 rows of the holdout's training part)
    of = "of 32" if mode == ["--stream"] else "of 40"
    assert f"2 training rows (e.g. train/cat.6.jpg, train/dog.13.jpg) {of} hold NaN in the features of {NAME}" in err
    assert "#" not in err


def test_cross_validate_names_rows_of_x_not_of_a_fold(tmp_path):
    feats, names = nan_training_cache(tmp_path / "f", rows=(37,))
    X = {NAME: open_cache(feats / f"gap_{NAME}.h5").features()}
    y = np.arange(40) % 2
    head = FusedHead(preset="reference", epochs=1)
    with pytest.raises(ValueError, match=r"1 training row \(e.g. #37\) of 40 holds NaN"):
        cross_validate(head, X, y, cv=3)
    with pytest.raises(ValueError, match=r"1 training row \(e.g. train/dog.37.jpg\) of 40 holds NaN"):
        cross_validate(head, X, y, cv=3, names=names)
