"""The reader on worker processes: decode into shared memory, free of the driver's GIL.

With threads, every image's Python work (opening the file, reading its header, stacking the
batch) and the HDF5 writer share one interpreter lock; on a GPU host with many cores that lock,
not the decoder, caps the feed (measured on an H100 host: README, the GPU section;
``benchmarks/gpu_ladder.py`` measures it). Here each worker process decodes a run of a batch's
images straight into that batch's slot of shared memory, and the driver only copies finished rows
out, or, when the model runs on a GPU, lends the slot itself until the batch is on the device. Same decoders, same skip reasons as
the thread reader (both call :func:`catfeat.images.unit.decode_timed`), same byte budget, shared
between the processes.

A worker that dies (a decoder crashing on a hostile file, the OOM killer, ``kill -9``) costs at
most the file it was decoding: the pool is started again, that file is skipped with the reason
(:func:`crash_reason`), the other files in flight are decoded again, and reading goes on. Each
pool has its own byte budget, so what a dead worker held is never lost.

Nothing outlives the driver: the slots are ``multiprocessing`` heap memory, whose file is unlinked
as soon as it is created and handed to the workers as a file descriptor (no name in /dev/shm to
leak, the memory is freed when the last process mapping it exits), and the workers die with the
driver (Linux ``PR_SET_PDEATHSIG``, plus a thread watching the parent pid everywhere).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Sequence

import numpy as np

from catfeat.images.listing import DECODE_BYTES, Batch, ByteBudget
from catfeat.images.unit import decode_timed

CRASH_REASON = "the decoder process died"  # every reason of :func:`crash_reason` starts so
# Test hook: a worker about to decode a file named hang* writes its pid to $CATFEAT_TEST_HANG_DIR/<pid>
# and sleeps until it is killed (tests kill it there, mid-decode, holding its share of the budget).
HANG_ENV = "CATFEAT_TEST_HANG_DIR"
# A file in flight on a worker that was not the one that died is decoded again; after this many
# deaths of its worker with no other culprit it is skipped all the same.
SUSPECT_DEATHS = 3
# Pool deaths with no file to blame (every worker was killed from outside) before reading gives up.
BLIND_DEATHS = 5

# worker side: set by _init in each process
_SLOTS: list[dict[int, np.ndarray]] = []
_SETUP: dict = {}


def crash_reason(exitcode: int | None) -> str:
    """The skip reason of a file whose decoder process died: ``exitcode`` as ``Process.exitcode``."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by signal {-exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    elif exitcode:
        how = f"exit code {exitcode}"
    else:
        how = "cause unknown"
    return f"{CRASH_REASON} ({how}) while reading this file"


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


# Slots added when batches are lent (see iter_batches_processes): those waiting in the consumer's
# queue (catfeat.extraction.stages.InBackground holds 2) and the one being copied to the device.
LENT_SLOTS = 3


def _slot_count(prefetch: int, lend: bool = False) -> int:
    # the depth + 1 batches in flight, and one to spare
    return _depth(prefetch) + 2 + (LENT_SLOTS if lend else 0)


def shared_memory_needed(sizes: Sequence[int], batch_size: int, prefetch: int, lend: bool = False) -> int:
    """Bytes of shared memory :func:`iter_batches_processes` takes for these batches."""
    return _slot_count(prefetch, lend) * slot_bytes(sizes, batch_size)


def shared_memory_free() -> int | None:
    """Free bytes where shared memory lives (None where that is not a folder to ask)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _slot_shapes(sizes: Sequence[int], batch_size: int) -> dict[int, tuple]:
    return {s: (batch_size, s, s, 3) for s in sizes}


def _die_with(parent: int) -> None:
    """End this worker when the driver ``parent`` ends, however it ends (kill -9, OOM killer): a
    worker left behind would keep its share of the shared memory mapped, and decode for nobody."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watcher below still ends it
    if os.getppid() != parent:  # the driver died before the signal was armed
        os._exit(1)

    def watch() -> None:  # the portable way; also covers a decoder that ignores the signal's thread
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="catfeat-parent-watch", daemon=True).start()


class _HangHook:
    """``decode`` that hangs on files named ``hang*`` (see ``HANG_ENV``); test use only."""

    def __init__(self, decode: Callable, folder: str):
        self.decode, self.folder = decode, folder

    def __call__(self, path, sizes):
        if os.path.basename(os.fsdecode(path)).startswith("hang"):
            note = os.path.join(self.folder, str(os.getpid()))
            with open(note + ".tmp", "w") as f:
                f.write(os.fsdecode(path))
            os.replace(note + ".tmp", note)
            while True:
                time.sleep(1)
        return self.decode(path, sizes)


