"""Finding images, labelling them, and decoding each one once into uint8 arrays of every size needed.

Three layouts are understood (labels of dogs vs. cats: cat=0, dog=1, i.e. sorted class names):

* Kaggle: ``DIR/train/cat.123.jpg`` (labelled by the name's prefix) or ``DIR/train/<class>/*.jpg``
  (labelled by folder), and ``DIR/test/123.jpg`` (unlabelled);
* flat: ``DIR/cat.123.jpg``, ``DIR/dog.7.jpg``;
* class folders: ``DIR/cat/*.jpg``, ``DIR/dog/*.jpg`` (sorted folder names -> 0..K-1).

A folder that mixes loose images with subfolders of images is refused rather than guessed at.
Anything named like an image is listed, so that what cannot be read (a folder, a FIFO, a broken
link) is reported as skipped instead of silently left out; only regular files are ever opened.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow's own bomb limit warns at 89 Mpx; a photo data set never needs more than this.
MAX_PIXELS = 64_000_000


class ImageSetError(ValueError):
    """The data folder is missing, empty or in no layout catfeat understands."""


def natural_key(text: str) -> tuple:
    """Sort key that orders 'cat.2.jpg' before 'cat.10.jpg'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text))


@dataclass
class ImageSet:
    """The images of one data folder, in the fixed order features are written in.

    ``names`` are paths relative to ``root`` with '/' separators; ``split[i]`` is "train" (labelled)
    or "test" (unlabelled, ``labels[i] == -1``); ``classes[k]`` is the name of label k.
    """

    root: Path
    names: list[str]
    labels: np.ndarray
    split: list[str]
    classes: list[str]
    layout: str

    def __len__(self) -> int:
        return len(self.names)

    def paths(self) -> list[Path]:
        return [self.root / n for n in self.names]

    def subset(self, positions: Sequence[int]) -> "ImageSet":
        """The images at ``positions`` (in that order) with the same root, classes and layout."""
        idx = [int(i) for i in positions]
        return replace(self, names=[self.names[i] for i in idx], split=[self.split[i] for i in idx],
                                   labels=np.asarray(self.labels)[np.asarray(idx, dtype=np.int64)])

    def stamps(self) -> list[str]:
        """One stamp per image that changes when its file changes: ``"size:mtime_ns"``, or ``"missing"``."""
        root, out = os.fspath(self.root), []
        for name in self.names:
            try:
                st = os.stat(os.path.join(root, name))  # strings, not Paths: one call per image
                out.append(f"{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                out.append("missing")
        return out

    def fingerprint(self, stamps: Sequence[str] | None = None) -> str:
        """Hash of names, labels and :meth:`stamps`: changes when the image list changes."""
        h = hashlib.sha256()
        stamps = self.stamps() if stamps is None else stamps
        for name, label, meta in zip(self.names, self.labels.tolist(), stamps):
            h.update(f"{name}\0{int(label)}\0{meta}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def count(self, split: str) -> int:
        return sum(1 for s in self.split if s == split)


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _files(folder: Path) -> list[Path]:
    # Everything named like an image, whatever it is (folder, FIFO, socket, device, broken link):
    # what is not a regular file is reported as skipped by read_rgb, never silently dropped.
    return sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: natural_key(p.name))


def _image_subdirs(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder`` (not named like images) that hold at least one image."""
    # names first: a folder of many images then costs no stat per image
    subdirs = sorted((d for d in folder.iterdir() if not d.name.startswith(".") and not _is_image_file(d)
                      and d.is_dir()), key=lambda d: natural_key(d.name))
    return [d for d in subdirs if any(_is_image_file(p) for p in d.iterdir())]


def _refuse_mixed(folder: Path, files: list[Path], subdirs: list[Path], root: Path) -> None:
    """A folder holding both loose images and subfolders of images has no single meaning: say so."""
    if files and subdirs:
        rel = folder.relative_to(root).as_posix()
        where = "" if rel == "." else rel + "/"
        raise ImageSetError(
            f"{str(folder)!r} mixes {len(files)} loose image(s) (e.g. {where + files[0].name!r}) with "
            f"{len(subdirs)} subfolder(s) of images (e.g. {where + subdirs[0].name + '/'!r}); use one layout: "
            "move the loose images into class folders, or move the subfolders out (or hide them: '.name')")


def shown(name: str) -> str:
    """``name`` for printing: as is, or its repr when it is not valid UTF-8 (undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return repr(name)
    return name


def printable(value: object, limit: int | None = None, quote: bool = False) -> str:
    """``value`` as text that prints on one line: as is, or its repr when it holds control characters
    (a newline breaks a table, an escape sequence drives the terminal) or bytes that are not valid UTF-8.

    ``quote``: always the repr. Text longer than ``limit`` characters is cut there and followed by
    ``... (N bytes)``, the value's whole size in UTF-8.
    """
    raw = value if isinstance(value, str) else str(value)
    text = repr(value) if quote else raw
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not quote and not text.isprintable():
        text = repr(text)
    return f"{text}... ({len(raw.encode('utf-8', 'surrogatepass')):,} bytes)" if cut else text


def _label_from_name(name: str) -> str | None:
    m = re.match(r"^([A-Za-z][A-Za-z_-]*)[._-]\d", name)
    return m.group(1).lower() if m else None


def _stratified_limit(items: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """First ``limit`` items taken round-robin over classes, so --limit keeps both classes."""
    if limit is None or limit >= len(items):
        return items
    by_class: dict[str, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    queues = [by_class[c] for c in sorted(by_class)]
    taken: list = []
    i = 0
    while len(taken) < limit:
        for q in queues:
            if i < len(q) and len(taken) < limit:
                taken.append(q[i])
        i += 1
    keep = set(id(t) for t in taken)
    return [it for it in items if id(it) in keep]


def list_images(data_dir: str | os.PathLike, limit: int | None = None) -> ImageSet:
    """Find the images under ``data_dir`` and label them; ``limit`` caps each split (class-balanced)."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ImageSetError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ImageSetError(f"{str(root)!r} is not a folder; pass the folder that holds the images")
    if limit is not None and limit < 1:
        raise ImageSetError(f"--limit must be positive, got {limit}")

    train: list[tuple[str, str]] = []  # (relative name, class)
    test: list[tuple[str, str]] = []
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() or test_dir.is_dir():
        layout = "kaggle"
        loose = _files(root)
        if loose:  # they belong to neither split: refused rather than silently left out
            raise ImageSetError(
                f"{str(root)!r} holds {len(loose)} loose image(s) (e.g. {loose[0].name!r}) beside train/ and "
                "test/, which belong to neither split; move them into train/ (labelled) or test/ (unlabelled), "
                "or hide them ('.name')")
        if train_dir.is_dir():
            subdirs, files = _image_subdirs(train_dir), _files(train_dir)
            _refuse_mixed(train_dir, files, subdirs, root)
            if subdirs:
                layout = "kaggle-folders"
                for d in subdirs:
                    train += [(f"train/{d.name}/{p.name}", d.name) for p in _files(d)]
            else:
                train = _labelled_from_names(train_dir, files, "train/")
        if test_dir.is_dir():
            files, subdirs = _files(test_dir), _image_subdirs(test_dir)
            if subdirs:
                raise ImageSetError(
                    f"{str(test_dir)!r} holds subfolders of images (e.g. 'test/{subdirs[0].name}/'); test images "
                    "are unlabelled: put them directly in test/ (labelled images go in train/<class>/)")
            test = [(f"test/{p.name}", "") for p in files]
    else:
        subdirs, files = _image_subdirs(root), _files(root)
        _refuse_mixed(root, files, subdirs, root)
        if subdirs:
            layout = "folders"
            for d in subdirs:
                train += [(f"{d.name}/{p.name}", d.name) for p in _files(d)]
        else:
            layout = "flat"
            train = _labelled_from_names(root, files, "")

    if not train and not test:
        raise ImageSetError(
            f"no images found in {str(root)!r}; expected DIR/train/cat.1.jpg + DIR/test/1.jpg, "
            f"DIR/cat.1.jpg, or DIR/<class>/*.jpg (suffixes: {', '.join(IMAGE_SUFFIXES)})")

    train = _stratified_limit(train, limit)
    test = test[:limit] if limit is not None else test
    classes = sorted({c for _, c in train})
    index = {c: k for k, c in enumerate(classes)}
    names = [n for n, _ in train] + [n for n, _ in test]
    labels = np.array([index[c] for _, c in train] + [-1] * len(test), dtype=np.int64)
    split = ["train"] * len(train) + ["test"] * len(test)
    return ImageSet(root, names, labels, split, classes, layout)


def _labelled_from_names(folder: Path, files: list[Path], prefix: str) -> list[tuple[str, str]]:
    """(prefix + name, class) of ``files`` (those of ``folder``), the class read from each name."""
    items, unlabelled = [], []
    for p in files:
        cls = _label_from_name(p.name)
        (items if cls else unlabelled).append((prefix + p.name, cls))
    if unlabelled and items:
        warnings.warn(f"{len(unlabelled)} file(s) in {str(folder)!r} have no class prefix "
                      f"(e.g. {unlabelled[0][0]!r}); they are ignored", stacklevel=3)
    if unlabelled and not items:
        raise ImageSetError(
            f"cannot label the images in {str(folder)!r}: names like {unlabelled[0][0]!r} carry no class; "
            "name them <class>.<id>.jpg or put them in class folders DIR/<class>/")
    # Sort by class then id, so that cat.2 comes before cat.10 and all cats before dogs.
    return sorted(items, key=lambda it: natural_key(it[0]))


class DecodeError(Exception):
    """One image could not be used; the reason is the message."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, from its ``st_mode``: ``"FIFO"``, ``"socket"``, ``"folder"``, ..."""
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return kind
    return "special file"


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), or :class:`DecodeError` unless it is a regular file.

    Opening a FIFO blocks until a writer appears, and a device may never end: nothing but a regular
    file is ever opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError("file not found (broken link or removed during the run)") from None
    except PermissionError:
        raise DecodeError("permission denied; make the file readable") from None
    except OSError as e:
        raise DecodeError(f"cannot stat ({e.__class__.__name__}: {e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError("is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError(f"not a regular file ({file_kind(st.st_mode)}); only image files are read, "
                          "remove it or rename it")
    return st


def _to_8bit(arr: np.ndarray, is_float: bool) -> np.ndarray:
    """One channel of 16/32-bit integers or 32-bit floats as uint8 (Pillow's own conversion clips them).

    Floats in [0, 1] are scaled by 255; values up to 255 are kept; 16-bit ranges are divided by 256
    (as before); anything wider is scaled by its maximum. NaN, infinities and negatives become 0.
    """
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    arr = np.maximum(arr, 0.0)
    top = float(arr.max()) if arr.size else 0.0
    if is_float and top <= 1.0:
        arr = arr * 255.0
    elif top > 65535:
        arr = arr * (255.0 / top)
    elif top > 255:
        arr = arr / 256.0
    return np.clip(np.rint(arr) if is_float else arr, 0, 255).astype(np.uint8)


# A file holds its pixels plus metadata (EXIF, ICC, XMP, a phone's video trailer), never more than
# this: 16 bytes a pixel covers uncompressed 16-bit RGBA and float RGB; anything larger is not read.
FILE_BYTES_PER_PIXEL = 16
FILE_SLACK_BYTES = 64 << 20
# Progressive JPEGs of real cameras and encoders have about 10 scans; each scan is a full pass
# over the image, so thousands of them make one small file cost seconds or minutes to decode.
MAX_JPEG_SCANS = 1000
DAMAGED_JPEG = ("corrupt JPEG data: the image data ends before the image does (a truncated file?) and the "
                "rest decodes as gray")


def file_size_limit(width: int, height: int) -> int:
    """The most bytes an image file of ``width`` x ``height`` pixels may take (pixels + metadata)."""
    return FILE_BYTES_PER_PIXEL * min(width * height, MAX_PIXELS) + FILE_SLACK_BYTES


def check_file_size(size: int, width: int, height: int) -> None:
    """:class:`DecodeError` when a file of ``size`` bytes is larger than its declared pixels can need."""
    limit = file_size_limit(width, height)
    if size > limit:
        raise DecodeError(f"file is {size:,} bytes, more than a {width}x{height} image can need "
                          f"({limit:,}); not read: re-save the image")


# A marker inside entropy-coded data: 0xFF not followed by a stuffed 0x00, a restart marker or fill.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_scans(data: bytes, stop: int = MAX_JPEG_SCANS) -> int:
    """Start-of-scan segments of a JPEG (walking the marker segments, not searching the bytes), up to
    ``stop + 1``; a malformed layout just ends the count (the decoder gives its own verdict)."""
    pos, n, end = 2, 0, len(data)
    while pos + 4 <= end and n <= stop:
        if data[pos] != 0xFF:
            return n
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return n
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            n += 1
            found = _MARKER.search(data, pos)  # skip the entropy-coded data
            pos = found.start() if found else end
    return n


def check_jpeg_scans(data: bytes) -> None:
    """:class:`DecodeError` for a JPEG with more than ``MAX_JPEG_SCANS`` scans (each costs a full pass)."""
    if jpeg_scans(data) > MAX_JPEG_SCANS:
        raise DecodeError(f"JPEG with more than {MAX_JPEG_SCANS:,} scans (a real photo has about 10; decoding "
                          "it would take minutes); not decoded: re-save the image")


# Bytes appended to the scan data by the probe: no 0xFF, so no marker; deterministic.
_PROBE = bytes((i * 97 + 13) % 255 for i in range(4096))


def jpeg_ends_early(data: bytes) -> bool:
    """True when a JPEG's scan data ends before its last block (libjpeg then fills the rest with gray and
    only prints a warning). Decoded twice at 1/8 scale: as is, and with bytes inserted before the end
    marker; a complete image ignores them, an incomplete one decodes them as its missing blocks."""
    import io

    from PIL import Image

    body = data.rstrip(b"\x00\r\n ")
    if not body.endswith(b"\xff\xd9"):
        return False

    def small(d: bytes) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(d)) as im:
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                return np.asarray(im)

    try:
        return not np.array_equal(small(body), small(body[:-2] + _PROBE + b"\xff\xd9"))
    except Exception:  # the probe cannot decode it: no verdict beyond the decoder's own
        return False


def looks_gray_filled(corner) -> bool:
    """Whether the last pixel (in stored orientation) is libjpeg's gray fill: the cheap test run on every
    JPEG before :func:`jpeg_ends_early` confirms."""
    return np.all(np.asarray(corner) == 128)


def jpeg_damage(data: bytes | None, corner) -> str | None:
    """The reason a decoded JPEG holds corrupt data (see :data:`DAMAGED_JPEG`), or None."""
    if data is None or not looks_gray_filled(corner):
        return None
    return DAMAGED_JPEG if jpeg_ends_early(data) else None


def read_rgb(path: str | os.PathLike):
    """Decode one image file into an RGB ``PIL.Image`` (EXIF-rotated); :class:`DecodeError` says why not.

    A JPEG decoded with corrupt data is returned as decoded; :func:`read_rgb_checked` says so."""
    return read_rgb_checked(path)[0]


def read_rgb_checked(path: str | os.PathLike) -> tuple:
    """(RGB ``PIL.Image``, reason the JPEG holds corrupt data or None); :class:`DecodeError` says why not."""
    from PIL import Image, ImageOps

    path = Path(path)
    st = check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DecodeError(f"declared size {im.width}x{im.height} exceeds {MAX_PIXELS:,} pixels "
                                      "(decompression bomb?)")
                check_file_size(st.st_size, im.width, im.height)
                data = None
                if im.format == "JPEG":
                    im.fp.seek(0)  # load() seeks to its own offsets
                    data = im.fp.read(file_size_limit(im.width, im.height) + 1)
                    check_jpeg_scans(data)
                im.load()
                damaged = None
                if data is not None and im.mode in ("L", "RGB"):
                    damaged = jpeg_damage(data, im.getpixel((im.width - 1, im.height - 1)))
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    im = Image.fromarray(_to_8bit(np.asarray(im), im.mode == "F"))
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                return im.convert("RGB"), damaged
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file not found (broken link or removed during the run)") from None
    except PermissionError:
        raise DecodeError("permission denied; make the file readable") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("empty file (0 bytes)" if st.st_size == 0 else "not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"cannot decode ({e.__class__.__name__}: {e})") from None


def resize_all(im, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """{size: the whole RGB image resized bilinearly to (size, size, 3) uint8}."""
    from PIL import Image

    return {s: np.asarray(im.resize((s, s), Image.BILINEAR), dtype=np.uint8) for s in sizes}


@dataclass
class Batch:
    """A run of consecutive images: positions ``start..start+len``, arrays per size, failures."""

    start: int
    images: dict[int, np.ndarray]  # size -> (n_ok, size, size, 3) uint8
    ok: np.ndarray  # (n,) bool: which positions decoded
    errors: dict[int, str]  # position -> reason
    decode_seconds: float  # summed over reader threads
    resize_seconds: float  # summed over reader threads
    damaged: dict[int, str] = field(default_factory=dict)  # position -> corrupt data it was decoded with

    def __len__(self) -> int:
        return len(self.ok)


def memory_bytes() -> int:
    """Physical memory of this machine (8 GiB when the system does not say: the conservative guess for
    every budget sized from it)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# Full-size pixels decoding at once, over all reader threads: eight 8k x 8k photos at a time would
# take gigabytes; normal photos (under a megabyte decoded) never wait.
DECODE_BYTES = int(min(1 << 30, memory_bytes() // 8))


class ByteBudget:
    """Bounds the bytes of full-size images being decoded at once (estimated from their headers).

    ``hold(n)`` waits until ``n`` more bytes fit under ``limit``; an image larger than the whole
    budget runs when nothing else holds any, so it is slow but never stuck. ``peak`` is the most
    ever held at once.
    """

    def __init__(self, limit: int = DECODE_BYTES):
        if limit < 1:
            raise ValueError(f"decode byte budget must be positive, got {limit}")
        self.limit, self.used, self.peak = int(limit), 0, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def declared_bytes(path: str | os.PathLike) -> int:
    """Decoded size of an image estimated from its header (width x height x 4 bytes), 0 if unknown.

    Reads the header only, and only of a regular file, so it costs a small fraction of a decode.
    """
    from PIL import Image

    try:
        check_regular(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return 4 * min(im.width * im.height, MAX_PIXELS)
    except Exception:  # the decode that follows says what is wrong with the file
        return 0
