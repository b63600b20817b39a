"""Servers the tests start for themselves (SeaweedFS, the GCS emulator): free ports on 127.0.0.1, the
server in its own process group with its log in a file, stopped (group killed) on exit."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen, so all differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the server's process, before it starts (Linux): killed when the test process dies, however
    it dies (a timeout's SIGTERM or SIGKILL skips the clean-up below)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def serving(cmd: Sequence[str], log: Path, ready: Callable[[], bool], timeout: float,
            name: str) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (output to ``log``) until the block ends; ``ready()`` is asked until it says yes
    (an exception counts as no); :class:`TimeoutError` with the end of the log if that takes more
    than ``timeout`` seconds or the server exits. The process group is killed at the end (SIGKILL:
    a test server holds nothing to keep)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    tail = Path(log).read_bytes()[-3000:].decode(errors="replace")
                    raise TimeoutError(f"{name} did not become ready (exit code {proc.poll()}); its log ends:\n{tail}")
                try:
                    if ready():
                        break
                except Exception:
                    pass
                time.sleep(0.2)
            yield proc
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
