"""Reading an image list in batches: each image decoded once, on threads or on worker processes.

:func:`iter_batches` is the reader stage of extraction (:mod:`catfeat.extraction.stages`): ``Batch``es of
consecutive images, uint8 arrays at every input size, with the reason for each file that could not
be used. Each image goes through the per-image unit, :func:`catfeat.images.unit.decode_timed`; the
primitives live in :mod:`catfeat.images.listing` and :mod:`catfeat.images.decoders`; the process
reader in :mod:`catfeat.images.process_reader`.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from catfeat.images.listing import DECODE_BYTES, Batch, ByteBudget
from catfeat.images.unit import decode_timed, unit_decode


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
                  batch_size: int = 0, prefetch: int = 2, lend: bool = False) -> str:
    """"threads" or "processes" for ``reader``: "auto" takes processes from
    ``PROCESS_READER_MIN`` cores and images on, where the shared memory for their batches is free."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    if reader != "auto":
        return reader
    from catfeat.images.process_reader import shared_memory_free, shared_memory_needed

    cores = workers or os.cpu_count() or 1
    big = cores >= PROCESS_READER_MIN["cores"] and n_images >= PROCESS_READER_MIN["images"]
    free = shared_memory_free()
    return "processes" if big and (free is None or free >= shared_memory_needed(sizes, batch_size, prefetch, lend)) \
        else "threads"


def iter_batches(paths: Sequence[Path], sizes: Sequence[int], batch_size: int, start: int = 0,
                 workers: int | None = None, prefetch: int = 2, decode=None,
                 budget: ByteBudget | None = None, reader: str = "threads", lend: bool = False) -> Iterator[Batch]:
    """Decode ``paths[start:]`` on a thread pool of ``workers`` threads (default: every core; never
    more than the images; the decoders release the GIL) in order, ``prefetch`` batches ahead of the consumer, so that decoding
    overlaps the model. ``decode(path, sizes)``: a decoder's function from :mod:`catfeat.images.decoders`
    (default: the "auto" decoder; Pillow's has decode and resize timed apart). ``budget`` bounds the
    full-size pixels decoding at once (default: a new :class:`ByteBudget` of ``DECODE_BYTES``).
    ``reader``: "threads", "processes" (:mod:`catfeat.images.process_reader`: many cores, no shared
    interpreter lock) or "auto". ``lend``: the process reader may hand batches over as views of its
    shared memory, each to be given back with ``Batch.release`` (see ``iter_batches_processes``)."""
    from catfeat.images.decoders import get_decoder

    sizes = sorted(set(int(s) for s in sizes))
    if choose_reader(reader, workers, len(paths) - start, sizes, batch_size, prefetch, lend) == "processes":
        from catfeat.images.process_reader import iter_batches_processes

        limit = budget.limit if budget is not None else DECODE_BYTES
        yield from iter_batches_processes(paths, sizes, batch_size, start, workers, prefetch, decode, limit, lend)
        return
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths) - start))
    decode = decode or get_decoder("auto").decode
    one = unit_decode(decode)
    budget = ByteBudget() if budget is None else budget
    queue = deque((b, min(b + batch_size, len(paths))) for b in range(start, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="catfeat-decode") as pool:
        pending: deque = deque()

        def submit_next() -> None:
            b0, b1 = queue.popleft()
            pending.append((b0, [pool.submit(decode_timed, paths[i], sizes, budget, one) for i in range(b0, b1)]))

        while queue and len(pending) <= prefetch:
            submit_next()
        while pending:
            b0, futures = pending.popleft()
            if queue:
                submit_next()
            results = [f.result() for f in futures]
            ok = np.array([r[0] is not None for r in results], dtype=bool)
            errors = {b0 + i: r[1] for i, r in enumerate(results) if r[0] is None}
            damaged = {b0 + i: r[1] for i, r in enumerate(results) if r[0] is not None and r[1]}
            images = {s: (np.stack([r[0][s] for r in results if r[0] is not None])
                          if ok.any() else np.zeros((0, s, s, 3), np.uint8)) for s in sizes}
            yield Batch(b0, images, ok, errors, sum(r[2] for r in results), sum(r[3] for r in results), damaged)
