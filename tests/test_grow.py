"""Caches that grow (issue 25): a rerun on a changed image set keeps the rows of unchanged files and
leaves a cache equal, row for row, to a full rebuild into another folder."""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from catfeat.cache.store import FeatureWriter, StaleCacheError, open_cache, write_cache
from catfeat.cli.info import main as info_main
from catfeat.extraction import grow
from catfeat.extraction.run import run_extraction
from catfeat.images.listing import list_images

from conftest import make_kaggle, save_image

MODEL, NAME = "lite0", "EfficientNetLite0"
FAST = dict(weights=None, batch_size=4, progress=False)
SIZE = (24, 24)


def contents(path) -> dict:
    """Every dataset of a cache (strings decoded) and the attributes a rebuild must share."""
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in f}
        attrs = {k: f.attrs[k] for k in ("images_fingerprint", "n_images", "rows_written", "skipped_count",
                                         "damaged_count", "classes", "layout", "complete")}
    for k, v in out.items():
        if v.dtype == object:
            out[k] = [x.decode() for x in v]
    return {**out, "attrs": attrs}


def assert_equals_rebuild(data, grown, tmp_path, tag) -> dict:
    """``grown`` holds what a fresh extraction of ``data`` into another folder holds."""
    fresh = run_extraction(data, MODEL, tmp_path / f"rebuild-{tag}", **FAST)
    got, want = contents(grown), contents(fresh.paths[NAME])
    assert sorted(got) == sorted(want)
    for k in want:
        if k in ("train", "test"):  # computed by the same model on the same pixels
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
        elif k == "attrs":
            assert got[k] == want[k]
        else:
            assert list(got[k]) == list(want[k]), k
    return got


def assert_kept_bitwise(before: dict, after: dict) -> int:
    """Rows whose name and stamp are in both caches hold the very same bytes; returns how many."""
    n = 0
    for split in ("train", "test"):
        old = {(name, st): row for name, st, row in zip(before[f"{split}_names"], before[f"{split}_stamps"],
                                                        before[split])}
        for name, st, row in zip(after[f"{split}_names"], after[f"{split}_stamps"], after[split]):
            if (name, st) in old:
                assert old[(name, st)].tobytes() == row.tobytes(), name
                n += 1
    return n


def grow_run(data, out):
    report = run_extraction(data, MODEL, out, **FAST)
    assert not (out / ".grow").exists() and not (out / f"gap_{NAME}.h5.partial").exists()
    return report