def _init(buffers, sizes, batch_size, decode, budget, barrier, owner, parent) -> None:
    global _SLOTS
    _die_with(parent)
    # Ctrl-C reaches the whole process group: the driver stops the workers, each would otherwise
    # print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _SLOTS = _views(buffers, sizes, batch_size)
    if os.environ.get(HANG_ENV):
        decode = _HangHook(decode, os.environ[HANG_ENV])
    _SETUP.update(sizes=list(sizes), decode=decode, budget=budget, barrier=barrier, owner=owner,
                  batch_size=batch_size)


def _views(buffers, sizes, batch_size) -> list[dict[int, np.ndarray]]:
    shapes = _slot_shapes(sizes, batch_size)
    return [{s: np.frombuffer(slot[s], np.uint8).reshape(shapes[s]) for s in shapes} for slot in buffers]


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


_SPAWNER: list[ThreadPoolExecutor] = []


def _spawner() -> ThreadPoolExecutor:
    """The one long-lived thread that starts every worker. Linux sends the parent-death signal
    when the *thread* that started a process ends, so workers started by a reader thread that ends
    before the pool does would be killed in use."""
    if not _SPAWNER:
        _SPAWNER.append(ThreadPoolExecutor(1, thread_name_prefix="catfeat-spawner"))
    return _SPAWNER[0]


def _start(pool: ProcessPoolExecutor, workers: int) -> set[int]:
    with _main_hidden():
        return {f.result() for f in [pool.submit(_ready) for _ in range(workers)]}


def _decode_into(slot: int, row: int, paths: Sequence) -> list[tuple[bool, str | None, float]]:
    """Worker task: decode ``paths`` into rows ``row..`` of ``slot``; ``[(ok, reason, seconds)]`` (a reason
    beside ``ok``: the corrupt data the image was decoded with).
    The row being decoded is marked with this worker's pid, so that the driver knows whose file it
    was if this process dies."""
    sizes, decode, budget, owner = _SETUP["sizes"], _SETUP["decode"], _SETUP["budget"], _SETUP["owner"]
    mark, pid = slot * _SETUP["batch_size"] + row, os.getpid()
    out = []
    for i, path in enumerate(paths):
        owner[mark + i] = pid
        arrays, reason, seconds, _ = decode_timed(path, sizes, budget, decode)
        if arrays is not None:
            for s in sizes:
                _SLOTS[slot][s][row + i] = arrays[s]
        owner[mark + i] = 0
        out.append((arrays is not None, reason, seconds))
    return out


