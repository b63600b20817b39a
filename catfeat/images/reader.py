"""Reading an image list in batches: each image decoded once, on threads or on worker processes.

:func:`iter_batches` is the reader stage of extraction (:mod:`catfeat.extraction.stages`): ``Batch``es of
consecutive images, uint8 arrays at every input size, with the reason for each file that could not
be used. Each image goes through the per-image unit, :func:`catfeat.images.unit.decode_timed`; the
primitives live in :mod:`catfeat.images.listing` and :mod:`catfeat.images.decoders`; the process
reader in :mod:`catfeat.images.process_reader`.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from catfeat.images.listing import DECODE_BYTES, Batch, ByteBudget
from catfeat.images.sources import OutageWatch
from catfeat.images.unit import decode_timed, fetch_image, unit_decode


READERS = ("auto", "threads", "processes")
# "auto" reads on processes from this many cores and images on: below, spawning the workers costs
# more than the interpreter lock does.
PROCESS_READER_MIN = {"cores": 8, "images": 2048}


# Threads of the driver that want a core of their own beside the decoders when a GPU computes: the
# reader's consumer thread, the writer thread and the thread that dispatches to the device.
DRIVER_THREADS = 3


def reader_workers(accelerator: bool) -> int:
    """Decoders to run by default: every core on a CPU-only run (as before: there the model's own
    threads and the decoders share the cores), every core less ``DRIVER_THREADS`` when the model runs
    on an accelerator, where a late dispatch or write leaves the device idle (the GPU ladder's
    fewer-workers rung, ``benchmarks/gpu_ladder.py``, measures the choice)."""
    cores = os.cpu_count() or 1
    return max(1, cores - DRIVER_THREADS) if accelerator else cores


def choose_reader(reader: str, workers: int | None, n_images: int, sizes: Sequence[int] = (),
                  batch_size: int = 0, prefetch: int = 2, lend: bool = False, batched: bool = False) -> str:
    """"threads" or "processes" for ``reader``: "auto" takes processes from
    ``PROCESS_READER_MIN`` cores and images on, where the shared memory for their batches is free.
    A decoder that decodes whole batches (``batched``: nvImageCodec) reads on "batches" whatever
    ``reader`` says (:func:`iter_batches_nvimgcodec`)."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    if batched:
        return "batches"
    if reader != "auto":
        return reader
    from catfeat.images.process_reader import shared_memory_free, shared_memory_needed

    cores = workers or os.cpu_count() or 1
    big = cores >= PROCESS_READER_MIN["cores"] and n_images >= PROCESS_READER_MIN["images"]
    free = shared_memory_free()
    return "processes" if big and (free is None or free >= shared_memory_needed(sizes, batch_size, prefetch, lend)) \
        else "threads"


def _in_order(pool: ThreadPoolExecutor, paths: Sequence, batch_size: int, start: int, prefetch: int,
              task) -> Iterator[tuple[int, list]]:
    """``(first position, [task(path) for each path of the batch])`` for each batch of ``paths[start:]``,
    in order, with the tasks of ``prefetch`` batches ahead already submitted to ``pool``."""
    queue = deque((b, min(b + batch_size, len(paths))) for b in range(start, len(paths), batch_size))
    pending: deque = deque()

    def submit_next() -> None:
        b0, b1 = queue.popleft()
        pending.append((b0, [pool.submit(task, paths[i]) for i in range(b0, b1)]))

    while queue and len(pending) <= prefetch:
        submit_next()
    while pending:
        b0, futures = pending.popleft()
        if queue:
            submit_next()
        yield b0, [f.result() for f in futures]


def iter_batches(paths: Sequence[Path], sizes: Sequence[int], batch_size: int, start: int = 0,
                 workers: int | None = None, prefetch: int = 2, decode=None,
                 budget: ByteBudget | None = None, reader: str = "threads", lend: bool = False) -> Iterator[Batch]:
    """Decode ``paths[start:]`` on a thread pool of ``workers`` threads (default: every core; never
    more than the images; the decoders release the GIL) in order, ``prefetch`` batches ahead of the consumer, so that decoding
    overlaps the model. ``decode(path, sizes)``: a decoder's function from :mod:`catfeat.images.decoders`
    (default: the "auto" decoder; Pillow's has decode and resize timed apart). ``budget`` bounds the
    full-size pixels decoding at once (default: a new :class:`ByteBudget` of ``DECODE_BYTES``).
    ``reader``: "threads", "processes" (:mod:`catfeat.images.process_reader`: many cores, no shared
    interpreter lock), "auto", or "batches" (:func:`iter_batches_nvimgcodec`, for nvImageCodec). ``lend``:
    the process reader may hand batches over as views of its shared memory, each to be given back with
    ``Batch.release`` (see ``iter_batches_processes``)."""
    from catfeat.images.decoders import get_decoder

    sizes = sorted(set(int(s) for s in sizes))
    if reader == "batches":
        yield from iter_batches_nvimgcodec(paths, sizes, batch_size, start, workers, prefetch, decode, budget)
        return
    if choose_reader(reader, workers, len(paths) - start, sizes, batch_size, prefetch, lend) == "processes":
        from catfeat.images.process_reader import iter_batches_processes

        limit = budget.limit if budget is not None else DECODE_BYTES
        yield from iter_batches_processes(paths, sizes, batch_size, start, workers, prefetch, decode, limit, lend)
        return
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths) - start))
    decode = decode or get_decoder("auto").decode
    one = unit_decode(decode)
    budget = ByteBudget() if budget is None else budget
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="catfeat-decode") as pool:
        for b0, results in _in_order(pool, paths, batch_size, start, prefetch,
                                     lambda path: decode_timed(path, sizes, budget, one)):
            ok = np.array([r[0] is not None for r in results], dtype=bool)
            errors = {b0 + i: r[1] for i, r in enumerate(results) if r[0] is None}
            damaged = {b0 + i: r[1] for i, r in enumerate(results) if r[0] is not None and r[1]}
            images = {s: (np.stack([r[0][s] for r in results if r[0] is not None])
                          if ok.any() else np.zeros((0, s, s, 3), np.uint8)) for s in sizes}
            yield Batch(b0, images, ok, errors, sum(r[2] for r in results), sum(r[3] for r in results), damaged)