def test_added_changed_removed_renamed_new_class_and_retried_equal_a_rebuild(tmp_path, capsys):
    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=2, size=SIZE)
    jpeg = save_image(data / "train" / "dog.5.jpg", 5, (200, 150)).read_bytes()
    (data / "train" / "dog.5.jpg").write_bytes(jpeg[:len(jpeg) // 2] + b"\xff\xd9")  # decodes, half gray
    out = tmp_path / "features"
    path = run_extraction(data, MODEL, out, **FAST).paths[NAME]
    before = contents(path)
    assert len(before["train_stamps"]) == 7 and len(before["test_stamps"]) == 2
    assert before["damaged_names"] == ["train/dog.5.jpg"]

    # a damaged JPEG (decoded, listed as damaged) is kept with its reason;
    # added (a photo, a file that cannot be decoded: skipped as a rebuild skips it, a photo of a new
    # class: label indices shift to bird=0, cat=1, dog=2 and kept rows are re-mapped by class name),
    # changed (rewritten), removed, renamed
    save_image(data / "train" / "cat.7.jpg", 7, SIZE)
    (data / "train" / "cat.8.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    save_image(data / "train" / "bird.0.jpg", 5, SIZE)
    save_image(data / "train" / "dog.1.jpg", 999, SIZE)
    (data / "test" / "2.jpg").unlink()
    os.rename(data / "train" / "cat.0.jpg", data / "train" / "cat.10.jpg")
    said = []
    report = run_extraction(data, MODEL, out, log=said.append, **FAST)
    assert not (out / ".grow").exists() and not (out / f"gap_{NAME}.h5.partial").exists()
    assert report.processed == 5
    assert report.grown == {NAME: dict(kept=6, added=4, changed=1, removed=2, retried=0)}
    assert "grown: 6 kept, 4 added, 1 changed, 2 removed;" in report.summary()
    assert [s["path"] for s in report.skipped] == ["train/cat.8.jpg"]
    assert [d["path"] for d in report.damaged] == ["train/dog.5.jpg"]  # kept, with its reason
    assert any("classes changed from ['cat', 'dog'] to ['bird', 'cat', 'dog']" in s for s in said)
    after = assert_equals_rebuild(data, path, tmp_path, 1)
    assert assert_kept_bitwise(before, after) == 6
    assert open_cache(path).labels().tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]

    # the skipped file fixed: tried again, as a rebuild would
    before = after
    save_image(data / "train" / "cat.8.jpg", 8, SIZE)
    report = grow_run(data, out)
    assert report.processed == 1 and report.skipped == []
    assert report.grown[NAME] == dict(kept=10, added=0, changed=0, removed=0, retried=1)
    after = assert_equals_rebuild(data, path, tmp_path, 2)
    assert assert_kept_bitwise(before, after) == 10

    # the same command again: nothing changed, the cache is reused as is; `catfeat info` tells the last growth
    assert run_extraction(data, MODEL, out, **FAST).reused == [NAME]
    capsys.readouterr()
    assert info_main([str(out)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[-1] == "grown" and row.endswith("10 kept, 0 added, 0 changed, 0 removed, 1 retried")


def test_crash_mid_growth_resumes_and_other_recipes_are_refused(tmp_path, monkeypatch):
    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=0, size=SIZE)
    out = tmp_path / "features"
    path = run_extraction(data, MODEL, out, **FAST).paths[NAME]
    old = contents(path)
    for k in range(3):
        save_image(data / "train" / f"dog.{10 + k}.jpg", 50 + k, SIZE)
    (data / "train" / "cat.2.jpg").unlink()

    # another recipe is refused as before, images changed or not, and the cache is left alone
    with pytest.raises(StaleCacheError, match="weights: cache has 'none\\(seed=0\\)', asked 'none\\(seed=1\\)'"):
        run_extraction(data, MODEL, out, **{**FAST, "weights": "none(seed=1)"})
    with pytest.raises(StaleCacheError, match="dtype"):
        run_extraction(data, MODEL, out, dtype="float16", **FAST)

    original = FeatureWriter.write
    calls = {"n": 0}

    def crash_at(n):
        def write(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)
        return write

    # killed while computing the new images (batch 2 of the delta): the old cache is still whole
    monkeypatch.setattr(FeatureWriter, "write", crash_at(2))
    with pytest.raises(KeyboardInterrupt):
        run_extraction(data, MODEL, out, **{**FAST, "batch_size": 1})
    delta = grow.delta_path(path)
    assert os.path.exists(f"{delta}.partial") and contents(path)["attrs"] == old["attrs"]

    # rerun: the delta resumes, then killed while merging (merge step 2): the old cache is still whole
    calls["n"] = 0
    monkeypatch.setattr(grow, "MERGE_ROWS", 2)
    monkeypatch.setattr(FeatureWriter, "write", crash_at(4))  # 2 rest of the delta, then merge steps 1, 2
    with pytest.raises(KeyboardInterrupt):
        run_extraction(data, MODEL, out, **{**FAST, "batch_size": 1})
    assert delta.exists() and (out / f"gap_{NAME}.h5.partial").exists()
    assert contents(path)["attrs"] == old["attrs"]

    # rerun: the delta is complete (nothing computed), the merge resumes; the result equals a rebuild
    monkeypatch.setattr(FeatureWriter, "write", original)
    report = grow_run(data, out)
    assert report.processed == 0 and report.grown[NAME] == dict(kept=5, added=3, changed=0, removed=1, retried=0)
    after = assert_equals_rebuild(data, path, tmp_path, "crash")
    assert assert_kept_bitwise(old, after) == 5


def test_a_cache_without_stamps_computes_every_image(tmp_path):
    """Caches of earlier versions (and write_cache's) record no stamps: nothing can be kept."""
    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=1, size=SIZE)
    images = list_images(data)
    train = [n for n, s in zip(images.names, images.split) if s == "train"]
    path = write_cache(tmp_path / f"gap_{NAME}.h5", NAME, np.ones((4, 3)), [0, 0, 1, 1], train,
                       np.ones((1, 3)), ["test/1.jpg"])
    g = grow.plan_growth(path, images, images.stamps())
    assert g.compute == list(range(5)) and g.counts["kept"] == 0 and g.counts["changed"] == 5
    assert "records no per-image stamps" in g.note
    shutil.rmtree(data / "test")
    g = grow.plan_growth(path, list_images(data), list_images(data).stamps())
    assert g.counts["removed"] == 1 and g.counts["changed"] == 4


def test_scratch_of_an_earlier_growth_is_dropped_only_when_its_images_changed(tmp_path):
    cache = tmp_path / f"gap_{NAME}.h5"
    delta = grow.delta_path(cache)
    grow.make_grow_dir(cache)
    attrs = {"backbone": NAME, "images_fingerprint": "a", "feature_dim": 3}
    w = FeatureWriter(delta, attrs, ["x.jpg", "y.jpg"], np.zeros(2, np.int64), ["train"] * 2, 3)
    w.write(0, np.ones(1, bool), np.ones((1, 3)), {})
    w.close()  # an unfinished delta, 1 of 2 images done
    said = []
    grow.drop_stale_delta(delta, attrs, 2, said.append)  # the same growth: kept, to resume
    assert os.path.exists(f"{delta}.partial") and said == []
    grow.drop_stale_delta(delta, {**attrs, "images_fingerprint": "b"}, 2, said.append)
    assert not os.path.exists(f"{delta}.partial") and "since changed" in said[0]
    grow.remove_delta(cache)
    assert not (tmp_path / ".grow").exists()
