"""The reader on worker processes: decode into shared memory, free of the driver's GIL.

With threads, every image's Python work (opening the file, reading its header, stacking the
batch) and the HDF5 writer share one interpreter lock; on a GPU host with many cores that lock,
not the decoder, caps the feed (measured on an H100 host: see ``benchmarks/gpu_check.py``).
Here each worker process decodes a run of a batch's images straight into that batch's slot of
shared memory, and the driver only copies finished rows out. Same decoders, same skip reasons as
the thread reader (both call :func:`catfeat.extraction.stages.decode_timed`), same byte budget, shared
between the processes.

A worker that dies (a decoder crashing on a hostile file) costs nothing but that file: the
batch is decoded again one file per task, the file that kills its worker is skipped with a
reason, and reading goes on.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Callable, Iterator, Sequence

import numpy as np

from catfeat.images.listing import DECODE_BYTES, Batch, ByteBudget
from catfeat.extraction.stages import decode_timed

CRASH_REASON = "the decoder crashed on this file (its worker process died); the file was skipped"

# worker side: set by _init in each process
_SLOTS: list[dict[int, np.ndarray]] = []
_SHM: list[shared_memory.SharedMemory] = []
_SETUP: dict = {}


class SharedByteBudget(ByteBudget):
    """:class:`ByteBudget` over processes: the count lives in shared memory under one lock."""

    def __init__(self, limit: int = DECODE_BYTES, context=None):
        ctx = context or mp.get_context()
        self._used, self._peak = ctx.RawValue("q", 0), ctx.RawValue("q", 0)
        super().__init__(limit)
        self._cond = ctx.Condition()

    @property
    def used(self) -> int:
        return self._used.value

    @used.setter
    def used(self, n: int) -> None:
        self._used.value = n

    @property
    def peak(self) -> int:
        return self._peak.value

    @peak.setter
    def peak(self, n: int) -> None:
        self._peak.value = n


def slot_bytes(sizes: Sequence[int], batch_size: int) -> int:
    """Bytes of one batch's shared-memory slot (uint8 pixels at every size)."""
    return sum(int(np.prod(shape)) for shape in _slot_shapes(sizes, batch_size).values())


def _depth(prefetch: int) -> int:
    """Batches decoding ahead: one more than the thread reader's ``prefetch`` (workers start slower)."""
    return prefetch + 1


def _slot_count(prefetch: int) -> int:
    # the depth + 1 batches in flight, and one to spare
    return _depth(prefetch) + 2


def shared_memory_needed(sizes: Sequence[int], batch_size: int, prefetch: int) -> int:
    """Bytes of shared memory :func:`iter_batches_processes` takes for these batches."""
    return _slot_count(prefetch) * slot_bytes(sizes, batch_size)


def shared_memory_free() -> int | None:
    """Free bytes where shared memory lives (None where that is not a folder to ask)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _slot_shapes(sizes: Sequence[int], batch_size: int) -> dict[int, tuple]:
    return {s: (batch_size, s, s, 3) for s in sizes}


def _open_shared(name: str) -> shared_memory.SharedMemory:
    """Attach to the driver's segment without registering it for clean-up: the driver owns it
    (Python < 3.13 has no ``track=False``)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:  # workers share the driver's tracker: not registering is the only clean way
        from multiprocessing import resource_tracker

        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def _attach(names: list[dict[int, str]], sizes, batch_size) -> tuple[list, list]:
    shms, slots = [], []
    for slot in names:
        arrays = {}
        for s, shape in _slot_shapes(sizes, batch_size).items():
            shm = _open_shared(slot[s])
            shms.append(shm)
            arrays[s] = np.ndarray(shape, np.uint8, buffer=shm.buf)
        slots.append(arrays)
    return shms, slots


def _init(names, sizes, batch_size, decode, budget, barrier) -> None:
    global _SLOTS, _SHM
    # Ctrl-C reaches the whole process group: the driver stops the workers, each would otherwise
    # print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _SHM, _SLOTS = _attach(names, sizes, batch_size)
    _SETUP.update(sizes=list(sizes), decode=decode, budget=budget, barrier=barrier)


