"""The Ray engine on a cluster of three nodes simulated in this machine (``ray.cluster_utils.Cluster``):
a worker node lost mid-run, the engine's own resubmission of lost images, and workers that never open
the data folder (the driver's node reads the files and ships their bytes).

The head node (where this process, the driver, runs) has no CPUs, as on a real cluster: every decode
and model runs on the two worker nodes, and only the read tasks (I/O, no CPU) run on the head. Skipped
when Ray is not installed or cannot start.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

from catfeat.cache.store import open_cache
from catfeat.extraction import ray_engine
from catfeat.extraction.run import run_extraction

from conftest import make_kaggle
from test_ray import MODEL, assert_same_cache

FAST = dict(weights=None, batch_size=2, progress=False)
SHARDS = 6
N_IMAGES = 34


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(folder, the local engine's cache of it): 34 tiny images (16 cats, 16 dogs, 2 test), a corrupt
    and an empty file among them; enough batches of 2 for a node to go with work still to do."""
    root = make_kaggle(tmp_path_factory.mktemp("nodes") / "data", n_per_class=16, n_test=2)
    (root / "train" / "cat.5.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "dog.9.jpg").write_bytes(b"")
    report = run_extraction(root, MODEL, tmp_path_factory.mktemp("local"), **FAST)
    return root, open_cache(next(iter(report.paths.values())))


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs) + two worker nodes of 2 CPUs, all on 127.0.0.1, no dashboard, no usage stats; its
    own Ray temp folder, so no other ray.init() on this machine finds it (and it finds no other)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="cf-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Ray swaps 127.0.0.1 for the machine's address unless told it is not a cluster (its switch for
        # laptops): the environment tells the nodes and their workers, the constant this process.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        c = None
        try:
            node = dict(node_ip_address="127.0.0.1", object_store_memory=100 << 20)
            c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **node))
            c.workers = [c.add_node(num_cpus=2, **node) for _ in range(2)]
            c.wait_for_nodes()
            ray.init(address=c.address, logging_level="WARNING")
        except Exception as e:
            if c is not None:
                c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"a Ray cluster cannot start here: {e.__class__.__name__}: {e}")
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def test_a_worker_node_lost_mid_run(cluster, photos, tmp_path, monkeypatch):
    """The first rows reach the driver, a worker node is removed (its actor, its tasks and the blocks in
    its object store are gone); the run still completes with the local engine's cache."""
    arrived = []
    add = ray_engine.PartSink.add

    def add_then_kill(sink, batch):
        if not arrived:
            cluster.remove_node(cluster.workers[0])
        arrived.append(len(batch["pos"]))
        add(sink, batch)

    monkeypatch.setattr(ray_engine.PartSink, "add", add_then_kill)
    data, local = photos
    report = run_extraction(data, MODEL, tmp_path / "out", engine="ray", engine_options={"shards": SHARDS}, **FAST)
    assert arrived[0] < N_IMAGES  # the node went with work still to do
    assert alive_nodes() == 2
    got = open_cache(next(iter(report.paths.values())))
    assert_same_cache(got, local)
    # every image once: no row lost, none written twice (an actor's batch redone by Ray arrives again)
    assert report.processed == N_IMAGES and len(report.skipped) == 2
    assert [s["path"] for s in got.skipped()] == ["train/cat.5.jpg", "train/dog.9.jpg"]
    assert not (tmp_path / "out" / ".parts").exists()


def test_lost_images_are_submitted_again(cluster, photos, tmp_path, monkeypatch):
    """When Ray gives up on lost work (its own retries spent), the engine submits the images of the
    unfinished shards again; finished rows are kept, none is written twice. Ray's giving up is
    simulated: the first rows to arrive are dropped with the error Ray raises for a dead node."""
    import ray

    calls = []
    add = ray_engine.PartSink.add

    def lose_first(sink, batch):
        calls.append(np.asarray(batch["pos"]).tolist())
        if len(calls) == 1:
            raise ray.exceptions.NodeDiedError("node 127.0.0.1 died (simulated)")
        add(sink, batch)

    monkeypatch.setattr(ray_engine.PartSink, "add", lose_first)
    data, local = photos
    messages = []
    report = run_extraction(data, MODEL, tmp_path / "out", engine="ray", log=messages.append,
                            engine_options={"shards": SHARDS, "reads": "workers"}, **FAST)
    assert_same_cache(open_cache(next(iter(report.paths.values()))), local)
    assert report.processed == N_IMAGES
    retry = [m for m in messages if "Ray lost work" in m]
    assert len(retry) == 1 and "NodeDiedError" in retry[0] and "(retry 1 of 2)" in retry[0], messages
    delivered = [p for batch in calls[1:] for p in batch]
    assert set(calls[0]) <= set(delivered)  # the dropped rows came back


