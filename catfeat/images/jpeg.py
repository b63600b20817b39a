"""Which files a fast JPEG decoder may take: the header and bytes checks shared by the OpenCV and
nvImageCodec decoders (:mod:`catfeat.images.decoders`, :mod:`catfeat.images.nvimgcodec_decoder`).

A plain JPEG is a complete baseline or progressive RGB or grayscale JPEG within the size limits;
everything else (PNG, CMYK, truncated, too many scans, oversized) goes to the Pillow path, which
gives every other verdict in its own words, so that odd files behave alike under every decoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from catfeat.images.listing import MAX_PIXELS, check_file_size, check_jpeg_scans, check_regular, read_header

# libjpeg-turbo scales by 1/2, 1/4, 1/8 while decoding (the DCT domain), far cheaper than a resize.
REDUCTIONS = (8, 4, 2)
# How the DCT scale is chosen, recorded in the caches of the decoders that use it (attribute
# "dct_scaling", a key field): for each input size on its own (:func:`reduction`). Before, it was
# chosen against the largest size decoded in the same run ("largest-size"), so an image's 224-pixel
# input depended on whether a 299-pixel backbone ran beside it.
DCT_SCALING = "per-size"


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    orientation: int  # as Pillow reads it: EXIF first, else XMP (attribute or element), else 1


def plain_jpeg(path: str | os.PathLike) -> JpegHeader | None:
    """The header of a baseline or progressive RGB/grayscale JPEG that a fast decoder decodes the way
    Pillow does; None sends the file to the Pillow decoder (which gives every other verdict). Reads the
    header only."""
    head = read_header(path)  # once per file: the byte budget read it already
    if head is None or head.format != "JPEG" or head.mode not in ("RGB", "L"):
        return None  # CMYK/YCCK: Pillow's conversion is the reference
    if not 0 < head.width * head.height <= MAX_PIXELS:
        return None
    return JpegHeader(head.width, head.height, head.orientation)


def complete_jpeg_bytes(path: str | os.PathLike, head: JpegHeader, read) -> bytes | None:
    """The bytes of a plain JPEG (``read(path, limit)``: :func:`catfeat.images.decoders.read_bytes`),
    or None when the file is truncated (the Pillow path gives the exact verdict). A file larger than
    its pixels can need, or with too many scans, is a :class:`~catfeat.images.listing.DecodeError`
    in the Pillow path's words."""
    from catfeat.images.listing import file_size_limit

    st = check_regular(path)
    check_file_size(st.st_size, head.width, head.height)
    data = read(path, file_size_limit(head.width, head.height))
    if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    check_jpeg_scans(data)
    return data


def reduction(head: JpegHeader, size: int) -> int:
    """The DCT-domain scale a photo is decoded at for the input size ``size``: 8, 4 or 2 when the photo
    is that many times larger, else 1. Chosen for each size on its own (:data:`DCT_SCALING`), never
    from the other sizes decoded with it, so that an image's pixels at a size are the same whichever
    backbones run beside it (extraction, a growth, predict)."""
    for factor in REDUCTIONS:
        if min(head.width, head.height) >= factor * size:
            return factor
    return 1


def scale_groups(head: JpegHeader, sizes: Sequence[int]) -> dict[int, list[int]]:
    """``{DCT scale: [sizes decoded at it]}`` (:func:`reduction`), the scale of the largest size first:
    one decode per distinct scale, usually a single one."""
    groups: dict[int, list[int]] = {}
    for s in sorted(set(int(s) for s in sizes), reverse=True):
        groups.setdefault(reduction(head, s), []).append(s)
    return groups


# Orientation -> (flip rows, flip columns, then transpose) of the stored image, as
# ``PIL.ImageOps.exif_transpose`` turns it upright.
ORIENTATIONS = {1: (False, False, False), 2: (False, True, False), 3: (True, True, False), 4: (True, False, False),
                5: (False, False, True), 6: (True, False, True), 7: (True, True, True), 8: (False, True, True)}


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` (rows, columns, channels) turned upright as ``PIL.ImageOps.exif_transpose`` does."""
    fy, fx, tr = ORIENTATIONS.get(orientation, ORIENTATIONS[1])
    if not (fy or fx or tr):
        return arr
    out = arr[::-1 if fy else 1, ::-1 if fx else 1]
    return np.ascontiguousarray(out.transpose(1, 0, 2) if tr else out)