class ProcessReader:
    """Worker processes and the shared-memory slots they decode into; a context manager.

    :meth:`submit` hands a batch to the workers, :meth:`collect` returns its rows; a pool that
    broke (a worker died) is replaced there, see the module's docstring.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, workers: int, slots: int, decode: Callable,
                 budget: int = DECODE_BYTES):
        self.sizes, self.batch_size, self.workers = list(sizes), int(batch_size), int(workers)
        # spawn, not fork: the driver may hold JAX/TF threads and a GPU context a fork would copy.
        self._ctx = mp.get_context("spawn")
        self._decode, self._limit = decode, int(budget)
        self.budget = SharedByteBudget(self._limit, self._ctx)  # replaced with each pool
        self.pool: ProcessPoolExecutor | None = None
        self.generation = 0  # of the pool; futures remember theirs
        self._procs: dict = {}  # pid -> Process of the current pool
        self._in_slot: dict[int, list] = {}  # slot -> the paths last submitted into it
        self._dead: dict = {}  # path -> reason: files whose worker died decoding them
        self._suspect: collections.Counter = collections.Counter()
        self._blind = 0
        need, free = slots * slot_bytes(sizes, batch_size), shared_memory_free()
        if free is not None and need > free:
            raise ReaderStartError(f"the reader processes need {need / 2**20:,.0f} MiB of shared memory, "
                                   f"{free / 2**20:,.0f} MiB free in /dev/shm; read with threads "
                                   "(reader='threads', --reader threads) or a smaller --batch-size")
        shapes = _slot_shapes(self.sizes, self.batch_size)
        try:
            self._buffers = [{s: self._ctx.RawArray(ctypes.c_uint8, int(np.prod(shape))) for s, shape in shapes.items()}
                             for _ in range(slots)]
            self._owner = self._ctx.RawArray(ctypes.c_int64, slots * self.batch_size)
        except (OSError, MemoryError) as e:
            raise ReaderStartError(f"the reader processes could not get {need / 2**20:,.0f} MiB of shared memory "
                                   f"({e}); read with threads (reader='threads', --reader threads) or a smaller "
                                   "--batch-size") from None
        self.slots = _views(self._buffers, self.sizes, self.batch_size)
        try:
            self.pool = self._new_pool(self.workers)
        except BaseException:
            self.close()
            raise

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        """A pool with all ``workers`` processes started and ready (or :class:`ReaderStartError`),
        with a byte budget of its own: the workers of a broken pool are all dead, and so is
        whatever they held."""
        peak = self.budget.peak
        self.budget = SharedByteBudget(self._limit, self._ctx)
        self.budget.peak = peak
        barrier = self._ctx.Barrier(workers)
        pool = ProcessPoolExecutor(workers, mp_context=self._ctx, initializer=_init,
                                   initargs=(self._buffers, self.sizes, self.batch_size, self._decode, self.budget,
                                             barrier, self._owner, os.getpid()))
        try:
            pids = _spawner().submit(_start, pool, workers).result()
        except Exception as e:
            pool.shutdown(wait=True, cancel_futures=True)
            raise ReaderStartError(f"the image reader's worker processes could not start ({e.__class__.__name__}: "
                                   f"{e}); read with threads instead (reader='threads', --reader threads)") from e
        if len(pids) != workers:  # cannot happen with the barrier; a pool spawning later would re-run __main__
            pool.shutdown(wait=True, cancel_futures=True)
            raise ReaderStartError(f"started {len(pids)} of {workers} reader processes")
        self._procs = dict(getattr(pool, "_processes", None) or {})
        return pool

    def submit(self, slot: int, paths: Sequence) -> tuple:
        """Tasks decoding ``paths`` into ``slot``, in runs spread over the workers."""
        self._in_slot[slot] = list(paths)
        step = max(1, min(16, -(-len(paths) // self.workers)))
        return self._submit(slot, [(row, min(step, len(paths) - row)) for row in range(0, len(paths), step)])

    def _submit(self, slot: int, runs: list[tuple[int, int]]) -> tuple:
        paths = self._in_slot[slot]
        while True:
            generation = self.generation
            try:
                return generation, [(self.pool.submit(_decode_into, slot, row, paths[row:row + n]), row, n)
                                    for row, n in runs]
            except BrokenProcessPool:  # a worker died since the last batch
                self._replace_pool(generation)

    def collect(self, slot: int, paths: Sequence, submitted: tuple) -> list[tuple[bool, str | None, float]]:
        """The rows of a :meth:`submit`: ``[(ok, reason, seconds)]``. Rows lost with a dead worker
        are decoded again one file per task, except the file it died on (see the module's docstring)."""
        generation, tasks = submitted
        out: list = [None] * len(paths)
        while tasks:
            lost = []
            for future, row, n in tasks:
                try:
                    out[row:row + n] = future.result()
                except (BrokenProcessPool, CancelledError):
                    lost.extend(range(row, row + n))
            if not lost:
                break
            self._replace_pool(generation)
            again = []
            for i in lost:
                reason = self._dead.get(paths[i])
                if reason is None:
                    again.append((i, 1))
                else:
                    out[i] = (False, reason, 0.0)
            crashed = [p for p, r in zip(paths, out) if r is not None and r[1] and self._dead.get(p) == r[1]]
            if len(crashed) > 1 and len(crashed) * 2 > len(paths):
                # not one hostile file: the workers themselves cannot run (e.g. shared memory ran out)
                raise ReaderStartError(f"reader processes died on {len(crashed)} of {len(paths)} files "
                                       f"(e.g. {os.fsdecode(crashed[0])}); read with threads instead "
                                       "(reader='threads', --reader threads)")
            generation, tasks = self._submit(slot, again)
        return out

    def _replace_pool(self, generation: int) -> None:
        """Start a new pool in place of the broken pool ``generation`` (once: later callers holding
        futures of that pool find it replaced), and blame the files its dead workers were decoding."""
        if generation != self.generation:
            return
        procs = self._procs
        self.pool.shutdown(wait=True, cancel_futures=True)  # the broken pool has stopped every worker
        culprits, bystanders = [], []
        for i, pid in enumerate(self._owner):
            if not pid:
                continue
            self._owner[i] = 0
            slot, row = divmod(i, self.batch_size)
            paths = self._in_slot.get(slot, [])
            if row >= len(paths):
                continue
            code = procs[pid].exitcode if pid in procs else None
            # the pool ends its other workers with SIGTERM when one dies: those were bystanders
            (bystanders if code in (None, -signal.SIGTERM) else culprits).append((paths[row], code))
        for path, code in culprits:
            self._dead[path] = crash_reason(code)
        if not culprits:
            self._blind += not bystanders
            for path, code in bystanders:
                self._suspect[path] += 1
                if self._suspect[path] >= SUSPECT_DEATHS:
                    self._dead[path] = crash_reason(code)
        if self._blind > BLIND_DEATHS:
            raise ReaderStartError(f"the reader processes were killed {self._blind} times while decoding nothing; "
                                   "read with threads instead (reader='threads', --reader threads)")
        self.generation += 1
        self.pool = self._new_pool(self.workers)

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        # the heap memory goes back when the last view of it goes
        self.slots, self._buffers = [], []

    def __enter__(self) -> "ProcessReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lent:
    """A batch's ``release``: puts its slot back among the free ones, once, from any thread."""

    def __init__(self, free: "queue.Queue[int]", slot: int):
        self._free, self._slot, self._lock = free, slot, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            slot, self._slot = self._slot, None
        if slot is not None:
            self._free.put(slot)


def iter_batches_processes(paths: Sequence, sizes: Sequence[int], batch_size: int, start: int = 0,
                           workers: int | None = None, prefetch: int = 2, decode: Callable | None = None,
                           budget: int = DECODE_BYTES, lend: bool = False) -> Iterator[Batch]:
    """Like :func:`catfeat.images.reader.iter_batches`, on ``workers`` processes (default: every core; never
    more than there are images to read).

    ``lend``: a batch whose every image decoded is handed over as views of its shared-memory slot,
    with ``Batch.release`` to call once its pixels are no longer needed (copied to the device); the
    slot is decoded into again only after that. Without it (and for a batch with skipped images)
    the rows are copied out and the slot is reused at once."""
    from catfeat.images.decoders import get_decoder

    sizes = sorted(set(int(s) for s in sizes))
    if start >= len(paths):
        return
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths) - start))
    decode = decode or get_decoder("auto").decode
    todo = deque((b, min(b + batch_size, len(paths))) for b in range(start, len(paths), batch_size))
    depth = _depth(prefetch)
    with ProcessReader(sizes, batch_size, workers, _slot_count(prefetch, lend), decode, budget) as reader:
        free: queue.Queue[int] = queue.Queue()  # slots no batch is decoded into or lent out of
        for slot in range(len(reader.slots)):
            free.put(slot)
        pending: deque = deque()

        def submit_next(wait: bool) -> bool:
            try:
                slot = free.get(block=wait)  # a lent slot comes back when its batch is released
            except queue.Empty:
                return False
            b0, b1 = todo.popleft()
            pending.append((b0, slot, paths[b0:b1], reader.submit(slot, paths[b0:b1])))
            return True

        while todo and len(pending) <= depth:
            submit_next(True)
        while pending:
            b0, slot, batch_paths, futures = pending.popleft()
            results = reader.collect(slot, batch_paths, futures)
            if len(results) != len(batch_paths):  # cannot happen unless a task lost rows
                raise RuntimeError(f"reader returned {len(results)} rows for {len(batch_paths)} images")
            ok = np.array([r[0] for r in results], dtype=bool)
            errors = {b0 + i: r[1] for i, r in enumerate(results) if not r[0]}
            damaged = {b0 + i: r[1] for i, r in enumerate(results) if r[0] and r[1]}
            n = len(batch_paths)
            release = None
            if lend and ok.all():
                images = {s: reader.slots[slot][s][:n] for s in sizes}
                release = _Lent(free, slot)
            else:  # copied out, so the slot is free for the next batch while this one is on the device
                images = {s: (reader.slots[slot][s][:n].copy() if ok.all() else reader.slots[slot][s][:n][ok])
                          for s in sizes}
                free.put(slot)
            while todo and len(pending) <= depth and submit_next(False):
                pass
            yield Batch(b0, images, ok, errors, sum(r[2] for r in results), 0.0, damaged, release)
            while todo and len(pending) <= depth:
                submit_next(True)
