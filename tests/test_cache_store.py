"""catfeat.cache.store called directly: the writer, the reader's validation, alignment by name, the checks.

Small arrays in tmp_path, no Keras model; the CLI-level behaviour is in test_hostile_caches.py and others.
"""
from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest

from catfeat.cache.store import (
    FORMAT, CacheError, FeatureCache, FeatureWriter, align, cache_path, check_finite, check_same_source, differences,
    load_features, open_cache, partial_attrs, partial_path, write_cache)

M0, M1 = "EfficientNetLite0", "EfficientNetLite1"
ATTRS = {"backbone": M0, "weights": "none", "input_size": 32, "preprocessing": "torch", "precision": "float32",
         "tta": "none", "decoder": "pillow", "images_fingerprint": "abc", "dtype": "float32", "on_damaged": "keep",
         "feature_dim": 3, "classes": '["cat", "dog"]'}


def image_set(n_train: int = 6, n_test: int = 2):
    names = [f"train/{'cat' if i % 2 == 0 else 'dog'}.{i}.jpg" for i in range(n_train)]
    names += [f"test/{i}.jpg" for i in range(1, n_test + 1)]
    labels = np.array([i % 2 for i in range(n_train)] + [-1] * n_test)
    split = ["train"] * n_train + ["test"] * n_test
    return names, labels, split


def rows_for(positions) -> np.ndarray:
    """A feature row that says which image position it belongs to."""
    return np.array([[p, p + 0.5, -p] for p in positions], np.float32)


def writer(path, attrs=ATTRS, n_train=6, n_test=2) -> FeatureWriter:
    names, labels, split = image_set(n_train, n_test)
    return FeatureWriter(path, attrs, names, labels, split, dim=3)


# -- naming ------------------------------------------------------------------------------------------
def test_cache_and_partial_paths(tmp_path):
    path = cache_path(tmp_path / "features", M0)
    assert path == tmp_path / "features" / f"gap_{M0}.h5"
    assert partial_path(path) == tmp_path / "features" / f"gap_{M0}.h5.partial"
    assert cache_path("features", "X").as_posix() == "features/gap_X.h5"


# -- FeatureWriter ------------------------------------------------------------------------------------
def test_writer_finish_moves_the_partial_file_into_place(tmp_path):
    path = cache_path(tmp_path, M0)
    w = writer(path)
    assert w.partial.exists() and not path.exists()
    ok = np.array([True, True, False, True, True, True, True, True])  # position 2 could not be decoded
    w.write(0, ok, rows_for(np.flatnonzero(ok)), {2: "cannot identify image file"}, damaged={4: "truncated"})
    assert not path.exists() and partial_attrs(w.partial)["rows_written"] == 8
    assert w.finish() == path
    assert path.exists() and not w.partial.exists()
    c = open_cache(path)
    names, _, _ = image_set()
    assert c.names("train").tolist() == [n for i, n in enumerate(names[:6]) if i != 2]
    np.testing.assert_array_equal(c.features("train"), rows_for([0, 1, 3, 4, 5]))
    np.testing.assert_array_equal(c.features("test"), rows_for([6, 7]))
    assert c.labels().tolist() == [0, 1, 1, 0, 1]
    assert c.skipped() == [{"path": names[2], "reason": "cannot identify image file"}]
    assert c.damaged() == [{"path": names[4], "reason": "truncated"}]
    assert c.attrs["complete"] is True and c.attrs["skipped_count"] == 1 and len(c) == 7


def test_writer_refuses_gaps_early_finish_and_bad_rows(tmp_path):
    w = writer(cache_path(tmp_path, M0))
    with pytest.raises(RuntimeError, match="gap in positions"):
        w.write(2, np.ones(2, bool), rows_for([2, 3]), {})
    with pytest.raises(ValueError, match="expected features of shape"):
        w.write(0, np.ones(2, bool), rows_for([0]), {})
    bad = rows_for([0, 1])
    bad[1, 0] = np.nan
    with pytest.raises(FloatingPointError, match="train/dog.1.jpg"):
        w.write(0, np.ones(2, bool), bad, {})
    w.write(0, np.ones(4, bool), rows_for(range(4)), {})
    with pytest.raises(RuntimeError, match="after 4 of 8 images"):
        w.finish()
    w.close()
    assert w.partial.exists() and not cache_path(tmp_path, M0).exists()
    assert partial_attrs(w.partial)["rows_written"] == 4


