"""Finding images, labelling them, and decoding each one once into uint8 arrays of every size needed.

Three layouts are understood (labels of dogs vs. cats: cat=0, dog=1, i.e. sorted class names):

* Kaggle: ``DIR/train/cat.123.jpg`` (labelled by the name's prefix) or ``DIR/train/<class>/*.jpg``
  (labelled by folder), and ``DIR/test/123.jpg`` (unlabelled);
* flat: ``DIR/cat.123.jpg``, ``DIR/dog.7.jpg``;
* class folders: ``DIR/cat/*.jpg``, ``DIR/dog/*.jpg`` (sorted folder names -> 0..K-1).

The same layouts are read from a folder URL (``s3://bucket/prefix/``, ``gs://...``, ``file://...``), and a
CSV/Parquet manifest lists images with their labels instead (:mod:`catfeat.images.manifest`); what is
at a URL is read through :mod:`catfeat.images.sources`.

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
from typing import Callable, Sequence

import numpy as np

from catfeat.images.manifest import MANIFEST_SUFFIXES, is_manifest, locate, read_manifest
from catfeat.images.sources import Blob, is_url, join_url, list_folder, listed_url, openable, stamps_of

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
    """The images of one data folder, folder URL or manifest, in the fixed order features are written in.

    ``names`` are paths relative to ``root`` with '/' separators (for a manifest: its ``image``
    values as written); ``split[i]`` is "train" (labelled) or "test" (unlabelled, ``labels[i] == -1``);
    ``classes[k]`` is the name of label k. ``root``: the local folder (a Path), or the folder URL or
    manifest (path or URL) given. ``locations``: what to read for each image where that is not
    ``root / name`` (manifests); ``listed``: the change stamp of each image from the store's listing
    (None where the local file is asked, see :meth:`stamps`).
    """

    root: Path | str
    names: list[str]
    labels: np.ndarray
    split: list[str]
    classes: list[str]
    layout: str
    locations: list[str] | None = None
    listed: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def paths(self) -> list:
        """What to read for each image: a local Path, or a URL (str) read by :func:`catfeat.images.sources.fetch`;
        a URL with its size from the listing is a :class:`~catfeat.images.sources.ListedURL` (one GET to read)."""
        listed = self.listed or [None] * len(self.names)
        if self.locations is not None:
            return [listed_url(loc, known) if is_url(loc) else Path(loc) for loc, known in zip(self.locations, listed)]
        if isinstance(self.root, str):
            return [listed_url(join_url(self.root, n), known) for n, known in zip(self.names, listed)]
        return [self.root / n for n in self.names]

    def data_root(self) -> str:
        """Where the images came from, as recorded in a cache: the absolute folder, or the URL or manifest."""
        return self.root if isinstance(self.root, str) else str(self.root.resolve())

    def subset(self, positions: Sequence[int]) -> "ImageSet":
        """The images at ``positions`` (in that order) with the same root, classes and layout."""
        idx = [int(i) for i in positions]
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return replace(self, names=[self.names[i] for i in idx], split=[self.split[i] for i in idx],
                       labels=np.asarray(self.labels)[np.asarray(idx, dtype=np.int64)],
                       locations=pick(self.locations), listed=pick(self.listed))

    def stamps(self) -> list[str]:
        """One stamp per image that changes when its file changes: ``"size:mtime_ns"`` of a local file,
        ``"size:ETag"`` (or ``"size:mtime"``) of an object from the store's listing, or ``"missing"``."""
        if self.listed is None and not isinstance(self.root, str):  # a local folder
            root, names = os.fspath(self.root), self.names
            files = [os.path.join(root, name) for name in names]  # strings, not Paths: one call per image
        else:
            files = [os.fspath(p) for p in self.paths()]
        listed = self.listed or [None] * len(files)
        out = []
        for file, known in zip(files, listed):
            if known is not None:
                out.append(known)
                continue
            try:
                st = os.stat(file)
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