def _ready() -> int:
    """Start-up task: returns once every worker of the pool runs (so all were started at once)."""
    _SETUP["barrier"].wait(timeout=120)
    return os.getpid()


class ReaderStartError(RuntimeError):
    """The worker processes could not start."""


@contextlib.contextmanager
def _main_hidden():
    """Start workers without re-running the caller's script: a spawned worker otherwise executes
    the ``__main__`` file again, which in a script without an ``if __name__ == "__main__":`` guard
    would start a second extraction. Only catfeat's own functions are sent to workers."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(getattr(main, "__spec__", None), "name", None):
        yield  # a module run with -m is imported by name, which is safe
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _decode_into(slot: int, row: int, paths: Sequence) -> list[tuple[bool, str | None, float]]:
    """Worker task: decode ``paths`` into rows ``row..`` of ``slot``; ``[(ok, reason, seconds)]``."""
    sizes, decode, budget = _SETUP["sizes"], _SETUP["decode"], _SETUP["budget"]
    out = []
    for i, path in enumerate(paths):
        arrays, reason, seconds, _ = decode_timed(path, sizes, budget, decode)
        if arrays is not None:
            for s in sizes:
                _SLOTS[slot][s][row + i] = arrays[s]
        out.append((arrays is not None, reason, seconds))
    return out


class ProcessReader:
    """Worker processes and the shared-memory slots they decode into; a context manager."""

    def __init__(self, sizes: Sequence[int], batch_size: int, workers: int, slots: int, decode: Callable,
                 budget: int = DECODE_BYTES):
        self.sizes, self.batch_size, self.workers = list(sizes), int(batch_size), int(workers)
        # spawn, not fork: the driver may hold JAX/TF threads and a GPU context a fork would copy.
        self._ctx = mp.get_context("spawn")
        self._decode = decode
        self.budget = SharedByteBudget(budget, self._ctx)
        self._shm: list[shared_memory.SharedMemory] = []
        self.slots: list[dict[int, np.ndarray]] = []
        need, free = slots * slot_bytes(sizes, batch_size), shared_memory_free()
        if free is not None and need > free:
            raise ReaderStartError(f"the reader processes need {need / 2**20:,.0f} MiB of shared memory, "
                                   f"{free / 2**20:,.0f} MiB free in /dev/shm; read with threads "
                                   "(reader='threads', --reader threads) or a smaller --batch-size")
        names = []
        try:
            for _ in range(slots):
                arrays, slot_names = {}, {}
                for s, shape in _slot_shapes(self.sizes, self.batch_size).items():
                    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)))
                    self._shm.append(shm)
                    slot_names[s] = shm.name
                    arrays[s] = np.ndarray(shape, np.uint8, buffer=shm.buf)
                self.slots.append(arrays)
                names.append(slot_names)
            self._names = names
            self.pool = self._new_pool(self.workers)
        except BaseException:
            self.close()  # the segments are unlinked whatever failed
            raise

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        """A pool with all ``workers`` processes started and ready (or :class:`ReaderStartError`)."""
        barrier = self._ctx.Barrier(workers)
        pool = ProcessPoolExecutor(workers, mp_context=self._ctx, initializer=_init,
                                   initargs=(self._names, self.sizes, self.batch_size, self._decode, self.budget,
                                             barrier))
        try:
            with _main_hidden():
                pids = {f.result() for f in [pool.submit(_ready) for _ in range(workers)]}
        except Exception as e:
            pool.shutdown(wait=True, cancel_futures=True)
            raise ReaderStartError(f"the image reader's worker processes could not start ({e.__class__.__name__}: "
                                   f"{e}); read with threads instead (reader='threads', --reader threads)") from e
        if len(pids) != workers:  # cannot happen with the barrier; a pool spawning later would re-run __main__
            pool.shutdown(wait=True, cancel_futures=True)
            raise ReaderStartError(f"started {len(pids)} of {workers} reader processes")
        return pool

    def submit(self, slot: int, paths: Sequence) -> tuple:
        """Futures decoding ``paths`` into ``slot``, in runs spread over the workers."""
        step = max(1, min(16, -(-len(paths) // self.workers)))
        return self.pool, [self.pool.submit(_decode_into, slot, row, paths[row:row + step])
                           for row in range(0, len(paths), step)]

    def collect(self, slot: int, paths: Sequence, submitted: tuple) -> list[tuple[bool, str | None, float]]:
        """The rows of a :meth:`submit`; where a worker died, see the module's docstring."""
        pool, futures = submitted
        try:
            return [r for f in futures for r in f.result()]
        except (BrokenProcessPool, CancelledError):
            pass
        if pool is self.pool:  # this batch broke the pool: find the file, keep the others
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = self._new_pool(self.workers)
            return self._isolate(slot, paths)
        return self.collect(slot, paths, self.submit(slot, paths))  # an earlier batch broke it

    def _isolate(self, slot: int, paths: Sequence) -> list[tuple[bool, str | None, float]]:
        out: list = [None] * len(paths)
        with self._new_pool(self.workers) as pool:
            futures = [pool.submit(_decode_into, slot, i, [p]) for i, p in enumerate(paths)]
            for i, f in enumerate(futures):
                try:
                    out[i] = f.result()[0]
                except (BrokenProcessPool, CancelledError):
                    pass
        for i, row in enumerate(out):
            if row is None:  # in flight when a worker died: alone in a process of its own
                with self._new_pool(1) as pool:
                    try:
                        out[i] = pool.submit(_decode_into, slot, i, [paths[i]]).result()[0]
                    except BrokenProcessPool:
                        out[i] = (False, CRASH_REASON, 0.0)
        crashed = [paths[i] for i, r in enumerate(out) if r[1] == CRASH_REASON]
        if len(crashed) > 1 and len(crashed) * 2 > len(paths):
            # not one hostile file: the workers themselves cannot run (e.g. shared memory ran out)
            raise ReaderStartError(f"reader processes died on {len(crashed)} of {len(paths)} files "
                                   f"(e.g. {os.fsdecode(crashed[0])}); read with threads instead "
                                   "(reader='threads', --reader threads)")
        return out

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for shm in self._shm:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self._shm = []

    def __enter__(self) -> "ProcessReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_batches_processes(paths: Sequence, sizes: Sequence[int], batch_size: int, start: int = 0,
                           workers: int | None = None, prefetch: int = 2, decode: Callable | None = None,
                           budget: int = DECODE_BYTES) -> Iterator[Batch]:
    """Like :func:`catfeat.images.reader.iter_batches`, on ``workers`` processes (default: every core)."""
    from catfeat.images.decoders import get_decoder

    sizes = sorted(set(int(s) for s in sizes))
    workers = workers or os.cpu_count() or 1
    decode = decode or get_decoder("auto").decode
    queue = deque((b, min(b + batch_size, len(paths))) for b in range(start, len(paths), batch_size))
    depth = _depth(prefetch)
    with ProcessReader(sizes, batch_size, workers, _slot_count(prefetch), decode, budget) as reader:
        free = deque(range(len(reader.slots)))
        pending: deque = deque()

        def submit_next() -> None:
            b0, b1 = queue.popleft()
            slot = free.popleft()
            pending.append((b0, slot, paths[b0:b1], reader.submit(slot, paths[b0:b1])))

        while queue and len(pending) <= depth:
            submit_next()
        while pending:
            b0, slot, batch_paths, futures = pending.popleft()
            results = reader.collect(slot, batch_paths, futures)
            if len(results) != len(batch_paths):  # cannot happen unless a task lost rows
                raise RuntimeError(f"reader returned {len(results)} rows for {len(batch_paths)} images")
            ok = np.array([r[0] for r in results], dtype=bool)
            errors = {b0 + i: r[1] for i, r in enumerate(results) if not r[0]}
            n = len(batch_paths)
            # copied out, so the slot is free for the next batch while this one is on the device
            images = {s: (reader.slots[slot][s][:n].copy() if ok.all() else reader.slots[slot][s][:n][ok])
                      for s in sizes}
            free.append(slot)
            if queue:
                submit_next()
            yield Batch(b0, images, ok, errors, sum(r[2] for r in results), 0.0)
