"""Image decoders: file -> uint8 RGB arrays at every input size, from one decode.

One table maps a decoder name to how it decodes; the name is recorded in each cache (attribute
``decoder``), so that features made by different decoders are never mixed:

* ``opencv``: JPEGs are decoded by OpenCV (libjpeg-turbo), shrunk in the DCT domain by 2, 4 or 8
  when the photo is that many times larger than the input size (chosen per size: a second decode
  when two sizes need different scales; :func:`catfeat.images.jpeg.reduction`, recorded in the cache
  as ``dct_scaling``), then resized bilinearly (no anti-aliasing filter beyond that). Anything that
  is not a plain, complete RGB or grayscale JPEG (PNG, GIF, CMYK, truncated files, ...) goes to the
  Pillow decoder, so odd files behave the same under both. About 2.5x the Pillow decoder's speed per core on the Kaggle photos
  (``benchmarks/bench_feeder.py``).
* ``pillow``: Pillow decode, EXIF rotation, whole image resized with Pillow's anti-aliased
  bilinear filter (the reference recipe's pixels).
* ``nvimgcodec``: batches of plain JPEGs decoded by NVIDIA nvImageCodec on the GPU (its CPU backend
  where there is none) and resized on the device in one compiled call per canvas shape
  (:mod:`catfeat.images.nvimgcodec_decoder`); the OpenCV decoder's pixels within one gray level
  (large photos: a box average where OpenCV decodes in the DCT domain). Every file it does not take
  (not a plain JPEG, truncated, larger than 4,096 pixels a side) or cannot decode goes to the OpenCV
  decoder's path, so the skip and damage reasons are the same. Whole batches go through
  :func:`catfeat.images.reader.iter_batches_nvimgcodec`; ``decode`` here is one file at a time.

``auto`` picks ``opencv`` where OpenCV is installed, else ``pillow``; never ``nvimgcodec``, which is
asked for by name: on an H200 with 16 cores it fed 858 img/s (decode, resize to four sizes, on the
device) against 713 img/s for OpenCV on threads and ~4,700-5,200 img/s for OpenCV on the process
reader a real run uses (README, "GPU decoding").
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from catfeat.images.jpeg import DCT_SCALING, complete_jpeg_bytes, orient, plain_jpeg, scale_groups
from catfeat.images.listing import DecodeError, check_regular, jpeg_damage, read_rgb_checked, resize_all
from catfeat.images.sources import Blob

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


def _decode_opencv(path: str | os.PathLike, sizes: Sequence[int], skip_damaged: bool = False) -> Decoded:
    head = plain_jpeg(path)
    data = None if head is None else complete_jpeg_bytes(path, head, read_bytes)
    if data is None:
        return _decode_pillow(path, sizes, skip_damaged)  # not plain, or truncated: Pillow's exact verdict
    cv2 = _cv2()
    out, damaged = {}, None
    for k, (factor, group) in enumerate(scale_groups(head, sizes).items()):
        flag = (getattr(cv2, f"IMREAD_REDUCED_COLOR_{factor}") if factor > 1 else cv2.IMREAD_COLOR) \
            | cv2.IMREAD_IGNORE_ORIENTATION  # BGR; turned below, as Pillow turns it
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if arr is None or arr.ndim != 3 or arr.shape[2] != 3:
            return _decode_pillow(path, sizes, skip_damaged)
        if k == 0:  # the decode of the largest size
            damaged = jpeg_damage(data, arr[-1, -1])
        arr = orient(arr, head.orientation)
        out.update({s: cv2.cvtColor(cv2.resize(arr, (s, s), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
                    for s in group})
    return _decoded({s: out[s] for s in sizes}, damaged, skip_damaged)


def _decode_nvimgcodec(path: str | os.PathLike, sizes: Sequence[int], skip_damaged: bool = False) -> Decoded:
    """One file through nvImageCodec (host arrays); everything it does not take: :func:`_decode_opencv`."""
    from catfeat.images.nvimgcodec_decoder import canvas_for, decode_jpegs

    head = plain_jpeg(path)
    if head is not None and canvas_for(head) is not None:
        data = complete_jpeg_bytes(path, head, read_bytes)  # a refusal here is the OpenCV path's, same words
        if data is not None:
            images, kept = decode_jpegs([data], [head], sizes, 1, on_device=False)
            if kept:
                return _decoded({s: np.asarray(images[s][0]) for s in sizes}, None, skip_damaged)
    return _decode_opencv(path, sizes, skip_damaged)


def _nvimgcodec_version() -> str:
    from catfeat.images.nvimgcodec_decoder import version

    return version()


@dataclass(frozen=True)
class Decoder:
    """A named way of turning a file into arrays; ``version`` is recorded beside the name."""

    name: str
    decode: DecodeFn
    module: str
    install: str  # what to tell a user who lacks ``module``
    batched: bool = False  # decodes whole batches (:func:`catfeat.images.reader.iter_batches_nvimgcodec`)
    version_of: Callable[[], str] | None = None  # how to read the version, where importing ``module`` is not it
    dct_scaling: str | None = None  # how it picks a DCT scale (jpeg.DCT_SCALING), None: it decodes at full size

    def version(self) -> str:
        import importlib

        if self.version_of is not None:
            return self.version_of()
        return str(getattr(importlib.import_module(self.module), "__version__", "?"))


DECODERS: dict[str, Decoder] = {
    "opencv": Decoder("opencv", _decode_opencv, "cv2", "pip install opencv-python-headless, or pass --decoder pillow",
                      dct_scaling=DCT_SCALING),
    "pillow": Decoder("pillow", _decode_pillow, "PIL", "pip install pillow"),
    "nvimgcodec": Decoder("nvimgcodec", _decode_nvimgcodec, "nvidia.nvimgcodec", 'pip install "catfeat[gpu]"',
                          batched=True, version_of=_nvimgcodec_version, dct_scaling=DCT_SCALING),
}


def available(name: str) -> bool:
    import importlib.util

    try:
        return name in DECODERS and importlib.util.find_spec(DECODERS[name].module) is not None
    except ModuleNotFoundError:  # a dotted module whose package is missing
        return False


def get_decoder(name: str = "auto") -> Decoder:
    """The decoder called ``name``; ``auto``: OpenCV where installed, else Pillow."""
    if name == "auto":
        if not any(available(n) for n in ("opencv", "pillow")):  # catfeat installs both: likely another Python
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
