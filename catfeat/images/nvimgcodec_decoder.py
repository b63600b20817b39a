"""GPU decoding: batches of plain JPEGs decoded by NVIDIA nvImageCodec, resized in one compiled call.

nvImageCodec (``pip install "catfeat[gpu]"``: ``nvidia-nvimgcodec-cu12`` with nvJPEG) decodes a
whole batch of JPEG byte strings at once, on the GPU where it has one (its CPU backend,
libjpeg-turbo, elsewhere: same pixels, so CI tests this path without a GPU). The decoded images
are packed into a fixed canvas (the smallest of :data:`CANVAS_STEPS` that holds them, in chunks of
at most :data:`CANVAS_BYTES`, a full batch of rows or a power of two) and resized to every input
size by :func:`catfeat.images.canvas_resize.resize_canvas`: under the JAX backend one ``jit`` per
canvas shape, whatever the image sizes, and the result stays on the device for the model; under other
backends the same arithmetic runs in numpy on the host. The decoded pixels are copied through the
host into the canvas (nvImageCodec returns one buffer per image, of its own shape).

Only the decode is here. Which files come here and what happens to the others (the OpenCV
decoder's path, with its skip reasons) is :mod:`catfeat.images.decoders` and
:func:`catfeat.images.reader.iter_batches_nvimgcodec`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from catfeat.images.canvas_resize import jitted_resize, resize_canvas, turns
from catfeat.images.jpeg import JpegHeader, reduction
from catfeat.images.listing import looks_gray_filled

MODULE = "nvidia.nvimgcodec"
# Canvas sides: an image is packed into the smallest that holds it; larger photos take the CPU path.
CANVAS_STEPS = (512, 1024, 2048, 4096)
# uint8 canvas bytes per resize call (a batch of 4,096-pixel photos is resized a few at a time).
CANVAS_BYTES = 256 << 20

log = logging.getLogger("catfeat")


def installed() -> bool:
    """Whether nvImageCodec's Python package is importable."""
    import importlib.util

    try:
        return importlib.util.find_spec(MODULE) is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace at all
        return False


@contextlib.contextmanager
def _quiet_stderr():
    """nvImageCodec prints its library probes ("Failed to load nvjpeg library!") to file descriptor 2
    while a decoder is created; they go to the catfeat log at debug level instead."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("nvImageCodec: %s", text)


@dataclass
class _Session:
    """One nvImageCodec decoder for this process (it runs its own threads; calls are serialised)."""

    decoder: object
    params: object
    on_gpu: bool
    lock: threading.Lock


@lru_cache(maxsize=1)
def _module():
    """``nvidia.nvimgcodec``, imported without its library probes on stderr and without its per-file
    warnings (a file it cannot decode gets the CPU path's verdict)."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    with _quiet_stderr():
        from nvidia import nvimgcodec

    return nvimgcodec


@lru_cache(maxsize=1)
def session() -> _Session:
    """This process's nvImageCodec decoder: on the GPU where CUDA answers, else its CPU backend."""
    nv = _module()
    with _quiet_stderr():
        try:
            decoder, on_gpu = nv.Decoder(), True
        except RuntimeError:  # no CUDA device or driver: the CPU backend
            decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
            on_gpu = False
    # stored orientation (turned after the resize, see canvas_resize), always three RGB channels
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.SRGB, sample_format=nv.I_RGB)
    return _Session(decoder, params, on_gpu, threading.Lock())


def version() -> str:
    """The nvImageCodec version (recorded in caches beside the decoder name)."""
    return str(getattr(_module(), "__version__", "?"))


def canvas_for(head: JpegHeader) -> int | None:
    """The canvas side an image is packed into, or None when it is too large for the GPU path."""
    side = max(head.width, head.height)
    return next((c for c in CANVAS_STEPS if side <= c), None)


