"""The Ray engine: same caches as the local engine, one part per shard, reruns skip finished shards.

Runs on a local Ray cluster of two CPUs started here; skipped when Ray is not installed or cannot start.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from catfeat.extraction.ray_engine import EngineUnavailableError
from catfeat.extraction.ray_engine import plan_shards
from catfeat.extraction.run import run_extraction
from catfeat.cache.store import KEY_FIELDS, open_cache

from conftest import REPO, make_kaggle, ray_parts_after_crash, save_image

# lite0 is the cheapest backbone to build; ResNet50 when catfeat.models.lite is not there
MODEL = "lite0" if importlib.util.find_spec("catfeat.models.lite") else "r50"
FAST = dict(weights=None, batch_size=4, progress=False)
SHARDS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images: 4 cats, 4 dogs, 2 test, plus a corrupt and an empty file among the training ones."""
    root = make_kaggle(tmp_path_factory.mktemp("ray") / "data", n_per_class=4, n_test=2)
    (root / "train" / "cat.4.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "dog.4.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def local(data, tmp_path_factory):
    report = run_extraction(data, MODEL, tmp_path_factory.mktemp("local"), **FAST)
    return open_cache(next(iter(report.paths.values())))


def read(path, ds):
    with h5py.File(path, "r") as f:
        return f[ds][()]


def assert_same_cache(got, want, rtol=1e-5, atol=1e-6):
    for split in ("train", "test"):
        assert list(got.names(split)) == list(want.names(split))
        np.testing.assert_allclose(got.features(split), want.features(split), rtol=rtol, atol=atol)
    assert got.labels().tolist() == want.labels().tolist()
    assert got.skipped() == want.skipped()
    np.testing.assert_array_equal(read(got.path, "skipped_index"), read(want.path, "skipped_index"))
    for k in (*KEY_FIELDS, "n_images", "rows_written", "skipped_count", "complete", "classes", "layout"):
        assert got.attrs[k] == want.attrs[k], k


def test_plan_shards_are_contiguous_and_balanced():
    shards = plan_shards(10, 3)
    assert [(s.start, s.end) for s in shards] == [(0, 3), (3, 6), (6, 10)]
    assert [s.index for s in shards] == [0, 1, 2]
    assert len(plan_shards(2, 5)) == 2  # never an empty shard
    assert [len(s) for s in plan_shards(2500)] == [833, 833, 834]  # default: about 1,000 images each
    with pytest.raises(ValueError, match="shards"):
        plan_shards(10, 0)


def test_the_actors_compile_cache_lookups_add_up_in_the_build_line(tmp_path):
    """Each actor reports its build's compile-cache lookups and hits with its first batch; the driver sums
    them into the report's verdict, printed with the build stage as the local engine prints it (no Ray)."""
    from catfeat.extraction.ray_engine import PartSink
    from catfeat.extraction.run import ExtractionReport
    from catfeat.extraction.stages import progress_bar
    from catfeat.images.listing import ImageSet
    from catfeat.models.registry import get_backbone

    spec = get_backbone("lite0")
    images = ImageSet(tmp_path, ["a.jpg", "b.jpg"], np.array([0, 1]), ["train", "train"], ["cat", "dog"], "flat")
    shard = plan_shards(2, 1)[0]
    report = ExtractionReport(paths={})
    sink = PartSink(images, [spec], [shard], {0: [spec]}, {(spec.name, 0): {"backbone": spec.name}},
                    {spec.name: tmp_path}, report, progress_bar(None, False, "x", "img"), 0.0)

    def batch(pos, build_s, requests, hits):  # one row, as a FeatureActor returns it
        one = lambda v, dtype=None: np.array([v], dtype)  # noqa: E731
        return {"pos": one(pos, np.int64), "ok": one(True), "reason": one("", object), "decode_s": one(0.1),
                "build_s": one(build_s), "ready_at": one(1.0), "compile_requests": one(requests, np.int64),
                "compile_hits": one(hits, np.int64), f"model_s_{spec.name}": one(0.2),
                f"feat_{spec.name}": np.ones((1, spec.feature_dim), np.float32)}

    try:
        sink.add(batch(0, 3.0, 5, 5))  # an actor that loaded every program
        assert report.compile_cache == "hit"
        sink.add(batch(1, 4.0, 5, 0))  # another that compiled them all
    finally:
        sink.close()
    assert report.compile_cache == "5 of 10 hit" and report.seconds["build"] == 4.0
    report.seconds["total"] = 5.0
    assert "build 4.0s (compile cache: 5 of 10 hit)" in report.summary()


def test_clear_error_without_ray(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if not installed
    with pytest.raises(EngineUnavailableError, match=r'pip install "catfeat\[ray\]"'):
        run_extraction(data, MODEL, tmp_path / "a", engine="ray", **FAST)
    from catfeat.cli.extract import main

    code = main([str(data), "--models", MODEL, "--weights", "none", "--out", str(tmp_path / "b"),
                 "--engine", "ray", "--no-progress"])
    assert code == 2
    assert 'pip install "catfeat[ray]"' in capsys.readouterr().err


def test_catfeat_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import catfeat, catfeat.cli.extract, catfeat.extraction.ray_engine\n"
            "print(catfeat.cli.extract.build_parser().parse_args(['d', '--engine', 'ray']).engine)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ray"


def test_ray_equals_local(ray_cluster, data, local, tmp_path):
    out = tmp_path / "ray"
    report = run_extraction(data, MODEL, out, engine="ray", engine_options={"shards": SHARDS}, **FAST)
    path = next(iter(report.paths.values()))
    got = open_cache(path)
    assert_same_cache(got, local)
    assert got.attrs["backend"] == local.attrs["backend"]
    assert {k for k in got.attrs if k not in ("created", "completed")} == \
        {k for k in local.attrs if k not in ("created", "completed")}
    assert [s["path"] for s in report.skipped] == ["train/cat.4.jpg", "train/dog.4.jpg"]
    assert report.skipped[1]["reason"] == "empty file (0 bytes)"
    assert report.processed == 12 and not report.resumed
    assert {"run", "merge", "build", "startup", f"model:{got.name}"} <= set(report.seconds)
    assert not (out / ".parts").exists() and not path.with_name(path.name + ".partial").exists()
    # a second run reuses the cache without touching Ray
    again = run_extraction(data, MODEL, out, engine="ray", engine_options={"shards": SHARDS}, **FAST)
    assert again.reused == [got.name] and again.processed == 0


def test_rerun_recomputes_only_missing_shards(ray_cluster, data, local, tmp_path, monkeypatch):
    out = tmp_path / "ray"
    parts = ray_parts_after_crash(monkeypatch, out, lambda: run_extraction(
        data, MODEL, out, engine="ray", engine_options={"shards": SHARDS}, **FAST))
    assert [p.name for p in parts] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert not list(out.glob("gap_*.h5"))
    first = open_cache(parts[0])
    assert first.attrs["shard_start"] == 0 and first.attrs["shard_end"] == 4
    assert [s["path"] for s in first.skipped()] == []
    # the corrupt and the empty file are positions 4 and 9 (cats then dogs, test last): shards 1 and 2
    assert [s["path"] for s in open_cache(parts[1]).skipped()] == ["train/cat.4.jpg"]
    parts[1].unlink()

    # the rerun goes through the CLI under JAX: Ray workers must follow the driver's Keras backend
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "jax"}
    r = subprocess.run([sys.executable, "-m", "catfeat.extract", str(data), "--models", MODEL, "--weights", "none",
                        "--out", str(out), "--batch-size", "4", "--no-progress", "--engine", "ray",
                        "--address", address, "--shards", str(SHARDS)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = next(line for line in r.stdout.splitlines() if line.startswith("catfeat.extract:"))
    assert summary.startswith("catfeat.extract: 4 images processed; 2 skipped")  # shard 1 only
    assert f"resumed: {local.name}@8" in summary
    # the JAX actors' builds go through the persistent compile cache and say so, as the local engine does
    assert re.search(r"build [\d.]+s \(compile cache: (hit|miss|\d+ of \d+ hit)\)", summary), summary
    got = open_cache(out / f"gap_{local.name}.h5")
    assert got.attrs["backend"] == "jax"
    assert_same_cache(got, local, rtol=1e-4, atol=1e-5)
    assert not (out / ".parts").exists()


def test_ray_grows_a_cache_as_the_local_engine_rebuilds_it(ray_cluster, data, local, tmp_path):
    """A changed image set: Ray computes only the new and changed images (its parts under OUT/.grow),
    the kept rows are copied bit for bit, and the result equals a fresh local extraction."""
    new = tmp_path / "data"
    shutil.copytree(data, new)  # copy2: same sizes and mtimes, so the same stamps
    out = tmp_path / "ray"
    out.mkdir()
    shutil.copy2(local.path, out / local.path.name)
    save_image(new / "train" / "dog.9.jpg", 9)
    save_image(new / "train" / "cat.1.jpg", 77)
    (new / "test" / "2.jpg").unlink()
    report = run_extraction(new, MODEL, out, engine="ray", engine_options={"shards": 2}, **FAST)
    assert report.processed == 4  # 2 photos and the 2 files the cache had skipped, tried again
    assert report.grown[local.name] == dict(kept=8, added=1, changed=1, removed=1, retried=2)
    assert not (out / ".grow").exists()
    grown = open_cache(out / local.path.name)
    rebuilt = open_cache(next(iter(run_extraction(new, MODEL, tmp_path / "rebuilt", **FAST).paths.values())))
    assert_same_cache(grown, rebuilt)
    for split in ("train", "test"):
        assert list(read(grown.path, f"{split}_stamps")) == list(read(rebuilt.path, f"{split}_stamps"))
        kept = {n: row for n, row in zip(local.names(split), local.features(split)) if n != "train/cat.1.jpg"}
        for n, row in zip(grown.names(split), grown.features(split)):
            if n in kept:
                assert kept[n].tobytes() == row.tobytes(), n
