"""Image decoders: file -> uint8 RGB arrays at every input size, from one decode.

One table maps a decoder name to how it decodes; the name is recorded in each cache (attribute
``decoder``), so that features made by different decoders are never mixed:

* ``opencv``: JPEGs are decoded by OpenCV (libjpeg-turbo), shrunk in the DCT domain by 2, 4 or 8
  when the photo is that many times larger than the largest input size, then resized bilinearly
  (no anti-aliasing filter beyond that). Anything that is not a plain, complete RGB or grayscale
  JPEG (PNG, GIF, CMYK, truncated files, ...) goes to the Pillow decoder, so odd files behave the
  same under both. About 2.5x the Pillow decoder's speed per core on the Kaggle photos
  (``benchmarks/bench_feeder.py``).
* ``pillow``: Pillow decode, EXIF rotation, whole image resized with Pillow's anti-aliased
  bilinear filter (the reference recipe's pixels).

``auto`` picks ``opencv`` where OpenCV is installed, else ``pillow``.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from catfeat.images.listing import (
    DecodeError, MAX_PIXELS, check_file_size, check_jpeg_scans, check_regular, file_size_limit, jpeg_damage,
    read_rgb_checked, resize_all)
from catfeat.images.sources import Blob, openable

DecodeFn = Callable[..., dict[int, np.ndarray]]


class Decoded(dict):
    """{size: uint8 array} of one image; ``damaged``: why its pixels hold corrupt data, or None."""

    damaged: str | None = None


def _decoded(arrays: dict[int, np.ndarray], damaged: str | None, skip_damaged: bool) -> Decoded:
    if damaged and skip_damaged:
        raise DecodeError(f"{damaged}; skipped (--skip-damaged)")
    out = Decoded(arrays)
    out.damaged = damaged
    return out


def read_bytes(path: str | os.PathLike | Blob, limit: int | None = None) -> bytes:
    """The bytes of one regular file (links resolved) or :class:`~catfeat.images.sources.Blob`; anything
    else is a :class:`DecodeError`, never a blocking open (a FIFO named like an image would hang a plain
    ``open``). A file of more than ``limit`` bytes is a :class:`DecodeError` too, found before reading it."""
    import stat

    if isinstance(path, Blob):
        if limit is not None and len(path.data) > limit:
            raise DecodeError(f"file is {len(path.data):,} bytes, more than its image can need ({limit:,}); "
                              "not read: re-save the image")
        return path.data
    check_regular(path)
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, the open still returns
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        check_regular(path)  # names what went wrong in the same words as the Pillow path
        raise DecodeError(f"cannot open {os.fsdecode(path)!r}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DecodeError("not a regular file (it changed while being read); only image files are read")
        if limit is not None and os.fstat(fd).st_size > limit:
            raise DecodeError(f"file is {os.fstat(fd).st_size:,} bytes, more than its image can need ({limit:,}); "
                              "not read: re-save the image")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:  # it grew after the check
            raise DecodeError(f"file is more than {limit:,} bytes, more than its image can need; not read")
        return data
    except OSError as e:
        raise DecodeError(f"cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


def _decode_pillow(path: str | os.PathLike, sizes: Sequence[int], skip_damaged: bool = False) -> Decoded:
    im, damaged = read_rgb_checked(path)
    return _decoded(resize_all(im, sizes), damaged, skip_damaged)


def _cv2():
    import cv2

    # The reader runs one decode per thread on every core; OpenCV's own threads would oversubscribe.
    cv2.setNumThreads(1)
    return cv2


# libjpeg-turbo scales by 1/2, 1/4, 1/8 while decoding (the DCT domain), far cheaper than a resize.
_REDUCED = ((8, "IMREAD_REDUCED_COLOR_8"), (4, "IMREAD_REDUCED_COLOR_4"), (2, "IMREAD_REDUCED_COLOR_2"))


@dataclass(frozen=True)
class _JpegHeader:
    width: int
    height: int
    orientation: int  # as Pillow reads it: EXIF first, else XMP (attribute or element), else 1


def _plain_jpeg(path: str | os.PathLike) -> _JpegHeader | None:
    """The header of a baseline or progressive RGB/grayscale JPEG OpenCV decodes the way Pillow does;
    None sends the file to the Pillow decoder (which gives every other verdict). Reads the header only."""
    from PIL import Image

    try:
        check_regular(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(openable(path)) as im:
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None  # CMYK/YCCK: Pillow's conversion is the reference
                w, h = im.size
                # Pillow's own merge of EXIF and XMP orientation, so both decoders turn images alike
                orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return None
    return _JpegHeader(w, h, orientation if isinstance(orientation, int) else 1) if 0 < w * h <= MAX_PIXELS else None


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` (rows, columns, channels) turned upright as ``PIL.ImageOps.exif_transpose`` does."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
              7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}.get(orientation)
    return arr if turned is None else np.ascontiguousarray(turned(arr))


def _decode_opencv(path: str | os.PathLike, sizes: Sequence[int], skip_damaged: bool = False) -> Decoded:
    head = _plain_jpeg(path)
    if head is None:
        return _decode_pillow(path, sizes, skip_damaged)
    st = check_regular(path)
    check_file_size(st.st_size, head.width, head.height)  # the Pillow path's verdict, in its words
    data = read_bytes(path, file_size_limit(head.width, head.height))
    if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return _decode_pillow(path, sizes, skip_damaged)  # truncated: Pillow gives the exact verdict
    check_jpeg_scans(data)
    cv2 = _cv2()
    flag = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # BGR; turned below, as Pillow turns it
    for factor, reduced in _REDUCED:
        if min(head.width, head.height) >= factor * max(sizes):
            flag = getattr(cv2, reduced) | cv2.IMREAD_IGNORE_ORIENTATION
            break
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3:
        return _decode_pillow(path, sizes, skip_damaged)
    damaged = jpeg_damage(data, arr[-1, -1])
    arr = _orient(arr, head.orientation)
    return _decoded({s: cv2.cvtColor(cv2.resize(arr, (s, s), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
                     for s in sizes}, damaged, skip_damaged)


@dataclass(frozen=True)
class Decoder:
    """A named way of turning a file into arrays; ``version`` is recorded beside the name."""

    name: str
    decode: DecodeFn
    module: str
    install: str  # what to tell a user who lacks ``module``

    def version(self) -> str:
        import importlib

        return str(getattr(importlib.import_module(self.module), "__version__", "?"))


DECODERS: dict[str, Decoder] = {
    "opencv": Decoder("opencv", _decode_opencv, "cv2", "pip install opencv-python-headless, or pass --decoder pillow"),
    "pillow": Decoder("pillow", _decode_pillow, "PIL", "pip install pillow"),
}


def available(name: str) -> bool:
    import importlib.util

    return name in DECODERS and importlib.util.find_spec(DECODERS[name].module) is not None


def get_decoder(name: str = "auto") -> Decoder:
    """The decoder called ``name``; ``auto``: OpenCV where installed, else Pillow."""
    if name == "auto":
        if not any(available(n) for n in DECODERS):  # catfeat installs both: likely another Python
            raise ValueError(f"no image decoder (OpenCV or Pillow) is installed in {sys.executable}; run catfeat "
                             "with the Python it was installed into, or pip install opencv-python-headless pillow")
        name = "opencv" if available("opencv") else "pillow"
    if name not in DECODERS:
        raise ValueError(f"decoder must be auto or one of {', '.join(DECODERS)}, got {name!r}")
    if not available(name):
        raise ValueError(f"decoder {name!r} needs the {DECODERS[name].module} module, which is not installed "
                         f"in {sys.executable}: {DECODERS[name].install}")
    return DECODERS[name]


__all__ = ["DECODERS", "Decoded", "Decoder", "DecodeError", "get_decoder", "available"]


def decode_image(path: str | os.PathLike, sizes: Sequence[int], decoder: str = "auto",
                 skip_damaged: bool = False) -> Decoded:
    """Read one image file once and return {size: uint8 array (size, size, 3)}.

    EXIF orientation is applied, any mode (grayscale, CMYK, palette, RGBA, 16-bit) becomes RGB,
    and the whole image is resized bilinearly (no crop), as the reference recipe did. ``decoder``:
    see :mod:`catfeat.images.decoders` ("auto", the extraction default, is OpenCV where installed).
    A JPEG decoded with corrupt data (truncated, the rest gray) is returned with the reason in
    ``.damaged``, or refused (:class:`DecodeError`) with ``skip_damaged``.
    """
    return get_decoder(decoder).decode(path, sizes, skip_damaged=skip_damaged)
