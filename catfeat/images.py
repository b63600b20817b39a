"""Finding images, labelling them, and decoding each one once into uint8 arrays of every size needed.

Three layouts are understood (labels of dogs vs. cats: cat=0, dog=1, i.e. sorted class names):

* Kaggle: ``DIR/train/cat.123.jpg`` (labelled by the name's prefix) and ``DIR/test/123.jpg`` (unlabelled);
* flat: ``DIR/cat.123.jpg``, ``DIR/dog.7.jpg``;
* class folders: ``DIR/cat/*.jpg``, ``DIR/dog/*.jpg`` (sorted folder names -> 0..K-1).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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

    def fingerprint(self) -> str:
        """Hash of names, labels, sizes and modification times: changes when the image list changes."""
        h = hashlib.sha256()
        for name, label in zip(self.names, self.labels):
            try:
                st = os.stat(self.root / name)
                meta = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                meta = "missing"
            h.update(f"{name}\0{int(label)}\0{meta}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def count(self, split: str) -> int:
        return sum(1 for s in self.split if s == split)


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _files(folder: Path) -> list[Path]:
    # Folders named x.jpg are kept (is_file() is False for them) so they are reported, not hidden.
    return sorted((p for p in folder.iterdir() if _is_image_file(p) and (p.is_file() or p.is_dir() or p.is_symlink())),
                  key=lambda p: natural_key(p.name))


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
        if train_dir.is_dir():
            train = _labelled_from_names(train_dir, "train/", root)
        if test_dir.is_dir():
            test = [(f"test/{p.name}", "") for p in _files(test_dir)]
    else:
        subdirs = sorted((d for d in root.iterdir() if d.is_dir() and not _is_image_file(d)
                          and not d.name.startswith(".")), key=lambda d: natural_key(d.name))
        subdirs = [d for d in subdirs if any(_is_image_file(p) for p in d.iterdir())]
        if subdirs:
            layout = "folders"
            for d in subdirs:
                train += [(f"{d.name}/{p.name}", d.name) for p in _files(d)]
        else:
            layout = "flat"
            train = _labelled_from_names(root, "", root)

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


def _labelled_from_names(folder: Path, prefix: str, root: Path) -> list[tuple[str, str]]:
    items, unlabelled = [], []
    for p in _files(folder):
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


def decode_image(path: str | os.PathLike, sizes: Sequence[int], decoder: str = "auto") -> dict[int, np.ndarray]:
    """Read one image file once and return {size: uint8 array (size, size, 3)}.

    EXIF orientation is applied, any mode (grayscale, CMYK, palette, RGBA, 16-bit) becomes RGB,
    and the whole image is resized bilinearly (no crop), as the reference recipe did. ``decoder``:
    see :mod:`catfeat.decoders` ("auto", the extraction default, is OpenCV where installed).
    """
    from .decoders import get_decoder

    return get_decoder(decoder).decode(path, sizes)


def read_rgb(path: str | os.PathLike):
    """Decode one image file into an RGB ``PIL.Image`` (EXIF-rotated); :class:`DecodeError` says why not."""
    from PIL import Image, ImageOps

    path = Path(path)
    if path.is_dir():
        raise DecodeError("is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DecodeError(f"declared size {im.width}x{im.height} exceeds {MAX_PIXELS:,} pixels "
                                      "(decompression bomb?)")
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64)
                    im = Image.fromarray(np.clip(arr / (256.0 if arr.max() > 255 else 1.0), 0, 255)
                                         .astype(np.uint8))
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                return im.convert("RGB")
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
        size = path.stat().st_size if path.exists() else 0
        raise DecodeError("empty file (0 bytes)" if size == 0 else "not an image Pillow can read") from None
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

    def __len__(self) -> int:
        return len(self.ok)


def _decode_timed(path: Path, sizes: Sequence[int]):
    """(arrays or None, reason or None, decode seconds, resize seconds)."""
    t = time.perf_counter()
    try:
        im = read_rgb(path)
    except DecodeError as e:
        return None, str(e), time.perf_counter() - t, 0.0
    t1 = time.perf_counter()
    out = resize_all(im, sizes)
    return out, None, t1 - t, time.perf_counter() - t1


def _decoder_timed(decode):
    """``decode(path, sizes)`` in the shape of :func:`_decode_timed` (decode and resize timed as one)."""
    from .pipeline import decode_rows

    def run(path: Path, sizes: Sequence[int]):
        arrays, reason, seconds = decode_rows([path], sizes, decode)[0]
        return arrays, reason, seconds, 0.0
    return run


def iter_batches(paths: Sequence[Path], sizes: Sequence[int], batch_size: int, start: int = 0,
                 workers: int | None = None, prefetch: int = 2, decode=None) -> Iterator[Batch]:
    """Decode ``paths[start:]`` on a thread pool of ``workers`` threads (default: every core; the
    decoders release the GIL) in order, ``prefetch`` batches ahead of the consumer, so that decoding
    overlaps the model. ``decode(path, sizes)``: a decoder's function from :mod:`catfeat.decoders`
    (default: the "auto" decoder; Pillow's has decode and resize timed apart)."""
    from .decoders import DECODERS, get_decoder

    sizes = sorted(set(int(s) for s in sizes))
    workers = workers or os.cpu_count() or 1
    decode = decode or get_decoder("auto").decode
    one = _decode_timed if decode is DECODERS["pillow"].decode else _decoder_timed(decode)
    queue = deque((b, min(b + batch_size, len(paths))) for b in range(start, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="catfeat-decode") as pool:
        pending: deque = deque()

        def submit_next() -> None:
            b0, b1 = queue.popleft()
            pending.append((b0, [pool.submit(one, paths[i], sizes) for i in range(b0, b1)]))

        while queue and len(pending) <= prefetch:
            submit_next()
        while pending:
            b0, futures = pending.popleft()
            if queue:
                submit_next()
            results = [f.result() for f in futures]
            ok = np.array([r[0] is not None for r in results], dtype=bool)
            errors = {b0 + i: r[1] for i, r in enumerate(results) if r[0] is None}
            images = {s: (np.stack([r[0][s] for r in results if r[0] is not None])
                          if ok.any() else np.zeros((0, s, s, 3), np.uint8)) for s in sizes}
            yield Batch(b0, images, ok, errors, sum(r[2] for r in results), sum(r[3] for r in results))
