"""Helpers merged from repeated code (issue 23): every caller now gets the same checks and errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catfeat.cache.rows import CacheRows
from catfeat.cache.store import CacheError, load_features, write_cache
from catfeat.head.comparison import compare
from catfeat.head.report import load_training
from catfeat.outliers import find_outliers

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "catfeat", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_no_caches_is_one_cache_error_for_fit_compare_and_outliers(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "gap_EfficientNetLite0.h5").write_bytes(b"not an HDF5 file")  # not a complete cache
    for call in (lambda: load_training(None, empty), lambda: compare(features_dir=empty, out_dir=tmp_path),
                 lambda: find_outliers(None, str(empty))):
        with pytest.raises(CacheError, match="no complete feature caches in .*empty.*catfeat extract"):
            call()


@pytest.mark.parametrize("command", ["outliers", "compare"])
def test_cli_without_caches_prints_one_line(tmp_path, command):
    res = _cli(command, "--features", str(tmp_path), "--out" if command == "outliers" else "--out-dir",
               str(tmp_path / "out"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
    assert "no complete feature caches" in lines[0] and "--models" in lines[0]
    assert not (tmp_path / "out").exists()


def test_caches_that_disagree_on_labels_are_refused_in_memory_and_streamed(tmp_path):
    names = [f"train/{i}.jpg" for i in range(6)]
    y = np.array([0, 1, 0, 1, 0, 1])
    rng = np.random.default_rng(0)
    write_cache(tmp_path / "gap_EfficientNetLite0.h5", "EfficientNetLite0", rng.normal(size=(6, 4)), y, names)
    flipped = y.copy()
    flipped[3] = 0
    write_cache(tmp_path / "gap_EfficientNetLite1.h5", "EfficientNetLite1", rng.normal(size=(6, 3)), flipped,
                names)
    for call in (lambda: load_features("lite0,lite1", tmp_path), lambda: CacheRows.open("lite0,lite1", tmp_path)):
        with pytest.raises(CacheError, match="EfficientNetLite0 and EfficientNetLite1 disagree on labels"):
            call()
    # the same labels in another row order agree once aligned by name
    write_cache(tmp_path / "gap_EfficientNetLite1.h5", "EfficientNetLite1", rng.normal(size=(6, 3)), y[::-1],
                names[::-1])
    _, labels, order = load_features("lite0,lite1", tmp_path)
    assert CacheRows.open("lite0,lite1", tmp_path).labels.tolist() == labels.tolist()
    assert dict(zip(order, labels.tolist())) == dict(zip(names, y.tolist()))
