"""Streaming from the caches (catfeat.cache.rows), float16 caches, and the out-of-memory refusal."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from catfeat.cli import fit as fit_cli
from catfeat.cache import store, rows as streaming
from catfeat.head.comparison import compare
from catfeat.head.scoring import holdout_score
from catfeat.head.estimator import FusedHead
from catfeat.cache.store import MemoryShortError, cache_path, differences, load_features, open_cache, write_cache
from catfeat.head.streamed import forward_rows
from catfeat.cache.rows import CacheRows, EpochBatches

from conftest import make_caches

MODELS = "lite0,lite1"


@pytest.fixture
def caches(tmp_path):
    return make_caches(tmp_path, n=400, n_test=20, dims=(12, 8), sep=(0.9, 0.4))


def test_rows_read_like_load_features_in_any_file_order(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 50)
    names = [f"train/{'cat' if v == 0 else 'dog'}.{i}.jpg" for i, v in enumerate(y)]
    a, b = rng.normal(size=(100, 5)), rng.normal(size=(100, 3))
    perm = rng.permutation(100)  # the second cache lists the images in another order
    write_cache(tmp_path / "gap_EfficientNetLite0.h5", "EfficientNetLite0", a, y, names)
    write_cache(tmp_path / "gap_EfficientNetLite1.h5", "EfficientNetLite1", b[perm], y[perm], [names[i] for i in perm])
    X, yl, order = load_features(MODELS, tmp_path)
    rows = CacheRows.open(MODELS, tmp_path)
    assert rows.names.tolist() == order.tolist() and np.array_equal(rows.labels, yl)
    for got, k in zip(rows.read(), X):
        assert got.dtype == np.float32 and np.array_equal(got, X[k])
    pick = np.array([90, 3, 3, 50, 0])  # unsorted, repeated
    sub = rows.subset(pick)
    for span in (1, 2, 1000):
        for got, k in zip(sub.read(span=span), X):
            assert np.array_equal(got, X[k][pick])
    assert np.array_equal(np.concatenate([arr[0] for _, arr in rows.blocks(7)]), X["EfficientNetLite0"])


@pytest.mark.parametrize("block,buffer", [(1, 4), (16, 64), (7, 1000), (None, None)])
def test_every_row_once_an_epoch_whatever_the_chunk_size(caches, block, buffer):
    rows = CacheRows.open(MODELS, caches)
    weights = np.arange(len(rows), dtype=np.float32)
    b = EpochBatches(rows, rows.labels, 32, seed=3, block_rows=block, buffer_rows=buffer, weights=weights)
    assert len(b) == int(np.ceil(len(rows) / 32))
    seen = []
    for i in range(len(b)):
        (x0, x1), t, w = b.batch_at(i)
        first = rows.read()[0]
        idx = [int(np.flatnonzero((first == r).all(axis=1))[0]) for r in x0]
        assert np.array_equal(t, rows.labels[idx]) and np.array_equal(w, weights[idx])
        seen += idx
    b.close()
    assert sorted(seen) == list(range(len(rows)))
    assert not np.array_equal(b.epoch_order(0), b.epoch_order(1))  # reshuffled each epoch
    assert np.array_equal(b.epoch_order(1), EpochBatches(rows, rows.labels, 32, 3, block, buffer).epoch_order(1))


def test_predictions_do_not_depend_on_the_chunk_size(caches):
    X, y, _ = load_features(MODELS, caches)
    head = FusedHead(preset="reference", epochs=2, random_state=0).fit(X, y)
    rows = CacheRows.open(MODELS, caches)
    ref = head.predict_proba(X)
    assert np.allclose(head.predict_proba(rows), ref, atol=1e-6)
    for block in (1, 13, 10000):
        p = forward_rows(head.model_, rows, block)
        assert np.allclose(p[:, 0], ref[:, 1], atol=1e-6)


def test_streaming_fit_matches_the_in_memory_fit(caches):
    X, y, _ = load_features(MODELS, caches)
    rows = CacheRows.open(MODELS, caches)
    mem = holdout_score(FusedHead(random_state=1), X, y)
    st = holdout_score(FusedHead(random_state=1), rows, y)
    assert np.array_equal(mem.index, st.index)  # the same split: row subsets of the aligned order
    assert abs(mem.log_loss - st.log_loss) < 0.03 and abs(mem.accuracy - st.accuracy) < 0.03
    assert np.corrcoef(mem.proba[:, 1], st.proba[:, 1])[0, 1] > 0.98


def test_small_buffers_and_streamed_validation(caches, monkeypatch):
    monkeypatch.setattr(streaming, "VAL_IN_MEMORY_BYTES", 0)  # score early stopping from the caches
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 0)  # the smallest blocks (64 rows) ...
    monkeypatch.setattr(streaming, "BUFFER_BYTES", 0)  # ... and buffers (one batch): 3 buffers an epoch
    rows = CacheRows.open(MODELS, caches)
    head = FusedHead(random_state=2, epochs=15).fit(rows, rows.labels)
    assert 1 <= head.n_epochs_ <= 15 and len(head.history_["val_log_loss"]) >= head.n_epochs_
    X = rows.to_arrays()
    mem = FusedHead(random_state=2, epochs=15).fit(X, rows.labels)
    assert head.score(X, rows.labels) > mem.score(X, rows.labels) - 0.05


def test_streamed_class_and_sample_weights_act_as_in_memory(caches):
    X, y, _ = load_features(MODELS, caches)
    rows = CacheRows.open(MODELS, caches)
    fast = dict(preset="reference", epochs=20, batch_size=32, learning_rate=0.01, random_state=1)
    cw = {0: 0.2, 1: 5.0}
    mem = FusedHead(**fast, class_weight=cw).fit(X, y).predict_proba(X)[:, 1]
    st = FusedHead(**fast, class_weight=cw).fit(rows, y).predict_proba(X)[:, 1]
    plain = FusedHead(**fast).fit(rows, y).predict_proba(X)[:, 1]
    # the rows come in another order than in memory: close, not equal
    assert abs(st.mean() - mem.mean()) < 0.02 and np.corrcoef(st, mem)[0, 1] > 0.99
    assert st.mean() > plain.mean() + 0.05  # the weights change the streamed fit
    per_row = FusedHead(**fast).fit(rows, y, sample_weight=np.where(y == 1, 5.0, 0.2)).predict_proba(X)[:, 1]
    np.testing.assert_allclose(per_row, st, rtol=1e-6)
    with pytest.raises(ValueError, match="sample_weight"):
        FusedHead(**fast).fit(rows, y, sample_weight=np.ones(3))


def test_streamed_early_stopping_weighs_the_validation_loss(caches, monkeypatch):
    rows = CacheRows.open(MODELS, caches)
    y = rows.labels
    w = np.where(y == 1, 4.0, 1.0)

    def fit():
        return FusedHead(random_state=2, epochs=6, class_weight="balanced").fit(rows, y, sample_weight=w)

    read_once = fit().history_["val_log_loss"]
    monkeypatch.setattr(streaming, "VAL_IN_MEMORY_BYTES", 0)  # score early stopping from the caches
    streamed = fit().history_["val_log_loss"]
    np.testing.assert_allclose(streamed, read_once, rtol=1e-6)
    unweighted = FusedHead(random_state=2, epochs=6).fit(rows, y).history_["val_log_loss"]
    assert not np.allclose(streamed, unweighted)


def test_float16_cache_halves_the_file_and_loads_as_float32(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((300, 64)).astype(np.float32) * 5
    y = np.arange(300) % 2
    names = [f"train/{i}.jpg" for i in range(300)]
    p32 = write_cache(tmp_path / "a" / "gap_EfficientNetLite0.h5", "EfficientNetLite0", x, y, names)
    p16 = write_cache(tmp_path / "b" / "gap_EfficientNetLite0.h5", "EfficientNetLite0", x, y, names,
                      attrs={"dtype": "float16"})
    with h5py.File(p16) as f:
        assert f["train"].dtype == np.float16 and f.attrs["dtype"] == "float16"
    assert p16.stat().st_size < 0.7 * p32.stat().st_size
    c = open_cache(p16)
    feats = c.features()
    assert feats.dtype == np.float32 and np.array_equal(feats, x.astype(np.float16).astype(np.float32))
    assert np.abs(feats - x).max() < 5 * 2 ** -10
    X, _, _ = load_features("lite0", tmp_path / "b")
    assert np.array_equal(X["EfficientNetLite0"], feats)
    assert np.array_equal(CacheRows.open("lite0", tmp_path / "b").read()[0], feats)
    # the dtype is part of what a cache stands for; caches without the attribute are float32
    assert differences(c.attrs, {"dtype": "float32"}) == {"dtype": ("float16", "float32")}
    assert differences({}, {"dtype": "float32"}) == {}
    with pytest.raises(FloatingPointError, match="float16"):
        write_cache(tmp_path / "c" / "gap_EfficientNetLite0.h5", "EfficientNetLite0", x * 1e5, y, names,
                    attrs={"dtype": "float16"})


def test_memory_refusal_is_one_line_and_names_streaming(caches, monkeypatch, capsys):
    monkeypatch.setattr(store, "available_memory", lambda: 1000)
    with pytest.raises(MemoryShortError, match="--stream"):
        load_features(MODELS, caches)
    assert fit_cli.main(["--features", str(caches), "--models", MODELS, "--no-stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than the" in err and "--stream" in err
    rows = CacheRows.open(MODELS, caches)  # names and indices only: fine
    with pytest.raises(MemoryShortError, match="stream"):
        rows.to_arrays()
    monkeypatch.setattr(store, "available_memory", lambda: 10 ** 12)
    X, y, _ = load_features(MODELS, caches)
    monkeypatch.setattr(store, "available_memory", lambda: 1000)
    with pytest.raises(MemoryShortError, match="linear=False"):
        compare(data=(X, y), features_dir=caches)


def test_cli_streams_cv_submission_save_and_compare(caches, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(streaming, "COMPARE_MAX_ROWS", 200)
    fast = ["--preset", "reference", "--epochs", "3"]
    args = ["--features", str(caches), "--models", MODELS, *fast]
    assert fit_cli.main(args + ["--stream", "--cv", "3", "--submission", str(tmp_path / "s.csv"),
                                "--save", str(tmp_path / "head")]) == 0
    out = capsys.readouterr().out
    assert "streaming CacheRows(400 train rows" in out and "3-fold CV" in out
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 21
    assert FusedHead.load(tmp_path / "head").backbones_ == ["EfficientNetLite0", "EfficientNetLite1"]
    assert fit_cli.main(args + ["--stream", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "stratified sample of 200 of 400 rows" in out
    assert fit_cli.main(args) == 0  # small caches: the in-memory path, as before
    assert "streaming" not in capsys.readouterr().out
    assert cache_path(caches, "EfficientNetLite0").exists()