def test_writer_resumes_at_the_marker_and_ignores_positions_already_written(tmp_path):
    path = cache_path(tmp_path, M0)
    w = writer(path)
    w.write(0, np.array([True, False, True]), rows_for([0, 2]), {1: "broken"})
    w.close()
    with pytest.raises(CacheError, match="incomplete .3 of 8 images.*rerun the extraction"):
        open_cache(w.partial)
    assert open_cache(w.partial, require_complete=False).attrs["complete"] is False

    w = writer(path)
    assert w.resumed_from == 3 and w.next_index == 3
    w.write(0, np.ones(5, bool), rows_for(range(5)), {})  # a whole batch fed again: only 3, 4 are new
    w.write(5, np.ones(3, bool), rows_for(range(5, 8)), {})
    w.finish()
    c = open_cache(path)
    np.testing.assert_array_equal(c.features("train"), rows_for([0, 2, 3, 4, 5]))
    assert [s["reason"] for s in c.skipped()] == ["broken"]
    assert c.names("test").tolist() == ["test/1.jpg", "test/2.jpg"]


def test_resume_drops_rows_written_after_the_last_marker(tmp_path):
    """A kill between appending rows and moving ``rows_written`` leaves rows the marker does not cover."""
    path = cache_path(tmp_path, M0)
    w = writer(path)
    w.write(0, np.ones(2, bool), rows_for([0, 1]), {})
    w.close()
    with h5py.File(w.partial, "r+") as f:  # what the killed run had half-written for position 2
        for ds, value in (("train", rows_for([99])), ("train_names", np.array([b"train/cat.2.jpg"], object)),
                          ("label", np.array([0]))):
            f[ds].resize(3, axis=0)
            f[ds][2:] = value
    w = writer(path)
    assert w.resumed_from == 2
    w.write(2, np.ones(6, bool), rows_for(range(2, 8)), {})
    w.finish()
    np.testing.assert_array_equal(open_cache(path).features("train"), rows_for(range(6)))


def test_a_partial_of_another_request_is_started_over(tmp_path, caplog):
    path = cache_path(tmp_path, M0)
    w = writer(path)
    w.write(0, np.ones(3, bool), rows_for(range(3)), {})
    w.close()
    with caplog.at_level(logging.WARNING, logger="catfeat"):
        w = writer(path, {**ATTRS, "input_size": 64})
    assert w.resumed_from == 0 and partial_attrs(w.partial)["rows_written"] == 0
    assert "starting" in caplog.text and "input_size" in caplog.text
    w.close()
    assert not w.partial.exists()  # nothing written: close discards it


def test_an_unreadable_partial_is_started_over(tmp_path):
    path = cache_path(tmp_path, M0)
    partial_path(path).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)  # torn by a kill
    assert partial_attrs(partial_path(path)) is None
    w = writer(path)
    assert w.resumed_from == 0
    w.write(0, np.ones(8, bool), rows_for(range(8)), {})
    assert open_cache(w.finish()).attrs["format"] == FORMAT


# -- write_cache and open_cache -------------------------------------------------------------------------
def test_write_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(5, 4)), rng.normal(size=(2, 4))
    names = [f"train/x{i}.jpg" for i in range(5)]
    path = write_cache(tmp_path / f"gap_{M1}.h5", M1, train, [0, 1, 2, 1, 0], names, test, ["test/1.jpg", "test/2.jpg"],
                       classes=("a", "b", "c"), attrs={"weights": "imagenet"})
    c = open_cache(path)
    assert c.name == M1 and c.classes == ["a", "b", "c"] and c.attrs["weights"] == "imagenet"
    assert c.attrs["n_train"] == 5 and c.attrs["n_test"] == 2 and c.attrs["feature_dim"] == 4
    np.testing.assert_allclose(c.features("train"), train.astype(np.float32))
    np.testing.assert_allclose(c.features("test"), test.astype(np.float32))
    assert c.features().dtype == np.float32 and c.labels().tolist() == [0, 1, 2, 1, 0]
    assert c.names().tolist() == names and c.skipped() == [] and c.damaged() == []
    assert not partial_path(path).exists()
    # written again over the old one: replaced whole
    write_cache(path, M1, train[:2], [1, 0], names[:2])
    assert open_cache(path).attrs["n_train"] == 2 and open_cache(path).attrs["n_test"] == 0