def image_location(data_root: str | os.PathLike, name: str):
    """What to read for the image ``name`` of a cache whose ``data_root`` is recorded: a local Path,
    or a URL for :func:`catfeat.images.sources.fetch` (folder URL, or manifest entry at a URL)."""
    if is_manifest(data_root):
        where = locate(name, os.fspath(data_root))
        return where if is_url(where) else Path(where)
    if is_url(data_root):
        return join_url(data_root, name)
    return Path(data_root) / name


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith(".")


class _LocalTree:
    """A local data folder, asked folder by folder. Everything named like an image is a file here,
    whatever it is (folder, FIFO, socket, device, broken link): what is not a regular file is reported
    as skipped by read_rgb, never silently dropped."""

    def __init__(self, root: Path):
        self.root = root

    def where(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)

    def is_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def files(self, rel: str) -> list[str]:
        return sorted((p.name for p in (self.root / rel).iterdir() if _is_image_name(p.name)), key=natural_key)

    def subdirs(self, rel: str) -> list[str]:
        """Visible subfolders of ``rel`` (not named like images) that hold at least one image."""
        folder = self.root / rel
        # names first: a folder of many images then costs no stat per image
        subdirs = sorted((d for d in folder.iterdir() if not d.name.startswith(".") and not _is_image_name(d.name)
                          and d.is_dir()), key=lambda d: natural_key(d.name))
        return [d.name for d in subdirs if any(_is_image_name(p.name) for p in d.iterdir())]


class _ListedTree:
    """The same questions answered from one listing of a folder URL (names relative to it)."""

    def __init__(self, url: str, names):
        self.url = url.rstrip("/")
        self.children: dict[str, tuple[set, set]] = {}  # folder -> (file names, subfolder names)
        for name in names:
            parts = name.split("/")
            for depth in range(len(parts)):
                folder = "/".join(parts[:depth])
                files, dirs = self.children.setdefault(folder, (set(), set()))
                (files if depth == len(parts) - 1 else dirs).add(parts[depth])

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url + "/"

    def is_dir(self, rel: str) -> bool:
        return rel in self.children

    def files(self, rel: str) -> list[str]:
        return sorted((n for n in self.children.get(rel, ((), ()))[0] if _is_image_name(n)), key=natural_key)

    def subdirs(self, rel: str) -> list[str]:
        subs = self.children.get(rel, ((), ()))[1]
        return sorted((d for d in subs if not d.startswith(".") and not _is_image_name(d)
                       and self.files(f"{rel}/{d}" if rel else d)), key=natural_key)