def test_workers_read_by_url_from_the_object_store(cluster, photos, request, tmp_path, monkeypatch):
    """The photos in a real S3 store (SeaweedFS on 127.0.0.1), extracted from ``s3://bucket/set/``: the
    decode tasks on the worker nodes read them by URL (no folder anywhere) and the cache holds what
    the local engine made of the same files on disk."""
    try:
        store = request.getfixturevalue("seaweedfs")
    except pytest.FixtureLookupError:
        pytest.skip("needs the SeaweedFS fixture of tests/conftest.py (inputs by URL)")
    s3fs = pytest.importorskip("s3fs")
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)  # the driver's; the engine passes them on to the Ray workers
    s3fs.S3FileSystem.clear_instance_cache()
    data, local = photos
    fs = store.fs()
    if not fs.exists("catfeat-ray"):
        fs.mkdir("catfeat-ray")
    for path in sorted(data.rglob("*.jpg")):
        fs.pipe(f"catfeat-ray/set/{path.relative_to(data).as_posix()}", path.read_bytes())
    report = run_extraction("s3://catfeat-ray/set/", MODEL, tmp_path / "out", engine="ray",
                            engine_options={"shards": SHARDS}, **FAST)
    got = open_cache(next(iter(report.paths.values())))
    for split in ("train", "test"):
        assert list(got.names(split)) == list(local.names(split))
        np.testing.assert_allclose(got.features(split), local.features(split), rtol=1e-5, atol=1e-6)
    assert got.labels().tolist() == local.labels().tolist() and got.skipped() == local.skipped()
    assert report.processed == N_IMAGES


def test_only_lost_work_is_submitted_again():
    """A node, worker or object gone is retried; an error of the work itself (an exception in a task, a
    model actor that cannot be built) is not: running it again would fail the same way."""
    ray = pytest.importorskip("ray")
    x = ray.exceptions
    assert ray_engine.lost_work(ray, x.NodeDiedError("node died"))
    assert ray_engine.lost_work(ray, x.WorkerCrashedError())
    assert ray_engine.lost_work(ray, x.ActorDiedError())
    assert not ray_engine.lost_work(ray, x.RayTaskError("decode_batch", "Traceback ...", ValueError("bad")))
    assert ray_engine.lost_work(ray, x.RayTaskError("decode_batch", "Traceback ...", x.WorkerCrashedError()))
    assert not ray_engine.lost_work(ray, x.RaySystemError("?"))


def test_model_actors_leave_cpus_to_decode_after_a_node_is_lost():
    """CPU actors: one per node, one CPU each unless, the largest node lost and its actor restarted on
    the others, no CPU would be left to decode (the run would wait forever; it did in this module's
    cluster of two 2-CPU workers before)."""
    from types import SimpleNamespace

    def cluster_of(*cpus):
        return SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in cpus])

    assert ray_engine.model_actors(cluster_of(2), 0) == (1, 1.0)  # one node: as before
    assert ray_engine.model_actors(cluster_of(1), 0) == (1, 0.0)
    assert ray_engine.model_actors(cluster_of(0, 2, 2), 0) == (2, 0.5)  # 2 actors on 2 CPUs: 1 left
    assert ray_engine.model_actors(cluster_of(16, 16, 16), 0) == (3, 1.0)
    assert ray_engine.model_actors(cluster_of(2, 2), 0) == (2, 0.5)


