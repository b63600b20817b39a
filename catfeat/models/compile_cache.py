"""JAX's persistent compilation cache in catfeat's cache folder: a rerun loads what an earlier run compiled.

On JAX a backbone's build compiles dozens of small programs (its weight initializers) and then its
forward pass; on this project's CPU that is 10-40 s per backbone the first time and a few seconds
once cached. :func:`enable_compile_cache` points JAX at ``<catfeat cache folder>/jax`` (see
:func:`cache_root`) with no size or time threshold, so every program is kept. JAX keys each entry by
the program and the JAX/XLA version and device, so the folder is safe to share between runs,
projects and catfeat versions (an upgrade only misses). JAX executes what it finds there, so a
folder that another user owns or may write to is not used (a warning says so). Set
``JAX_COMPILATION_CACHE_DIR`` to use a folder of your own, ``JAX_ENABLE_COMPILATION_CACHE=false`` to
turn the cache off. TensorFlow and PyTorch have no such cache: nothing is done for them.

:class:`CacheCounter` counts JAX's cache lookups and hits while a block runs (for "compile cache:
hit" in the extraction summary); :func:`verdict` says counts summed over processes (the Ray engine's
model actors) in the same words.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

log = logging.getLogger("catfeat")

CACHE_ENV = "CATFEAT_CACHE_DIR"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"

_lock, _count_lock = threading.Lock(), threading.Lock()
_state: dict = {"done": False, "folder": None, "listening": False}
_counts = {"requests": 0, "hits": 0}


def cache_root() -> Path:
    """catfeat's cache folder: ``$CATFEAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/catfeat``, else ``~/.cache/catfeat``."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "catfeat"


def _private_folder(folder: Path) -> str | None:
    """Create ``folder`` (mode 0700); the reason it must not be used, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = folder.stat()
    except OSError as e:
        return f"cannot create it ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return "another user owns it"
    if st.st_mode & 0o022:
        return "other users may write to it (chmod go-w fixes that)"
    return None


def enable_compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in ``cache_root()/jax``, once per process.

    Returns the folder in use (a ``JAX_COMPILATION_CACHE_DIR`` already set is kept as it is), or None:
    another backend, the cache turned off, or an unusable folder (logged once). Call it before the
    first compilation worth keeping; programs compiled earlier are simply not cached.
    """
    import keras

    if keras.backend.backend() != "jax":
        return None
    with _lock:
        if _state["done"]:
            return _state["folder"]
        _state["done"] = True
        import jax

        _listen(jax)
        if not jax.config.jax_enable_compilation_cache:
            return None
        if jax.config.jax_compilation_cache_dir:  # the user's own choice (JAX_COMPILATION_CACHE_DIR)
            _state["folder"] = Path(jax.config.jax_compilation_cache_dir)
            return _state["folder"]
        folder = cache_root() / "jax"
        why = _private_folder(folder)
        if why is not None:
            log.warning("catfeat: not caching compiled models in %s: %s; set %s to a folder of your own",
                        folder, why, CACHE_ENV)
            return None
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every entry, however small
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # and however quick to compile
        _state["folder"] = folder
        return folder


def _listen(jax) -> None:
    def count(event: str, **_kw) -> None:
        key = {_REQUEST: "requests", _HIT: "hits"}.get(event)
        if key is not None:
            with _count_lock:
                _counts[key] += 1

    if not _state["listening"]:
        jax.monitoring.register_event_listener(count)
        _state["listening"] = True


class CacheCounter:
    """``with CacheCounter() as c: ...``: JAX's compile-cache lookups (``c.requests``) and hits
    (``c.hits``) in the block, from every thread; ``c.verdict()`` says it in a word or three."""

    def __enter__(self) -> "CacheCounter":
        self._start = dict(_counts)
        self.requests = self.hits = 0
        return self

    def __exit__(self, *exc) -> None:
        self.requests = _counts["requests"] - self._start["requests"]
        self.hits = _counts["hits"] - self._start["hits"]

    def verdict(self) -> str:
        """:func:`verdict` of this block's lookups and hits."""
        return verdict(self.requests, self.hits)


def verdict(requests: int, hits: int) -> str:
    """"hit" (every program loaded), "miss" (all compiled), "N of M hit", or "" (no lookup: the
    cache is off, or the backend has none), of ``requests`` lookups of which ``hits`` were found."""
    if not requests:
        return ""
    if hits == requests:
        return "hit"
    return "miss" if not hits else f"{hits} of {requests} hit"
