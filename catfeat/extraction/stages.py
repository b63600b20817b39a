"""Extraction as three stages shared by every engine: reader -> model runner -> writer.

* reader: :func:`catfeat.images.unit.decode_timed` turns each file into uint8 arrays at every input
  size under a byte budget (one decode per file; a bad file becomes a reason, never an exception).
  The local engine runs it on threads or processes (:func:`catfeat.images.reader.iter_batches`),
  the Ray engine in Ray Data tasks, predict one image after another.
* runner: :class:`ModelRunner` moves each batch to the device once per input size and dispatches
  every backbone on it without waiting for results.
* writer: :class:`WriterThread` reads each batch's features back and appends them to the HDF5
  caches, in batch order, on its own thread (the resume marker and the atomic rename work exactly
  as with inline writes). The thread that dispatches therefore never waits for the device: on an
  accelerator, while one batch is read back, ``depth`` more wait queued and one more is dispatched.

:func:`run_stages` wires them for one process; ``benchmarks/bench_pipeline.py`` checks, with stub
stages of known cost, that the wall time stays close to the slowest stage rather than their sum.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np


class Decoded(Protocol):
    start: int
    images: dict[int, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]

    def __len__(self) -> int: ...


class Runner(Protocol):
    """What :class:`ModelRunner` needs of one backbone (``catfeat.models.forward.Forward`` is one).
    ``fixed_batch`` (optional, True when absent): a short batch is padded to ``batch_size`` rows."""

    batch_size: int

    def dispatch(self, device_batch): ...

    def fetch(self, handle, n: int) -> np.ndarray: ...


@dataclass
class Pending:
    """Models dispatched for one batch, not yet read back."""

    n: int
    handles: dict[str, list]  # backbone -> one handle per padded chunk
    dispatched: float  # time.perf_counter() when the last backbone was dispatched
    inputs: list = field(default_factory=list)  # the device batches, until their copies are known done


@dataclass
class ModelRunner:
    """Every backbone of a request over one decoded batch (``{input size: uint8 array}``).

    ``runners`` maps a backbone name to (input size, runner), each compiled already (``Forward``
    compiles on construction: no batch is run to compile). Pixels of each size cross to the device
    once per chunk, shared by every backbone of that size; a short chunk is padded only for runners
    whose ``fixed_batch`` says they need it.
    """

    runners: Mapping[str, tuple[int, Runner]]
    to_device: Callable = field(default=None)
    seconds: dict[str, float] = field(default_factory=dict)
    copy_done: Callable = field(default=None)  # waits for the copies of a list of device batches

    def __post_init__(self):
        if self.to_device is None:
            from catfeat.models.forward import to_device

            self.to_device = to_device
        if self.copy_done is None:
            from catfeat.models.forward import copy_done

            self.copy_done = copy_done
        self._lock = threading.Lock()  # dispatch and fetch may run on different threads

    def _add(self, key: str, dt: float) -> None:
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + dt

    def dispatch(self, images: Mapping[int, np.ndarray], only: Iterable[str] | None = None) -> Pending:
        """Queue every wanted backbone on ``images``; ``seconds``: ``to_device`` (padding if any, and copy) and
        ``model:<name>`` (the call: all of the work on a synchronous backend, the launch on a GPU)."""
        from catfeat.models.forward import pad_batch

        names = [n for n in self.runners if only is None or n in set(only)]
        n = len(next(iter(images.values()))) if images else 0
        handles: dict[str, list] = {name: [] for name in names}
        inputs = []
        if n:
            by_size: dict[int, list[str]] = {}
            for name in names:
                by_size.setdefault(self.runners[name][0], []).append(name)
            for size, group in by_size.items():
                bs = self.runners[group[0]][1].batch_size
                pad = any(getattr(self.runners[name][1], "fixed_batch", True) for name in group)
                for i in range(0, n, bs):
                    chunk = images[size][i:i + bs]
                    t = time.perf_counter()
                    x = self.to_device(pad_batch(chunk, bs) if pad else chunk)
                    inputs.append(x)
                    self._add("to_device", time.perf_counter() - t)
                    for name in group:
                        t = time.perf_counter()
                        handles[name].append((self.runners[name][1].dispatch(x), len(chunk)))
                        self._add(f"model:{name}", time.perf_counter() - t)
        return Pending(n, handles, time.perf_counter(), inputs)

    def copied(self, pending: Pending) -> None:
        """Wait until the pixels of a dispatched batch are on the device (its host memory may then
        be reused; ``seconds["to_device"]`` gains the wait)."""
        t = time.perf_counter()
        inputs, pending.inputs = pending.inputs, []
        self.copy_done(inputs)
        self._add("to_device", time.perf_counter() - t)

    def fetch(self, pending: Pending) -> dict[str, np.ndarray]:
        """Wait for a dispatched batch: {backbone: (n, D) float32}."""
        out = {}
        for name, parts in pending.handles.items():
            t = time.perf_counter()
            runner = self.runners[name][1]
            out[name] = (np.concatenate([runner.fetch(h, k) for h, k in parts]) if parts
                         else np.zeros((0, getattr(getattr(runner, "spec", None), "feature_dim", 0)), np.float32))
            self._add(f"model:{name}", time.perf_counter() - t)
        return out

    def __call__(self, images: Mapping[int, np.ndarray], only: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        return self.fetch(self.dispatch(images, only))


class WriterThread:
    """Runs ``write(batch, features)`` on one background thread, in the order batches are put.

    At most ``depth`` batches wait; :meth:`put` blocks beyond that (memory stays bounded) and
    re-raises the first error the thread met. :meth:`close` waits for the queue to drain;
    ``close(abort=True)`` drops what was not yet written (each write is whole or absent, so a
    resumed run redoes exactly those batches).
    """

    def __init__(self, write: Callable[[Decoded, dict], None], depth: int = 2):
        self._write, self._q = write, queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="catfeat-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None or self._abort.is_set():
                continue
            try:
                self._write(*item)
            except BaseException as e:  # handed to the main thread by put/close
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def put(self, batch: Decoded, features: dict) -> None:
        self._raise()
        while True:
            try:
                self._q.put((batch, features), timeout=0.2)
                return
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():
                    raise RuntimeError("the writer thread stopped")

    def close(self, abort: bool = False) -> None:
        if abort:
            self._abort.set()
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if not abort:
            self._raise()


class InBackground:
    """Iterates ``items`` (a generator) on a thread of its own, up to ``depth`` items ahead.

    The reader's own work on its consumer's side (collecting decoded rows, stacking them or copying
    them out of shared memory: tens of milliseconds per large batch) then happens off the thread
    that dispatches to the device; it also starts at once, so worker start-up and the first decodes
    overlap the model build. Items come out in order; an error the generator raises comes out
    after the items before it. :meth:`close` stops the thread and closes the generator.
    """

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2):
        self._items, self._q = items, queue.Queue(maxsize=depth)
        self._stop, self._done = threading.Event(), False
        self._thread = threading.Thread(target=self._run, name="catfeat-reader", daemon=True)
        self._thread.start()

    def _offer(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._offer((item, None)):
                    return
            self._offer((self._END, None))
        except BaseException as e:  # raised to the consumer in its place
            self._offer((self._END, e))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:  # this thread ran the generator, so this thread closes it (pools shut down)
                close()

    def __iter__(self) -> "InBackground":
        return self

    def __next__(self):
        while not self._done:
            try:
                item, error = self._q.get(timeout=0.2)
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    raise RuntimeError("the reader thread stopped") from None
                continue
            if item is not self._END:
                return item
            self._done = True
            if error is not None:
                raise error
        raise StopIteration

    def close(self) -> None:
        """Stop the thread; items it produced that were never taken are released (``release()``, where
        they have one: a lent batch gives its memory back, so the generator can end)."""
        self._stop.set()
        while self._thread.is_alive():
            self._release_dropped()
            self._thread.join(timeout=0.1)
        self._release_dropped()

    def _release_dropped(self) -> None:
        while True:
            try:
                item, _ = self._q.get_nowait()
            except queue.Empty:
                return
            release = getattr(item, "release", None)
            if release is not None:
                release()


def run_stages(batches: Iterator[Decoded], runner: ModelRunner, write: Callable[[Decoded, dict], None],
               wanted: Callable[[Decoded], Sequence[str]] | None = None, seconds: dict | None = None,
               depth: int = 3, trace: list | None = None) -> None:
    """Feed ``batches`` through ``runner`` into ``write`` with the three stages overlapped.

    This thread takes each decoded batch and dispatches it; the writer thread waits for its features
    and writes them. At most ``depth`` dispatched batches wait for the writer, so the device can have
    that many queued behind the one being read back, absorbing a late batch from the reader.
    ``wanted(batch)`` names the backbones that still need that batch (a resumed cache skips what it
    holds). ``seconds`` gains ``wait`` (waiting for the reader), ``queue`` (waiting for room behind
    the writer: the device or the disk is the slower stage), ``to_device``, ``model:<name>``
    (dispatch plus waiting for results) and ``write``. ``trace``, when given, receives one
    ``(start, got, dispatched, fetched, written, n)`` tuple per batch: its first position and
    ``time.perf_counter()`` when it came from the reader, was dispatched, was read back and was
    written, and its number of images (see :func:`steady_state`).

    A batch with ``release`` (pixels lent by the reader) is released as soon as its copies to the
    device are complete, before this thread takes the next batch. When the reader raises (a store
    that stopped answering), the batches it gave before are still written, then its error is raised.
    """
    seconds = {} if seconds is None else seconds
    runner.seconds = seconds
    for key in ("wait", "queue", "write"):
        seconds.setdefault(key, 0.0)

    def fetch_and_write(batch: Decoded, job: tuple[Pending, float]) -> None:
        pending, got = job
        feats = runner.fetch(pending)
        t = time.perf_counter()
        write(batch, feats)
        done = time.perf_counter()
        seconds["write"] += done - t  # only this thread adds to "write"
        if trace is not None:
            trace.append((batch.start, got, pending.dispatched, t, done, len(batch)))

    writer = WriterThread(fetch_and_write, depth)
    ok = False
    try:
        while True:
            t = time.perf_counter()
            try:
                batch = next(batches, None)
            except Exception:  # the reader failed (a store down): what it gave before is written, then it is raised
                ok = True
                raise
            got = time.perf_counter()
            seconds["wait"] += got - t
            if batch is None:
                break
            release = getattr(batch, "release", None)
            try:
                pending = runner.dispatch(batch.images, wanted(batch) if wanted else None)
                if release is not None:
                    runner.copied(pending)
            finally:
                if release is not None:
                    release()
            t = time.perf_counter()
            writer.put(batch, (pending, got))
            seconds["queue"] += time.perf_counter() - t
        ok = True
    finally:
        writer.close(abort=not ok)


# Batches that can wait decoded before the first is taken (the process reader's depth and spare
# slots, InBackground's queue): the most steady_state leaves out as the pipeline's fill.
FILL_BATCHES = 8


def steady_state(trace: Sequence[tuple], skip: int | None = None) -> dict | None:
    """The steady-state pace of a :func:`run_stages` trace: images written after the first ``skip``
    batches over the seconds between those batches' writes, apart from the fill (until the first
    batch counted was written) and the fixed seconds around it. None with fewer than ``skip + 2`` batches.
    ``skip`` (default: a quarter of the batches, 1 to ``FILL_BATCHES``) leaves out the batches the
    reader may have decoded ahead while the model was built, which arrive faster than it decodes.

    ``{"img_s", "batches", "images", "span_s", "first_written", "last_written"}``: the stamps are
    ``time.perf_counter()`` values, for a caller to set against its own start and end.
    """
    rows = sorted(trace)
    skip = max(1, min(FILL_BATCHES, len(rows) // 4)) if skip is None else skip
    if len(rows) < skip + 2:
        return None
    written = [r[4] for r in rows]
    images = sum(r[5] for r in rows[skip + 1:])
    span = written[-1] - written[skip]
    return {"img_s": images / span if span > 0 else float("inf"), "batches": len(rows), "images": images,
            "span_s": span, "first_written": written[skip], "last_written": written[-1]}


def progress_bar(items: Iterable | None, enabled: bool, desc: str, unit: str, total: int | None = None,
                 leave: bool = True):
    """A tqdm progress bar on stderr over ``items`` (or counted by ``update`` up to ``total``), disabled
    unless ``enabled``: catfeat's one bar (extraction on every engine, CV folds, tuning, compare)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, disable=not enabled, leave=leave, dynamic_ncols=True,
                file=sys.stderr)


def skip_line(name: str, reason: str) -> str:
    """How a skipped image is printed (undecodable names shown as their repr)."""
    from catfeat.images.listing import shown

    return f"skipped {shown(name)}: {reason}"


def damaged_line(name: str, reason: str) -> str:
    """How an image decoded with corrupt data (and kept) is printed."""
    from catfeat.images.listing import shown

    return f"damaged {shown(name)}: {reason}"


def report_damaged(bar, report, name: str, reason: str) -> None:
    """Print one image decoded with corrupt data as it happens, once (see :func:`report_skip`)."""
    bar.write(damaged_line(name, reason))
    report.shown.add(name)


def report_skip(bar, report, name: str, reason: str) -> None:
    """Print one skipped image as it happens, once (``report.shown`` keeps the CLI's final list from
    printing it again)."""
    bar.write(skip_line(name, reason))
    report.shown.add(name)