def test_decode_tasks_never_open_the_path_when_the_driver_reads(photos, tmp_path):
    """``reads="driver"``: the decode stage gets bytes; the path it is given need not exist on its node."""
    data = photos[0]
    rows = {"pos": np.arange(3, dtype=np.int64),
            "path": np.array([os.fsencode(data / "train" / n) for n in ("cat.0.jpg", "cat.5.jpg", "dog.9.jpg")],
                             dtype=object)}
    read = ray_engine.read_batch(rows)
    assert list(read["read_error"]) == ["", "", ""] and len(read["data"][0]) > 100 and read["shipped"].all()
    elsewhere = dict(read, path=np.array([b"/nowhere/cat.0.jpg", b"/nowhere/cat.5.jpg", b"/nowhere/dog.9.jpg"],
                                         dtype=object))
    got = ray_engine.decode_batch(elsewhere, [32])
    here = ray_engine.decode_batch(rows, [32])
    assert got["ok"].tolist() == here["ok"].tolist() == [True, False, False]
    assert got["reason"].tolist() == here["reason"].tolist()
    assert got["reason"][2] == "empty file (0 bytes)"
    np.testing.assert_array_equal(got["img32"], here["img32"])
    other = ray_engine.read_batch({"pos": np.arange(2), "path": np.array([os.fsencode(tmp_path / "x.jpg"),
                                                                          b"s3://bucket/cat.0.jpg"], dtype=object)})
    assert other["read_error"][0].startswith("file not found")  # the local engine's words
    assert other["shipped"].tolist() == [True, False] and other["read_error"][1] == ""  # a URL: read by the task


def test_a_store_that_dies_stops_the_ray_run_with_one_error_and_the_rerun_completes(cluster, photos, tmp_path,
                                                                                    monkeypatch, capsys):
    """A SeaweedFS of its own, killed once listed: one error, no image recorded as skipped for it;
    restarted on the same data and ports, the same command gives the local engine's cache."""
    s3fs = pytest.importorskip("s3fs")
    from seaweedfs_server import run_seaweedfs, weed_binary

    from catfeat.cli.extract import main as extract

    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (catfeat[test])")
    data, local = photos
    server: list = []
    with run_seaweedfs(tmp_path / "store", server=server) as store:
        weed = server[0]
        for k, v in store.env().items():
            monkeypatch.setenv(k, v)  # the driver's; the engine passes them on to the Ray workers
        for k, v in (("CATFEAT_READ_TRIES", "2"), ("CATFEAT_READ_WAIT", "0.01"), ("CATFEAT_STORE_DOWN_AFTER", "3")):
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = store.fs()
        fs.mkdir("catfeat-down")
        for path in sorted(data.rglob("*.jpg")):
            fs.pipe(f"catfeat-down/set/{path.relative_to(data).as_posix()}", path.read_bytes())
        # the decode tasks read every image before the first model actor is built: the store dies once
        # listed, as the Ray job starts
        start = ray_engine.extract_with_ray

        def kill_then_start(*args, **kwargs):
            weed.kill()
            return start(*args, **kwargs)

        monkeypatch.setattr(ray_engine, "extract_with_ray", kill_then_start)
        out = tmp_path / "out"
        args = ["s3://catfeat-down/set/", "--models", MODEL, "--weights", "none", "--batch-size", "2", "--engine",
                "ray", "--shards", str(SHARDS), "--features", str(out), "--no-progress"]
        assert extract(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "stopped answering" in err[-1] and store.endpoint in err[-1] and "rerun the same command" in err[-1]
        monkeypatch.setattr(ray_engine, "extract_with_ray", start)
        weed.start()
        s3fs.S3FileSystem.clear_instance_cache()
        assert extract(args) == 0
        got = open_cache(out / f"gap_{local.attrs['backbone']}.h5")
        for split in ("train", "test"):
            assert list(got.names(split)) == list(local.names(split))
            np.testing.assert_allclose(got.features(split), local.features(split), rtol=1e-5, atol=0)
        assert got.labels().tolist() == local.labels().tolist() and got.skipped() == local.skipped()
    s3fs.S3FileSystem.clear_instance_cache()
