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

import io
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from catfeat.images.listing import DecodeError, MAX_PIXELS, check_regular, read_rgb, resize_all

DecodeFn = Callable[[str | os.PathLike, Sequence[int]], dict[int, np.ndarray]]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of one regular file (links resolved); anything else is a :class:`DecodeError`,
    never a blocking open (a FIFO named like an image would hang a plain ``open``)."""
    import stat

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
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise DecodeError(f"cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


def _decode_pillow(path: str | os.PathLike, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    return resize_all(read_rgb(path), sizes)


def _cv2():
    import cv2

    # The reader runs one decode per thread on every core; OpenCV's own threads would oversubscribe.
    cv2.setNumThreads(1)
    return cv2


# libjpeg-turbo scales by 1/2, 1/4, 1/8 while decoding (the DCT domain), far cheaper than a resize.
_REDUCED = ((8, "IMREAD_REDUCED_COLOR_8"), (4, "IMREAD_REDUCED_COLOR_4"), (2, "IMREAD_REDUCED_COLOR_2"))


def _plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a complete baseline RGB/grayscale JPEG OpenCV decodes the
    way Pillow does; None sends the file to the Pillow decoder."""
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or truncated: Pillow gives the exact verdict
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None  # CMYK/YCCK: Pillow's conversion is the reference
            w, h = im.size
    except Exception:
        return None
    return (w, h) if 0 < w * h <= MAX_PIXELS else None


def _decode_opencv(path: str | os.PathLike, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    data = read_bytes(path)
    size = _plain_jpeg(data)
    if size is None:
        return resize_all(read_rgb(path), sizes)
    cv2 = _cv2()
    flag = cv2.IMREAD_COLOR  # BGR, EXIF orientation applied
    for factor, reduced in _REDUCED:
        if min(size) >= factor * max(sizes):
            flag = getattr(cv2, reduced)
            break
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3:
        return resize_all(read_rgb(path), sizes)
    return {s: cv2.cvtColor(cv2.resize(arr, (s, s), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
            for s in sizes}


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


__all__ = ["DECODERS", "Decoder", "DecodeError", "get_decoder", "available"]


def decode_image(path: str | os.PathLike, sizes: Sequence[int], decoder: str = "auto") -> dict[int, np.ndarray]:
    """Read one image file once and return {size: uint8 array (size, size, 3)}.

    EXIF orientation is applied, any mode (grayscale, CMYK, palette, RGBA, 16-bit) becomes RGB,
    and the whole image is resized bilinearly (no crop), as the reference recipe did. ``decoder``:
    see :mod:`catfeat.images.decoders` ("auto", the extraction default, is OpenCV where installed).
    """
    return get_decoder(decoder).decode(path, sizes)