def _refuse_mixed(tree, rel: str, files: list[str], subdirs: list[str]) -> None:
    """A folder holding both loose images and subfolders of images has no single meaning: say so."""
    if files and subdirs:
        where = rel + "/" if rel else ""
        raise ImageSetError(
            f"{tree.where(rel)!r} mixes {len(files)} loose image(s) (e.g. {where + files[0]!r}) with "
            f"{len(subdirs)} subfolder(s) of images (e.g. {where + subdirs[0] + '/'!r}); use one layout: "
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
    """Find the images of ``data_dir`` and label them; ``limit`` caps each split (class-balanced).

    ``data_dir``: a local folder, a folder URL (``s3://bucket/prefix/``, ``gs://...``, ``file://...``;
    see :mod:`catfeat.images.sources`) in the same layouts, or a CSV/Parquet manifest, local or at a URL
    (see :mod:`catfeat.images.manifest`). A store that cannot be listed is one
    :class:`~catfeat.images.sources.SourceError` here, before any work.
    """
    if limit is not None and limit < 1:
        raise ImageSetError(f"--limit must be positive, got {limit}")
    if is_manifest(data_dir):
        return _from_manifest(read_manifest(data_dir), limit)
    if is_url(data_dir):
        listed = list_folder(data_dir)
        tree, root = _ListedTree(data_dir, listed), data_dir
    else:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise ImageSetError(f"data folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise ImageSetError(f"{str(root)!r} is not a folder; pass the folder that holds the images, or a "
                                f"manifest ({', '.join(MANIFEST_SUFFIXES)})")
        tree = _LocalTree(root)
    layout, train, test = _layout(tree)
    if not train and not test:
        raise ImageSetError(
            f"no images found in {tree.where('')!r}; expected DIR/train/cat.1.jpg + DIR/test/1.jpg, "
            f"DIR/cat.1.jpg, or DIR/<class>/*.jpg (suffixes: {', '.join(IMAGE_SUFFIXES)}), or a manifest "
            f"({', '.join(MANIFEST_SUFFIXES)})")
    train = _stratified_limit(train, limit)
    test = test[:limit] if limit is not None else test
    classes = sorted({c for _, c in train})
    index = {c: k for k, c in enumerate(classes)}
    names = [n for n, _ in train] + [n for n, _ in test]
    labels = np.array([index[c] for _, c in train] + [-1] * len(test), dtype=np.int64)
    split = ["train"] * len(train) + ["test"] * len(test)
    stamps = [listed[n] for n in names] if isinstance(root, str) else None
    return ImageSet(root, names, labels, split, classes, layout, listed=stamps)


def _layout(tree) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """(layout, train [(name, class)], test [(name, "")]) of a data folder asked through ``tree``."""
    train: list[tuple[str, str]] = []  # (relative name, class)
    test: list[tuple[str, str]] = []
    if tree.is_dir("train") or tree.is_dir("test"):
        layout = "kaggle"
        loose = tree.files("")
        if loose:  # they belong to neither split: refused rather than silently left out
            raise ImageSetError(
                f"{tree.where('')!r} holds {len(loose)} loose image(s) (e.g. {loose[0]!r}) beside train/ and "
                "test/, which belong to neither split; move them into train/ (labelled) or test/ (unlabelled), "
                "or hide them ('.name')")
        if tree.is_dir("train"):
            subdirs, files = tree.subdirs("train"), tree.files("train")
            _refuse_mixed(tree, "train", files, subdirs)
            if subdirs:
                layout = "kaggle-folders"
                for d in subdirs:
                    train += [(f"train/{d}/{n}", d) for n in tree.files(f"train/{d}")]
            else:
                train = _labelled_from_names(tree.where("train"), files, "train/")
        if tree.is_dir("test"):
            files, subdirs = tree.files("test"), tree.subdirs("test")
            if subdirs:
                raise ImageSetError(
                    f"{tree.where('test')!r} holds subfolders of images (e.g. 'test/{subdirs[0]}/'); test images "
                    "are unlabelled: put them directly in test/ (labelled images go in train/<class>/)")
            test = [(f"test/{n}", "") for n in files]
    else:
        subdirs, files = tree.subdirs(""), tree.files("")
        _refuse_mixed(tree, "", files, subdirs)
        if subdirs:
            layout = "folders"
            for d in subdirs:
                train += [(f"{d}/{n}", d) for n in tree.files(d)]
        else:
            layout = "flat"
            train = _labelled_from_names(tree.where(""), files, "")
    return layout, train, test


def _from_manifest(manifest, limit: int | None) -> ImageSet:
    """The :class:`ImageSet` of a manifest's rows (``limit``: per split, class-balanced); the change
    stamps of its URLs come from listing each folder that holds them once."""
    train = [(i, label) for i, label in enumerate(manifest.labels) if manifest.splits[i] == "train"]
    test = [(i, "") for i, s in enumerate(manifest.splits) if s == "test"]
    train = _stratified_limit(train, limit)
    test = test[:limit] if limit is not None else test
    classes = sorted({c for _, c in train}, key=natural_key)
    index = {c: k for k, c in enumerate(classes)}
    rows = [i for i, _ in train] + [i for i, _ in test]
    locations = [manifest.locations[i] for i in rows]
    urls = [loc for loc in locations if is_url(loc)]
    known = iter(stamps_of(urls)) if urls else iter(())
    listed = [next(known) if is_url(loc) else None for loc in locations]
    labels = np.array([index[c] for _, c in train] + [-1] * len(test), dtype=np.int64)
    return ImageSet(manifest.where, [manifest.names[i] for i in rows], labels,
                    ["train"] * len(train) + ["test"] * len(test), classes, "manifest", locations, listed)


def _labelled_from_names(where: str, files: list[str], prefix: str) -> list[tuple[str, str]]:
    """(prefix + name, class) of ``files`` (the image names in the folder ``where``), the class read from each name."""
    items, unlabelled = [], []
    for name in files:
        cls = _label_from_name(name)
        (items if cls else unlabelled).append((prefix + name, cls))
    if unlabelled and items:
        warnings.warn(f"{len(unlabelled)} file(s) in {where!r} have no class prefix "
                      f"(e.g. {unlabelled[0][0]!r}); they are ignored", stacklevel=4)
    if unlabelled and not items:
        raise ImageSetError(
            f"cannot label the images in {where!r}: names like {unlabelled[0][0]!r} carry no class; "
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


def check_regular(path: str | os.PathLike | Blob) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), or :class:`DecodeError` unless it is a regular file.

    Opening a FIFO blocks until a writer appears, and a device may never end: nothing but a regular
    file is ever opened.
    """
    if isinstance(path, Blob):  # read from a store: a regular object by construction
        return os.stat_result((stat.S_IFREG | 0o444, 0, 0, 1, 0, 0, len(path.data), 0, 0, 0))
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

    path = path if isinstance(path, Blob) else Path(path)
    st = check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(openable(path)) as im:
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
    # When set, ``images`` are views of the reader's memory (a shared-memory slot), lent until this
    # is called: once their copy to the device is complete (it may be called more than once).
    release: Callable[[], None] | None = None

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


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says (see :func:`read_header`)."""

    size: int  # bytes of the file
    format: str | None  # Pillow's name: "JPEG", "PNG", ...
    mode: str | None
    width: int
    height: int
    orientation: int  # a JPEG's EXIF/XMP orientation as Pillow merges them, else 1


_LAST_HEADER = threading.local()  # per thread (and process): (file identity, ImageHeader or None)


def read_header(path: str | os.PathLike) -> ImageHeader | None:
    """The header of a regular image file, read by Pillow (the header only); None for anything that
    is not a regular file Pillow can identify (the decoder then gives its own verdict).

    Each file's header is read once per decode: the last one read on this thread is kept, keyed by
    the file's path, inode, size and change time, so the byte budget's estimate
    (:func:`declared_bytes`) and the decoder that follows it share one read.
    """
    from PIL import Image

    try:
        st = check_regular(path) if isinstance(path, Blob) else os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    # a Blob (bytes read from a store) is keyed by itself: the same object is the same bytes
    key = (id(path), path) if isinstance(path, Blob) else (os.fspath(path), st.st_dev, st.st_ino, st.st_size,
                                                            st.st_mtime_ns)
    last = getattr(_LAST_HEADER, "entry", None)
    if last is not None and last[0] == key:
        return last[1]
    head = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(openable(path)) as im:
                orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
                head = ImageHeader(st.st_size, im.format, im.mode, im.width, im.height,
                                   orientation if isinstance(orientation, int) else 1)
    except Exception:  # the decode that follows says what is wrong with the file
        head = None
    _LAST_HEADER.entry = (key, head)
    return head


def declared_bytes(path: str | os.PathLike) -> int:
    """Decoded size of an image estimated from its header (width x height x 4 bytes), 0 if unknown.

    Reads the header only (:func:`read_header`, which the decoder then reuses), and only of a
    regular file, so it costs a small fraction of a decode.
    """
    head = read_header(path)
    return 4 * min(head.width * head.height, MAX_PIXELS) if head is not None else 0