def _chunk(canvas: int, batch_size: int) -> int:
    """Images per resize call on a canvas of this side: the batch, or fewer where they would pass
    :data:`CANVAS_BYTES`."""
    return max(1, min(batch_size, CANVAS_BYTES // (canvas * canvas * 3)))


def _rows(n: int, k: int) -> int:
    """The rows a call of ``n`` images is padded to (``k`` at most): ``k`` when over half full, else
    the next power of two (at least 8), so that a few images of another canvas do not fill a whole
    batch of canvases, and the shapes, hence the compiles, stay a handful per canvas."""
    if 2 * n > k:
        return k
    return min(k, max(8, 1 << (n - 1).bit_length()))


def _on_jax() -> bool:
    import keras

    return keras.backend.backend() == "jax"


def _resize(canvas: np.ndarray, heads: Sequence[JpegHeader], sizes: tuple, jax: bool):
    h = np.array([hd.height for hd in heads], np.int32)
    w = np.array([hd.width for hd in heads], np.int32)
    f = np.array([[reduction(hd, s) for s in sizes] for hd in heads], np.int32)  # (n, sizes): DCT scale per size
    flips = turns([hd.orientation for hd in heads])
    boxed = bool((f > 1).any())
    if jax:
        return jitted_resize(sizes, boxed)(canvas, h, w, f, flips)
    return resize_canvas(np, canvas, h, w, f, flips, sizes, boxed)


def decode_jpegs(datas: Sequence[bytes], heads: Sequence[JpegHeader], sizes: Sequence[int],
                 batch_size: int | None = None, on_device: bool | None = None) -> tuple[dict[int, object], list[int]]:
    """Decode plain JPEGs (their bytes and :func:`catfeat.images.jpeg.plain_jpeg` headers, each
    :func:`canvas_for` some canvas) and resize each to every size, box-reduced first by the DCT scale
    the OpenCV decoder decodes that size at (:func:`catfeat.images.jpeg.reduction`).

    Returns ``({size: (m, size, size, 3) uint8}, positions)``: the m images decoded, in input order,
    and their positions in the input. The others (nvImageCodec refused them, their shape is not the
    header's, or their last stored pixel is libjpeg's gray fill of a truncated scan, checked on the
    host copy so that nothing here waits for the device) are left for the caller's CPU path, which
    gives the verdict. ``on_device``: resize under JAX on its default device (default: where Keras
    runs on JAX), else in numpy on the host."""
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    s = session()
    with s.lock:
        decoded = s.decoder.decode(list(datas), params=s.params) if datas else []
    groups: dict[int, list[int]] = {}
    host: dict[int, np.ndarray] = {}
    for i, img in enumerate(decoded):
        if img is None:
            continue
        arr = np.asarray(img.cpu() if s.on_gpu else img)
        if arr.shape != (heads[i].height, heads[i].width, 3) or arr.dtype != np.uint8 \
                or looks_gray_filled(arr[-1, -1]):
            continue
        host[i] = arr
        groups.setdefault(canvas_for(heads[i]), []).append(i)
    jax = _on_jax() if on_device is None else on_device
    parts: list[tuple[list[int], dict]] = []
    for side, members in sorted(groups.items()):
        k = _chunk(side, batch_size or len(members))
        for c0 in range(0, len(members), k):
            rows = members[c0:c0 + k]
            n = _rows(len(rows), k)
            canvas = np.empty((n, side, side, 3), np.uint8)  # only each image's own top-left part is read
            for j, i in enumerate(rows):
                canvas[j, :heads[i].height, :heads[i].width] = host.pop(i)
            pad = n - len(rows)  # padded with 1-pixel images: a fixed shape, no compile per batch
            hd = [heads[i] for i in rows] + [JpegHeader(1, 1, 1)] * pad
            parts.append((rows, _resize(canvas, hd, sizes, jax)))
    kept = sorted((i, p, j) for p, (rows, _) in enumerate(parts) for j, i in enumerate(rows))
    return _gather(parts, kept, sizes, jax), [i for i, _, _ in kept]


def _gather(parts: list, kept: list, sizes: tuple, jax: bool) -> dict[int, object]:
    """The rows ``kept`` ([(position, part, row)], in order) out of the parts' arrays (padded chunks)."""
    if jax:
        import jax.numpy as xp
    else:
        xp = np
    if not kept:
        return {sz: xp.zeros((0, sz, sz, 3), xp.uint8) for sz in sizes}
    if len(parts) == 1 and [j for _, _, j in kept] == list(range(len(kept))):  # the usual batch: in order
        n, out = len(kept), parts[0][1]
        return {sz: out[sz][:n] if n < len(out[sz]) else out[sz] for sz in sizes}
    offsets = np.cumsum([0] + [len(out[sizes[0]]) for _, out in parts])
    index = np.array([offsets[p] + j for _, p, j in kept], np.int32)
    return {sz: xp.concatenate([out[sz] for _, out in parts])[index] for sz in sizes}


def merge_rows(images: dict[int, object], positions: Sequence[int], host: dict[int, dict[int, np.ndarray]],
               sizes: Sequence[int]) -> dict[int, object]:
    """``{size: rows}`` in position order from the decoded ``images`` (rows at ``positions``, sorted)
    and ``host`` arrays ({position: {size: array}}: the images the CPU path decoded)."""
    if not host:
        return images
    jax = any(not isinstance(v, np.ndarray) for v in images.values())
    if jax:
        import jax.numpy as xp
    else:
        xp = np
    order = sorted(list(positions) + list(host))
    where = {p: k for k, p in enumerate(positions)}
    where.update({p: len(positions) + k for k, p in enumerate(host)})
    index = np.array([where[p] for p in order], np.int32)
    return {s: xp.concatenate([images[s], xp.asarray(np.stack([a[s] for a in host.values()]))])[index]
            for s in sizes}
