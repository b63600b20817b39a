"""The per-image decode unit that every reader goes through: one file -> uint8 arrays at every size.

:func:`decode_timed` decodes one image under a :class:`~catfeat.images.listing.ByteBudget` (the
full-size pixels being decoded at once, estimated from the header) and turns any failure into a
reason, never an exception. Its callers: the thread reader (:func:`catfeat.images.reader.iter_batches`,
one budget over its threads), the process reader (:mod:`catfeat.images.process_reader`, one budget in
shared memory over its workers), the Ray engine's decode tasks (a budget per task,
:func:`catfeat.extraction.ray_engine.decode_batch`) and predict (:func:`catfeat.predict.predict_images`).
So every reader skips the same files for the same reasons and reports the same damaged ones.
An image at a URL is read here first, by :func:`catfeat.images.sources.fetch` (retries included), and
then decoded from memory under the same budget and checks as a local file.
"""
from __future__ import annotations

import io
import time
import warnings
from typing import Callable, Sequence

from catfeat.images.listing import (
    FILE_BYTES_PER_PIXEL, FILE_SLACK_BYTES, MAX_PIXELS, ByteBudget, DecodeError, check_file_size, declared_bytes,
    read_rgb_checked, resize_all)
from catfeat.images.sources import FetchError, fetch

# No image file catfeat reads is larger than this, whatever its header says (see file_size_limit).
MAX_FILE_BYTES = FILE_BYTES_PER_PIXEL * MAX_PIXELS + FILE_SLACK_BYTES


def check_header(head: bytes, size: int) -> None:
    """Refuse an object of ``size`` bytes whose header (its first bytes, ``head``) declares fewer pixels
    than that size can need, before the rest is read (the check a local file gets from its stat)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head)) as im:
                width, height = im.size
    except Exception:  # not a header Pillow knows in these bytes: the decoder gives its verdict
        return
    check_file_size(size, width, height)


def unit_decode(decode: Callable | None) -> Callable | None:
    """The ``decode`` argument of :func:`decode_timed` for a decoder's function: None for Pillow's
    (decode and resize then timed apart), the function itself otherwise."""
    from catfeat.images.decoders import DECODERS

    return None if decode is None or decode is DECODERS["pillow"].decode else decode


def fetch_image(path) -> tuple:
    """``(what the decoders read, None, seconds)`` for ``path``: a local path as it is, a URL's object
    read once (:func:`catfeat.images.sources.fetch`, under the checks of a local file); or
    ``(None, reason, seconds)`` when it cannot be read. Reading a URL again is never needed: the
    decoders take what this returns."""
    t = time.perf_counter()
    try:
        return fetch(path, MAX_FILE_BYTES, check_header), None, time.perf_counter() - t
    except (FetchError, DecodeError) as e:
        return None, str(e), time.perf_counter() - t


def decode_rows(paths: Sequence, sizes: Sequence[int], decode: Callable) -> list[tuple]:
    """``[(arrays or None, reason or None, seconds)]`` for each path: the reader's unit of work. With
    arrays, the reason (if any) is the corrupt data the image was decoded with (``Decoded.damaged``)."""
    out = []
    for path in paths:
        t = time.perf_counter()
        try:
            arrays = decode(path, sizes)
            out.append((arrays, getattr(arrays, "damaged", None), time.perf_counter() - t))
        except DecodeError as e:
            out.append((None, str(e), time.perf_counter() - t))
        except Exception as e:  # anything else a decoder throws is still this one file's problem
            out.append((None, f"cannot decode ({e.__class__.__name__}: {e})", time.perf_counter() - t))
    return out


def decode_timed(path, sizes: Sequence[int], budget: ByteBudget | None = None,
                 decode: Callable | None = None) -> tuple:
    """One image under the byte ``budget``: (arrays or None, reason or None, decode seconds, resize
    seconds); a reason beside arrays is the corrupt data the image was decoded with. ``decode``: a
    decoder's function (decode and resize then count as decode), default Pillow's two steps timed
    apart (see :func:`unit_decode`). The unit of work of every reader: threads, processes, Ray, predict.
    ``path``: a local path or a URL (read by :func:`catfeat.images.sources.fetch`; the seconds that
    takes count as decode seconds)."""
    path, reason, fetched = fetch_image(path)
    if path is None:
        return None, reason, fetched, 0.0
    cost = declared_bytes(path) if budget is not None else 0
    if cost:
        budget.acquire(cost)
    try:
        if decode is not None:
            arrays, reason, seconds = decode_rows([path], sizes, decode)[0]
            return arrays, reason, fetched + seconds, 0.0
        t = time.perf_counter()
        try:
            im, damaged = read_rgb_checked(path)
        except DecodeError as e:
            return None, str(e), fetched + time.perf_counter() - t, 0.0
        t1 = time.perf_counter()
        out = resize_all(im, sizes)
        del im
        return out, damaged, fetched + t1 - t, time.perf_counter() - t1
    finally:
        if cost:
            budget.release(cost)
