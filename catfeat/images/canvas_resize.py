"""Bilinear resize of many images of different sizes at once, from one fixed-shape canvas.

Each image sits in the top-left corner of a ``(canvas, canvas, 3)`` uint8 array; its height, width,
DCT-style reduction factor and EXIF orientation are per-image numbers, not shapes, so one compiled
call serves every image size (a JAX ``jit`` compiles once per canvas and batch shape). The pixels
follow the OpenCV decoder (:mod:`catfeat.images.decoders`): an optional box average over ``f x f``
blocks (what libjpeg's 1/f scaled decoding approximates; exact for 1/8), then OpenCV's
half-pixel bilinear sampling with clamped edges and no anti-aliasing, then the upright turn.

The box sums come from integer cumulative sums (exact), gathered at two reduced pixels per output
row and column, so each output pixel costs a few gathers whatever ``f`` is. ``xp`` is the array
module: ``jax.numpy`` (device, jitted by :func:`jitted_resize`) or ``numpy`` (host).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from catfeat.images.jpeg import ORIENTATIONS

# per orientation 1..8 (index 0 unused): flip rows, flip columns, transpose
_TURNS = np.array([ORIENTATIONS[1]] + [ORIENTATIONS[k] for k in range(1, 9)], dtype=bool)


def turns(orientations: Sequence[int]) -> np.ndarray:
    """(n, 3) bool: flip rows, flip columns, transpose, for each EXIF orientation (unknown ones: upright)."""
    o = np.asarray(orientations, dtype=np.int64)
    return _TURNS[np.where((o >= 1) & (o <= 8), o, 0)]


def _axis(xp, length, factor, size: int, flip):
    """Sampling of one axis for each image: raw index ranges [b, e) of the two reduced pixels each of the
    ``size`` outputs reads, and their weights divided by the pixels in each range. Inputs are (n,)."""
    f = factor[:, None]
    n_red = (length + factor - 1) // factor  # libjpeg's scaled size: ceil(length / f)
    i = xp.arange(size)[None, :]
    i = xp.where(flip[:, None], size - 1 - i, i)
    src = (i.astype(xp.float32) + 0.5) * (n_red.astype(xp.float32) / size)[:, None] - 0.5
    k0 = xp.floor(src)
    frac = src - k0
    k0 = k0.astype(xp.int32)
    top = (n_red - 1)[:, None]
    ranges = []
    for k, w in ((xp.clip(k0, 0, top), 1.0 - frac), (xp.clip(k0 + 1, 0, top), frac)):
        b = k * f
        e = xp.minimum(b + f, length[:, None])
        ranges.append((b, e, w / (e - b).astype(xp.float32)))
    return ranges


def _take(xp, x, index, axis: int):
    """``x`` (n, a, b, 3) gathered at ``index`` (n, m) along ``axis`` 1 or 2."""
    n = x.shape[0]
    if axis == 1:
        return x[xp.arange(n)[:, None], index]
    return x[xp.arange(n)[:, None, None], xp.arange(x.shape[1])[None, :, None], index[:, None, :]]


def _cumsum0(xp, x, axis: int):
    """Cumulative sum along ``axis`` with a zero prepended (so a box sum is ``cum[e] - cum[b]``)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0)
    return xp.pad(xp.cumsum(x, axis=axis), pad)


def _sample(xp, x, ranges, axis: int, boxed: bool):
    """[(box sum of ``x`` over each sampled range along ``axis``, its weight)]: integer sums from a
    cumulative sum when ``boxed``, else the range is one pixel and is gathered directly."""
    if not boxed:
        return [(_take(xp, x, b, axis), wt) for b, _, wt in ranges]
    cum = _cumsum0(xp, x.astype(xp.int32), axis)
    return [(_take(xp, cum, e, axis) - _take(xp, cum, b, axis), wt) for b, e, wt in ranges]


def resize_canvas(xp, canvas, heights, widths, factors, flips, sizes: Sequence[int], boxed: bool = True):
    """``{size: (n, size, size, 3) uint8}`` from ``canvas`` (n, C, C, 3) uint8 holding image i in
    ``[:heights[i], :widths[i]]``. ``factors``: the
    box reduction of each image (1, 2, 4 or 8; all 1 unless ``boxed``), (n,) for every size or
    (n, len(sizes)) per size; ``flips``: :func:`turns` of its orientation."""
    canvas = xp.asarray(canvas)
    h, w, f = (xp.asarray(v, dtype=xp.int32) for v in (heights, widths, factors))
    flips = xp.asarray(flips)
    fy, fx, tr = flips[:, 0], flips[:, 1], flips[:, 2]
    out = {}
    for k, s in enumerate(sizes):
        fk = f[:, k] if f.ndim == 2 else f
        rows, cols = _axis(xp, h, fk, s, fy), _axis(xp, w, fk, s, fx)  # stored axes; transposed at the end
        acc = None
        for band, wy in _sample(xp, canvas, rows, 1, boxed):  # (n, s, C, 3): the sampled rows
            for box, wx in _sample(xp, band, cols, 2, boxed):  # (n, s, s, 3)
                part = box.astype(xp.float32) * wy[:, :, None, None] * wx[:, None, :, None]
                acc = part if acc is None else acc + part
        img = xp.clip(xp.floor(acc + 0.5), 0, 255).astype(xp.uint8)
        out[s] = xp.where(tr[:, None, None, None], xp.swapaxes(img, 1, 2), img)
    return out


@lru_cache(maxsize=None)
def jitted_resize(sizes: tuple[int, ...], boxed: bool):
    """:func:`resize_canvas` compiled by JAX for these sizes (one compile per canvas and batch shape)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda canvas, h, w, f, flips: resize_canvas(jnp, canvas, h, w, f, flips, sizes, boxed))
