"""A GCS-compatible server for tests: ``gcp-storage-emulator`` (pure Python, the GCS JSON API; in
catfeat[test]) on 127.0.0.1, a free port, objects in memory; stopped (process group killed) on exit.
Clients reach it by ``STORAGE_EMULATOR_HOST``, without credentials, as they reach any GCS emulator."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

from servers import free_ports, serving


def emulator_installed() -> bool:
    """Whether the emulator's package is installed."""
    return importlib.util.find_spec("gcp_storage_emulator") is not None


class GCSStore:
    """A running GCS emulator: its ``endpoint``."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def env(self) -> dict:
        """The environment a client needs to reach this store (the standard emulator variable)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def fs(self):
        """A gcsfs client of this store, not shared with (nor taken from) fsspec's instance cache: gcsfs's
        core class, as catfeat uses with an emulator (see catfeat.images.sources.filesystem)."""
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(endpoint_url=self.endpoint, token="anon", project="catfeat-test",
                             skip_instance_cache=True)


def _answers(store: GCSStore) -> bool:
    with urllib.request.urlopen(f"{store.endpoint}/storage/v1/b", timeout=2) as r:
        return r.status == 200


@contextlib.contextmanager
def run_gcs_emulator(folder: Path, timeout: float = 30) -> Iterator[GCSStore]:
    """Start the emulator (its log in ``folder``), wait until it answers, yield its :class:`GCSStore`;
    :class:`TimeoutError` with the end of its log if it does not come up within ``timeout`` seconds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}",
           "--in-memory"]
    store = GCSStore(f"http://127.0.0.1:{port}")
    with serving(cmd, folder / "emulator.log", lambda: _answers(store), timeout, "the GCS emulator"):
        yield store
