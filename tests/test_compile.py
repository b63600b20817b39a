"""No wasted compute around the model: compiled without running a batch, no padded rows where the
backend takes any batch size, predict computes the images it is given, and under JAX a rerun loads
its compiled programs from the persistent compile cache (and writes the same cache file)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from catfeat.extraction.stages import ModelRunner

from conftest import REPO, make_kaggle


class Stub:
    def __init__(self, fixed_batch, batch_size=4):
        self.batch_size, self.shapes = batch_size, []
        if fixed_batch is not None:
            self.fixed_batch = fixed_batch

    def dispatch(self, x):
        self.shapes.append(x.shape[0])
        return x

    def fetch(self, handle, n):
        return handle[:n, 0, 0, :1].astype(np.float32)


@pytest.mark.parametrize("fixed, expected", [(False, [4, 2]), (True, [4, 4]), (None, [4, 4])])
def test_a_short_batch_is_padded_only_for_a_runner_that_needs_a_fixed_shape(fixed, expected):
    stub = Stub(fixed)
    out = ModelRunner({"a": (8, stub)}, to_device=lambda x: x)({8: np.ones((6, 8, 8, 3), np.uint8)})
    assert stub.shapes == expected and out["a"].shape == (6, 1)  # a runner that does not say is padded


def test_extraction_runs_no_warm_up_batch_and_no_padded_rows(tmp_path, monkeypatch):
    """Every model call of an extraction is a batch of real images (TensorFlow on the CPU): the
    build compiles without running anything, and the short last batch keeps its 2 rows."""
    import catfeat
    from catfeat.models.forward import Forward, needs_fixed_batch

    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=0, size=(48, 36))
    calls = []
    real = Forward.dispatch
    monkeypatch.setattr(Forward, "dispatch", lambda self, x: calls.append(tuple(x.shape)) or real(self, x))
    report = catfeat.run_extraction(data, "lite0", tmp_path / "f", weights=None, batch_size=4, progress=False)
    assert report.processed == 6 and calls == [(4, 224, 224, 3), (2, 224, 224, 3)]
    assert "build" in report.seconds and report.compile_cache == ""  # TensorFlow has no compile cache
    assert not needs_fixed_batch()
    x = catfeat.open_cache(report.paths["EfficientNetLite0"]).features("train")
    assert x.shape == (6, 1280) and np.isfinite(x).all()


def test_predict_computes_only_the_images_it_is_given(tmp_path):
    import catfeat
    from catfeat.predict import build_predictor, predict_images

    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=0, size=(48, 36))
    catfeat.run_extraction(data, "lite0", tmp_path / "features", weights=None, batch_size=8, progress=False)
    X, y, _ = catfeat.load_features("lite0", tmp_path / "features")
    head = catfeat.FusedHead(epochs=1, early_stopping=False, random_state=0).fit(X, y)
    head.save(tmp_path / "head", features=tmp_path / "features")
    model, head = build_predictor(tmp_path / "head", features_dir=tmp_path / "features", allow_random=True)
    rows = []

    def counting(arrays, **kw):
        rows.append([len(a) for a in arrays])
        return model(arrays, **kw)

    one = predict_images(tmp_path / "head", [data / "train" / "cat.0.jpg"], predictor=(counting, head))
    assert rows == [[1]] and len(one) == 1
    rows.clear()
    files = sorted((data / "train").glob("*.jpg"))
    predict_images(tmp_path / "head", files, batch_size=4, predictor=(counting, head))
    assert rows == [[4], [2]]


def _jax_extract(data, out, cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "jax", "CATFEAT_CACHE_DIR": str(cache_dir)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "catfeat.extract", str(data), "--models", "lite0", "--weights", "none",
                        "--out", str(out), "--batch-size", "4", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    build = re.search(r"build [\d.]+s \(compile cache: ([^)]*)\)", r.stdout)
    assert build, r.stdout
    return build.group(1)


def test_a_second_jax_extraction_loads_its_compiled_programs_and_writes_the_same_cache(tmp_path):
    pytest.importorskip("jax")
    from catfeat.cache.store import open_cache

    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=0, size=(50, 40))  # one batch of 4
    cache_dir = tmp_path / "catfeat_cache"  # fresh: the first run compiles everything
    assert _jax_extract(data, tmp_path / "a", cache_dir) == "miss"
    folder = cache_dir / "jax"
    assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700 and any(folder.iterdir())
    assert _jax_extract(data, tmp_path / "b", cache_dir) == "hit"
    a, b = (open_cache(tmp_path / d / "gap_EfficientNetLite0.h5") for d in "ab")
    assert list(a.names()) == list(b.names()) and len(a.names()) == 4
    np.testing.assert_array_equal(a.features("train"), b.features("train"))
    when = ("created", "completed")
    assert {k: v for k, v in a.attrs.items() if k not in when} == {k: v for k, v in b.attrs.items() if k not in when}
    assert a.attrs["backend"] == "jax"


SCRIPT = """
import json, os, sys
import jax
from catfeat.models import compile_cache as cc
out = {}
for case in ("fresh", "group_writable", "jax_own_setting"):
    cc._state.update(done=False, folder=None)  # a new process, as far as the cache is concerned
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    os.environ["CATFEAT_CACHE_DIR"] = os.path.join(sys.argv[1], case)
    if case == "group_writable":  # JAX runs what it finds there: another user's writes would run as ours
        os.makedirs(os.path.join(sys.argv[1], case, "jax"))
        os.chmod(os.path.join(sys.argv[1], case, "jax"), 0o775)
    if case == "jax_own_setting":  # as JAX_COMPILATION_CACHE_DIR sets it
        jax.config.update("jax_compilation_cache_dir", os.path.join(sys.argv[1], "mine"))
    got = cc.enable_compile_cache()
    out[case] = [str(got) if got else None, jax.config.jax_compilation_cache_dir,
                 jax.config.jax_persistent_cache_min_compile_time_secs]
print(json.dumps(out))
"""


def test_the_verdict_says_lookups_and_hits_in_a_word_or_three():
    from catfeat.models import compile_cache as cc

    assert [cc.verdict(*c) for c in ((0, 0), (4, 4), (4, 0), (4, 1))] == ["", "hit", "miss", "1 of 4 hit"]


def test_the_compile_cache_folder_is_private_or_not_used(tmp_path):
    pytest.importorskip("jax")
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "jax"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    fresh = str(tmp_path / "fresh" / "jax")
    assert got["fresh"] == [fresh, fresh, 0.0] and os.stat(fresh).st_mode & 0o777 == 0o700
    assert got["group_writable"] == [None, None, 1.0]
    assert (f"not caching compiled models in {tmp_path / 'group_writable' / 'jax'}: other users may write to it"
            in r.stderr)
    mine = str(tmp_path / "mine")
    assert got["jax_own_setting"] == [mine, mine, 1.0]  # the user's own setting, untouched