def test_open_cache_refuses_a_truncated_file_in_one_line(tmp_path):
    path = write_cache(tmp_path / f"gap_{M0}.h5", M0, np.ones((200, 64)), [0, 1] * 100,
                       [f"train/{i}.jpg" for i in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError) as e:
        open_cache(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and "extract again" in str(e.value)
    path.write_bytes(data[:4])
    with pytest.raises(CacheError, match="not an HDF5 file"):
        open_cache(path)


def test_open_cache_names_an_unfinished_partial_and_a_misnamed_file(tmp_path):
    path = cache_path(tmp_path, M0)
    w = writer(path)
    w.write(0, np.ones(1, bool), rows_for([0]), {})
    w.close()
    with pytest.raises(CacheError, match="an unfinished gap_EfficientNetLite0.h5.partial exists"):
        open_cache(path)
    other = write_cache(tmp_path / "x.h5", M0, np.ones((2, 3)), [0, 1], ["a", "b"])
    other.rename(cache_path(tmp_path, M1))
    with pytest.raises(CacheError, match=f"holds features of '{M0}', not {M1}"):
        open_cache(cache_path(tmp_path, M1))


def test_labels_outside_the_classes_are_refused_naming_the_image(tmp_path):
    path = write_cache(tmp_path / f"gap_{M0}.h5", M0, np.ones((3, 2)), [0, 2, 1], ["a.jpg", "b.jpg", "c.jpg"])
    with pytest.raises(CacheError, match=r"label 2 of 'b.jpg' \(1 bad label\(s\) in all\).*\['cat', 'dog'\]"):
        open_cache(path).labels()
    unlabeled = write_cache(tmp_path / f"gap_{M1}.h5", M1, np.ones((2, 2)), [-1, -1], ["a.jpg", "b.jpg"])
    assert open_cache(unlabeled).labels().tolist() == [-1, -1]


# -- alignment by name --------------------------------------------------------------------------------
def test_align_orders_every_cache_like_the_first():
    a = ["x", "y", "z", "w"]
    b = ["w", "z", "x", "y"]
    order, idx = align({"A": a, "B": b})
    assert order == a and [b[i] for i in idx["B"]] == a and idx["A"].tolist() == [0, 1, 2, 3]
    order, idx = align({"A": a, "B": ["z", "q", "x"]}, join="inner")
    assert order == ["x", "z"] and idx["B"].tolist() == [2, 0]
    with pytest.raises(CacheError, match=r"hold different images \(2 only in A.*1 only in B.*join='inner'"):
        align({"A": a, "B": ["z", "q", "x"]})
    with pytest.raises(CacheError, match="cache of B lists the same image twice"):
        align({"A": a, "B": ["x", "x", "y", "z"]})
    with pytest.raises(ValueError, match="join must be"):
        align({"A": a}, join="outer")


def test_load_features_pairs_rows_by_name_not_position(tmp_path):
    names = [f"train/{'cat' if i < 4 else 'dog'}.{i}.jpg" for i in range(8)]
    y = np.array([0] * 4 + [1] * 4)
    ident = np.arange(8, dtype=np.float32)[:, None]
    write_cache(cache_path(tmp_path, M0), M0, np.hstack([ident, ident]), y, names)
    perm = np.random.default_rng(3).permutation(8)
    write_cache(cache_path(tmp_path, M1), M1, np.hstack([ident, -ident])[perm], y[perm], [names[i] for i in perm])
    X, labels, order = load_features("lite0,lite1", tmp_path)
    assert order.tolist() == names and labels.tolist() == y.tolist()
    np.testing.assert_array_equal(X[M0][:, 0], X[M1][:, 0])  # the same image on every row
    np.testing.assert_array_equal(X[M1][:, 1], -np.arange(8))

    keep = perm[:5]
    write_cache(cache_path(tmp_path, M1), M1, np.hstack([ident, -ident])[keep], y[keep], [names[i] for i in keep])
    with pytest.raises(CacheError, match="hold different images"):
        load_features("lite0,lite1", tmp_path)
    X, labels, order = load_features("lite0,lite1", tmp_path, join="inner")
    assert order.tolist() == [names[i] for i in sorted(keep)] and labels.tolist() == y[sorted(keep)].tolist()
    np.testing.assert_array_equal(X[M0][:, 0], X[M1][:, 0])


def test_load_features_refuses_caches_that_disagree_on_labels(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    write_cache(cache_path(tmp_path, M0), M0, np.ones((3, 2)), [0, 1, 0], names)
    write_cache(cache_path(tmp_path, M1), M1, np.ones((3, 2)), [0, 1, 1], names)
    with pytest.raises(CacheError, match="disagree on labels"):
        load_features("lite0,lite1", tmp_path)


# -- differences, check_same_source, check_finite --------------------------------------------------
def test_differences_compares_key_fields_with_legacy_defaults():
    old = {k: v for k, v in ATTRS.items() if k not in ("decoder", "dtype", "on_damaged")}  # an older cache
    assert differences(old, ATTRS) == {}
    assert differences(old, {**ATTRS, "decoder": "opencv"}) == {"decoder": ("pillow", "opencv")}
    assert differences(ATTRS, {**ATTRS, "input_size": "32"}) == {}  # compared as text
    assert differences(ATTRS, {**ATTRS, "feature_dim": 9, "classes": "[]"}) == {}  # not key fields
    assert differences(ATTRS, {"tta": "flip"}) == {"tta": ("none", "flip")}


def test_check_same_source_refuses_caches_of_different_images(tmp_path):
    def cache(name, **attrs):
        return FeatureCache(tmp_path / f"gap_{name}.h5", {"images_fingerprint": "f1", "data_root": "/d",
                                                          "classes": '["cat", "dog"]', **attrs})

    check_same_source({M0: cache(M0), M1: cache(M1)})
    check_same_source({M0: cache(M0), M1: cache(M1, data_root="/copy")})  # same fingerprint: moved
    check_same_source({M0: cache(M0, images_fingerprint=""), M1: cache(M1, images_fingerprint="f2")})  # unknown
    with pytest.raises(CacheError, match=r"images_fingerprint: gap_EfficientNetLite0.h5 has 'f1'.*--models "
                                         f"{M0},{M1}"):
        check_same_source({M0: cache(M0), M1: cache(M1, images_fingerprint="f2")})
    check_same_source({M0: cache(M0), M1: cache(M1, images_fingerprint="f2")}, join="inner")
    with pytest.raises(CacheError, match="classes"):
        check_same_source({M0: cache(M0), M1: cache(M1, classes=json.dumps(["dog", "cat"]))}, join="inner")


def test_check_finite_names_the_image():
    good = np.ones((4, 2))
    check_finite({M0: good, M1: good}, ["a", "b", "c", "d"])
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=rf"1 row \(e.g. c\) of 4 holds NaN in the features of {M1}"):
        check_finite({M0: good, M1: bad}, ["a", "b", "c", "d"])
    worse = good.copy()
    worse[[0, 3], 0] = np.inf
    with pytest.raises(ValueError, match=rf"3 images \(e.g. #0, #2, #3\) of 4 hold NaN and Inf .* of {M0}, {M1}"):
        check_finite({M0: worse, M1: bad}, what="image")


def test_a_scheduled_writer_keeps_rows_in_memory_until_a_flush_and_the_marker_with_them(tmp_path):
    """With ``flush_seconds``, rows reach the file only at a flush, and ``rows_written`` with them: what
    is on disk is always the prefix the marker names; ``close`` writes what waits (Ctrl-C, an error)."""
    w = FeatureWriter(cache_path(tmp_path, M0), ATTRS, *image_set(), dim=3, flush_seconds=3600)
    w.write(0, np.array([True, False, True]), rows_for([0, 2]), {1: "broken"}, damaged={2: "truncated"})
    w.write(3, np.ones(2, bool), rows_for([3, 4]), {})
    assert partial_attrs(w.partial)["rows_written"] == 0 and w.next_index == 5 and w.rows == 4
    with h5py.File(w.partial, "r") as f:
        assert f["train"].shape == (0, 3) and f["skipped_index"].shape == (0,)
    w.flush()
    assert partial_attrs(w.partial)["rows_written"] == 5
    w.write(5, np.ones(3, bool), rows_for([5, 6, 7]), {})  # 5 is train, 6 and 7 test: one batch, both splits
    assert partial_attrs(w.partial)["rows_written"] == 5
    w.close()
    assert partial_attrs(w.partial)["rows_written"] == 8
    c = open_cache(w.partial, require_complete=False)
    np.testing.assert_array_equal(c.features("train"), rows_for([0, 2, 3, 4, 5]))
    np.testing.assert_array_equal(c.features("test"), rows_for([6, 7]))
    assert [s["reason"] for s in c.skipped()] == ["broken"]
    with h5py.File(w.partial, "r") as f:  # the damaged count is set by finish(); the rows are there
        assert f["damaged_index"][()].tolist() == [2] and f["damaged_reasons"][()].tolist() == [b"truncated"]