def iter_batches_nvimgcodec(paths: Sequence[Path], sizes: Sequence[int], batch_size: int, start: int = 0,
                            workers: int | None = None, prefetch: int = 2, decode=None,
                            budget: ByteBudget | None = None) -> Iterator[Batch]:
    """Like :func:`iter_batches`, decoding each batch's plain JPEGs together with nvImageCodec
    (:func:`catfeat.images.nvimgcodec_decoder.decode_jpegs`: on the GPU, resized on the device).

    Headers and bytes are read on a pool of ``workers`` threads, ``prefetch`` batches ahead. Every
    other file (not a plain JPEG, truncated, too large, refused by nvImageCodec, a gray last pixel)
    goes through ``decode`` (default: the nvimgcodec decoder's one-file function, whose own fallback
    is the OpenCV decoder) under ``budget``, as on the thread reader: same reasons, same damaged
    list, same row order. Images are device arrays under the JAX backend, numpy elsewhere."""
    from catfeat.images.decoders import get_decoder, read_bytes
    from catfeat.images.jpeg import complete_jpeg_bytes, plain_jpeg
    from catfeat.images.listing import DecodeError
    from catfeat.images.nvimgcodec_decoder import canvas_for, decode_jpegs, merge_rows

    sizes = sorted(set(int(s) for s in sizes))
    workers = max(1, min(workers or os.cpu_count() or 1, max(1, len(paths) - start)))
    one = unit_decode(decode or get_decoder("nvimgcodec").decode)
    budget = ByteBudget() if budget is None else budget

    def prepare(path) -> tuple:
        """(what the CPU path reads: the file, or a URL's object read once (else the reason it could
        not be read, with the seconds it took); (bytes, header) for nvImageCodec, or None)."""
        path, reason, seconds = fetch_image(path)
        if path is None:
            return (reason, seconds), None
        try:
            head = plain_jpeg(path)
            if head is None or canvas_for(head) is None:
                return path, None
            data = complete_jpeg_bytes(path, head, read_bytes)
        except (DecodeError, OSError):  # the CPU path names the reason
            return path, None
        return path, None if data is None else (data, head)

    def cpu_path(where) -> tuple:
        """:func:`decode_timed`'s result for what :func:`prepare` read."""
        if isinstance(where, tuple):  # could not be read: its reason
            return None, where[0], where[1], 0.0
        return decode_timed(where, sizes, budget, one)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="catfeat-read") as pool:
        for b0, prepared in _in_order(pool, paths, batch_size, start, prefetch, prepare):
            t = time.perf_counter()
            preps = [p for _, p in prepared]
            fast = [i for i, p in enumerate(preps) if p is not None]
            images, kept = decode_jpegs([preps[i][0] for i in fast], [preps[i][1] for i in fast], sizes,
                                        batch_size)
            seconds = time.perf_counter() - t
            done = [fast[k] for k in kept]
            rest = sorted(set(range(len(preps))) - set(done))
            slow = dict(zip(rest, [f.result() for f in [pool.submit(cpu_path, prepared[i][0]) for i in rest]]))
            ok = np.array([i not in slow or slow[i][0] is not None for i in range(len(preps))], dtype=bool)
            errors = {b0 + i: r[1] for i, r in slow.items() if r[0] is None}
            damaged = {b0 + i: r[1] for i, r in slow.items() if r[0] is not None and r[1]}
            host = {i: r[0] for i, r in slow.items() if r[0] is not None}
            yield Batch(b0, merge_rows(images, done, host, sizes), ok, errors,
                        seconds + sum(r[2] + r[3] for r in slow.values()), 0.0, damaged)


def hold_through_outages(batches: Iterator[Batch], paths: Sequence,
                         watch: OutageWatch | None = None) -> Iterator[Batch]:
    """``batches`` in order, watched for a store that stops answering (``watch``, default
    :class:`~catfeat.images.sources.OutageWatch`: ``CATFEAT_STORE_DOWN_AFTER`` images in a row).

    A batch that ends in images whose store could not be reached is held (its pixels copied out of
    lent memory) until a later image shows the store answers: then it goes on, and those images are
    skipped with their reason. Should the run of failures reach the limit first, the held batches
    are dropped and :class:`~catfeat.images.sources.StoreDownError` raised: no image is recorded as
    skipped because the store was down, and a rerun resumes at the first row not written.
    ``paths``: the locations of the whole list (batch positions index it)."""
    watch = OutageWatch() if watch is None else watch
    held: list[Batch] = []
    for batch in batches:
        try:
            for pos in range(batch.start, batch.start + len(batch)):
                watch.see(paths[pos], batch.errors.get(pos))
        except BaseException:
            if batch.release is not None:
                batch.release()
            raise
        if watch.open:
            if batch.release is not None:  # held for long: give the reader its memory back
                batch.images = {s: np.array(a) for s, a in batch.images.items()}
                batch.release()
                batch.release = None
            held.append(batch)
            continue
        yield from held
        held.clear()
        yield batch
    yield from held  # the list ended first: too few failures in a row to call the store down
