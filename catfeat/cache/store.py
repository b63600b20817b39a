"""The feature cache: one HDF5 file per backbone, written in a stream, resumable, renamed when complete.

Layout of ``gap_<ModelName>.h5`` (the cache contract):

    train (N, D) float32   label (N,) int64   train_names (N,) utf-8
    test  (M, D) float32   test_names (M,) utf-8
    skipped_names, skipped_reasons (utf-8), skipped_index (int64): images that could not be decoded
    damaged_names, damaged_reasons (utf-8), damaged_index (int64): images decoded with corrupt data
        (a truncated JPEG, the rest gray) and kept; absent in caches of earlier versions
    train_stamps (N,) utf-8, test_stamps (M,) utf-8: the change stamp of each row's file when it was
        listed (``ImageSet.stamps``), which lets a rerun on a changed image set keep the rows of
        unchanged files (catfeat.extraction.grow); absent in caches of earlier versions

Attributes: see ``KEY_FIELDS`` (what must match for a cache to be reused) and ``FeatureWriter``.
The skipped list lives in datasets rather than an attribute because HDF5 attributes are capped at
64 KiB, which a large messy folder would exceed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from catfeat.images.listing import memory_bytes

# Messages for the user go through this logger; the CLI prints them (warnings on stderr, the rest on stdout).
LOG = logging.getLogger("catfeat")

FORMAT = "catfeat-gap/1"
# What must be identical for a cache to stand for a request; anything else is informational.
KEY_FIELDS = ("backbone", "weights", "input_size", "preprocessing", "precision", "tta", "decoder",
              "images_fingerprint", "dtype", "on_damaged", "dct_scaling")
# The key field that says *which* images a cache holds; the others say *how* its features are made.
# A cache whose how-fields match a request but whose images differ grows (catfeat.extraction.grow).
IMAGE_FIELDS = ("images_fingerprint",)
HOW_FIELDS = tuple(k for k in KEY_FIELDS if k not in IMAGE_FIELDS)
# What the last growth of a cache did (attribute "growth", JSON): images per kind, in this order.
GROWTH_COUNTS = ("kept", "added", "changed", "removed", "retried")
# Storage dtypes of the train/test features (attribute "dtype"; absent in older caches = float32).
# float16 halves disk and memory; features are always returned as float32.
DTYPES = ("float32", "float16")
# Key fields that caches of earlier versions lack, and the value those caches were built with.
# dct_scaling (how a decoder that shrinks JPEGs in the DCT domain picks the scale,
# catfeat.images.jpeg.DCT_SCALING) is only recorded, and compared, for such decoders.
LEGACY_DEFAULTS = {"decoder": "pillow", "dtype": "float32", "on_damaged": "keep", "dct_scaling": "largest-size"}
# The key fields that decide an image's feature values (the identity less the image list): a saved
# head records them per backbone, so that `catfeat predict` computes the features the same way.
RECIPE_FIELDS = ("weights", "input_size", "preprocessing", "precision", "tta", "decoder", "dtype")
# Row lists kept beside the features: (names, reasons, positions) datasets per kind.
_LISTS = {"skipped": ("skipped_names", "skipped_reasons", "skipped_index"),
          "damaged": ("damaged_names", "damaged_reasons", "damaged_index")}
# What must agree for caches to be fused row by row (empty or missing: unknown, not compared).
SOURCE_FIELDS = ("images_fingerprint", "data_root", "classes", "layout")
# Rows copied per step when caches are merged (Ray parts, a growth's kept and computed rows), so
# memory stays flat for any size.
MERGE_ROWS = 4096
# Free space kept in hand beyond a write's own rows, for HDF5 metadata (see FeatureWriter._check_space).
SPACE_MARGIN = 256 << 10
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# What an error message shows of a value read from a cache (a hostile file can hold a 10 MB attribute).
SHOWN_CHARS = 200
_STR = None  # set lazily: h5py.string_dtype()

# Refuse to read a dataset that would not fit in memory (hostile or corrupt files).
MAX_READ_BYTES = int(memory_bytes() * 0.8)


class CacheError(ValueError):
    """A cache file is missing, incomplete, foreign or corrupt; the message names the file."""


class StaleCacheError(CacheError):
    """A complete cache exists but was built differently from what is asked."""

    def __init__(self, path: Path, differences: dict):
        self.path, self.differences = path, differences
        diff = "; ".join(f"{k}: cache has {v[0]!r}, asked {v[1]!r}" for k, v in differences.items())
        super().__init__(f"{path} was built differently ({diff}). Use --force (force=True) to rebuild it, "
                         "or --features another folder to keep both")


class StalePartialError(CacheError):
    """Unfinished work holds rows of a request that differs from what is asked: an unfinished cache
    (``.partial``), or with ``parts`` the parts of an unfinished Ray extraction in the folder ``path``."""

    def __init__(self, path: Path, differences: dict, rows: int | None, n_images: int | None,
                 parts: int | None = None):
        self.path, self.differences = path, differences
        who = "partial has" if parts is None else "parts have"
        diff = "; ".join(f"{k}: {who} {v[0]!r}, asked {v[1]!r}" for k, v in differences.items())
        resume = "Rerun with the options it was started with to resume it, or use --force (force=True) to start"
        if parts is None:
            super().__init__(f"{path} is an unfinished cache ({rows} of {n_images} images done) built differently "
                             f"({diff}). {resume} it over with these (its rows are discarded)")
        else:
            super().__init__(f"{path} holds {parts} parts ({rows} images done) of an unfinished Ray extraction built "
                             f"differently ({diff or 'another request'}). {resume} over with these (those parts are "
                             "deleted when this run completes)")


# -- memory ------------------------------------------------------------------------------------------
class MemoryShortError(CacheError):
    """Loading would need more memory than is available; the message names the streaming way."""


def available_memory() -> int:
    """Memory available to a new allocation now (psutil's ``available``, else free pages)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return memory_bytes()


def format_gib(b: float) -> str:
    """Bytes as GiB with one decimal: ``"1.5 GiB"``."""
    return f"{b / (1 << 30):.1f} GiB"


def check_memory(need: int, what: str, instead: str) -> None:
    """Raise :class:`MemoryShortError` (one line) when ``need`` bytes exceed 90% of the available memory."""
    avail = available_memory()
    if need > 0.9 * avail:
        raise MemoryShortError(f"{what} needs about {format_gib(need)} of memory, more than the {format_gib(avail)} "
                               f"available; {instead}")


def check_load_memory(caches: dict, split: str) -> None:
    """Refuse ``load_features`` when the arrays it builds would not fit (estimated from the shapes)."""
    full = [int(c.attrs.get(f"n_{split}", 0)) * int(c.attrs.get("feature_dim") or 0) * 4 for c in caches.values()]
    if not full:
        return
    need = sum(full) + max(full)  # the aligned arrays plus one whole dataset read before reindexing
    n = max(int(c.attrs.get(f"n_{split}", 0)) for c in caches.values())
    check_memory(need, f"loading the {split} features of {', '.join(caches)} ({n:,} rows)",
                 "stream them from the caches instead: python -m catfeat.fit --stream, or "
                 "catfeat.cache.rows.CacheRows.open(models, features_dir) in Python")


def import_h5py():
    """The ``h5py`` module, imported on first use (with the UTF-8 string dtype the caches write)."""
    import h5py

    global _STR
    if _STR is None:
        _STR = h5py.string_dtype("utf-8")
    return h5py


def cache_path(out_dir: str | os.PathLike, backbone_name: str) -> Path:
    """``OUT/gap_<backbone>.h5``: where the cache of a backbone (its full registry name) lives."""
    return Path(out_dir) / f"gap_{backbone_name}.h5"


def partial_path(path: Path) -> Path:
    """``<path>.partial``: the unfinished cache that is renamed to ``path`` when complete."""
    return path.with_name(path.name + ".partial")


def partial_attrs(partial: Path) -> dict | None:
    """The attributes of the unfinished cache ``partial``: None when it is not a regular file catfeat
    wrote that HDF5 can open (nothing there can be resumed; :class:`FeatureWriter` starts it over)."""
    h5py = import_h5py()
    try:
        if not stat.S_ISREG(os.lstat(partial).st_mode):
            return None
        with h5py.File(partial, "r") as f:
            a = read_attrs(f)
    except Exception:  # missing, or torn by a kill: HDF5 cannot open it
        return None
    return a if a.get("format") == FORMAT else None


def check_unfinished(partials: Sequence[Path], attrs: dict, force: bool, log: Callable[[str], None], *,
                     expect: Mapping[str, object] | None = None, parts_of: Path | None = None) -> bool:
    """Refuse, unless ``force``, unfinished work built for another request than ``attrs``: its rows
    may be hours of work, worth as much as a complete cache, which is refused the same way.

    ``partials``: one unfinished cache (a ``.partial``, resumed when its attributes and ``expect``
    (e.g. ``{"n_images": n}``) match), or, with ``parts_of`` (their folder), the parts of an
    unfinished Ray extraction kept for another request (refused even when the attributes match).
    Files :func:`partial_attrs` cannot read count for nothing (they are started over). Raises
    :class:`StalePartialError` naming what differs; with ``force``, ``log`` says what goes and
    the result is True (the caller discards it). False: nothing of another request is held.
    """
    held = [a for a in map(partial_attrs, partials) if a is not None]
    if not held:
        return False
    diff = differences(held[0], attrs)
    diff.update({k: (held[0].get(k), v) for k, v in (expect or {}).items() if held[0].get(k) != v})
    if not diff and parts_of is None:
        return False
    done = sum(int(a.get("rows_written") or 0) for a in held)
    if not force:
        raise StalePartialError(parts_of or partials[0], diff, done, held[0].get("n_images"),
                                None if parts_of is None else len(held))
    if parts_of is None:
        log(f"catfeat: starting {partials[0]} over (--force): {', '.join(diff)} changed; its {done} images done "
            "are discarded")
    else:
        log(f"catfeat: {parts_of} holds {len(held)} parts ({done} images done) built differently "
            f"({', '.join(diff) or 'the request'} changed); --force: they are deleted when this run completes")
    return True


def decode_strings(values) -> list[str]:
    """HDF5 string values as ``str`` (bytes decoded as UTF-8, undecodable bytes kept as surrogates)."""
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values]


def _encode(values: Sequence[str]) -> np.ndarray:
    """Strings as UTF-8 bytes for an HDF5 string dataset; a file name that is not valid UTF-8 (read
    by Python with surrogate escapes) keeps its raw bytes, so ``decode_strings`` gives back the same name."""
    return np.array([str(v).encode("utf-8", "surrogateescape") for v in values], dtype=object)


def read_attrs(f) -> dict:
    """The attributes of an open HDF5 file or dataset as plain Python values (bytes decoded)."""
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "surrogateescape")
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _attr_value(v):
    """An attribute as h5py can store it: a string that is not valid UTF-8 (a folder name with
    undecodable bytes) is stored as its raw bytes, which ``read_attrs`` decodes back."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return np.bytes_(v.encode("utf-8", "surrogateescape"))
    return v


def growth_text(counts: Mapping[str, int] | str | None) -> str:
    """What a growth did, as printed: ``"200 kept, 10 added, 2 changed, 1 removed"`` (plus
    ``", 1 retried"``: images the cache had skipped, tried again). ``counts``: a dict or the JSON of a
    cache's ``growth`` attribute; "" when None or unreadable."""
    if isinstance(counts, str):
        try:
            counts = json.loads(counts)
        except (TypeError, ValueError, RecursionError):
            return ""
    if not isinstance(counts, Mapping):
        return ""
    parts = [f"{counts.get(k, 0)} {k}" for k in GROWTH_COUNTS if k != "retried" or counts.get(k)]
    return ", ".join(parts)


def differences(attrs: dict, expected: dict) -> dict:
    """Key fields whose values differ: {field: (cached, expected)}."""
    return {k: (attrs.get(k, LEGACY_DEFAULTS.get(k)), expected[k]) for k in KEY_FIELDS
            if k in expected and str(attrs.get(k, LEGACY_DEFAULTS.get(k))) != str(expected[k])}


class FeatureWriter:
    """Streams one backbone's features into ``<path>.partial`` and renames it to ``path`` when done.

    ``write`` takes consecutive positions of the image set; positions already in a resumed partial
    file are ignored, so several writers can be fed the same batches after a crash. ``next_index``
    (attribute ``rows_written``) marks how far the file is valid.

    ``flush_seconds``: how often the rows recorded by ``write`` reach the file (0: on every write).
    Between flushes they wait in memory; a kill loses them and nothing else (the marker moves only
    with a flush), so a resumed run redoes exactly those images.
    """

    def __init__(self, path: str | os.PathLike, attrs: dict, names: Sequence[str], labels: np.ndarray,
                 split: Sequence[str], dim: int, chunk_rows: int = 256, flush_seconds: float = 0.0,
                 stamps: Sequence[str] | None = None):
        self.path = Path(path)
        # one change stamp per position, stored per row at finish (train_stamps, test_stamps)
        self.stamps = None if stamps is None else list(stamps)
        if self.stamps is not None and len(self.stamps) != len(names):
            raise ValueError(f"{len(self.stamps)} stamps for {len(names)} images")
        self.partial = partial_path(self.path)
        self.attrs, self.dim = dict(attrs), int(dim)
        self.names, self.labels, self.split = list(names), np.asarray(labels), list(split)
        self._encoded = _encode(self.names)  # once, not per batch
        self._is_train = np.array([s == "train" for s in self.split], bool)
        self.chunk_rows = chunk_rows
        self.flush_seconds = float(flush_seconds)
        self._pending: list = []  # rows recorded by write() since the last flush
        self._flushed = time.monotonic()
        self.resumed_from = 0
        self.next_index = 0
        self.broken = False  # HDF5 failed mid-write: the file object must not be touched again
        self._f = None
        self._open()

    # -- opening / resuming -------------------------------------------------------------------
    def _open(self) -> None:
        h5py = import_h5py()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if remove_planted_link(self.partial):
            pass
        elif os.path.lexists(self.partial):
            reason = self._try_resume()
            if reason is None:
                return
            LOG.warning(f"catfeat: starting {self.partial} over ({reason})")
            self.partial.unlink()
        self._check_space(SPACE_MARGIN)
        try:  # create it ourselves, following no link, so h5py opens a regular file we own
            os.close(os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
        except FileExistsError:
            raise CacheError(f"{self.partial} appeared while catfeat was creating it; another program "
                             "writes into this folder: use another --out folder") from None
        f = h5py.File(self.partial, "w")
        n_train = sum(1 for s in self.split if s == "train")
        n_test = len(self.split) - n_train
        dtype = str(self.attrs.get("dtype", "float32"))
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        for ds, n in (("train", n_train), ("test", n_test)):
            f.create_dataset(ds, shape=(0, self.dim), maxshape=(None, self.dim), dtype=dtype,
                             chunks=(max(1, min(self.chunk_rows, n or 1)), self.dim))
        for ds, dt in (("label", "int64"), ("train_names", _STR), ("test_names", _STR),
                       *((d, "int64" if d.endswith("index") else _STR) for kind in _LISTS.values() for d in kind)):
            f.create_dataset(ds, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
        for k, v in self.attrs.items():
            f.attrs[k] = _attr_value(v)
        f.attrs["format"] = FORMAT
        f.attrs["complete"] = False
        f.attrs["rows_written"] = 0
        f.attrs["n_images"] = len(self.names)
        f.flush()
        self._f = f
        self.next_index = 0

    def _try_resume(self) -> str | None:
        """Reopen a partial file if it belongs to this request; return why not otherwise."""
        h5py = import_h5py()
        if not stat.S_ISREG(os.lstat(self.partial).st_mode):
            raise CacheError(f"{self.partial} is not a regular file; remove it and rerun")
        try:
            f = h5py.File(self.partial, "r+")
        except Exception as e:  # a kill can leave a partial file HDF5 cannot open
            return f"unreadable: {e.__class__.__name__}"
        try:
            check_inside(f, self.partial)
        except CacheError as e:
            f.close()
            return str(e).split(": ", 1)[-1]
        try:
            a = read_attrs(f)
            diff = differences(a, self.attrs)
            if a.get("format") != FORMAT or diff or a.get("n_images") != len(self.names):
                f.close()
                return "built for a different request" + (f": {', '.join(diff)} differ" if diff else "")
            n = int(a.get("rows_written", 0))
            skipped_idx = f["skipped_index"][:]
            keep = skipped_idx < n
            done = set(skipped_idx[keep].tolist())
            want_train = [self.names[i] for i in range(n) if self.split[i] == "train" and i not in done]
            want_test = [self.names[i] for i in range(n) if self.split[i] == "test" and i not in done]
            sizes = {"train": len(want_train), "label": len(want_train), "train_names": len(want_train),
                     "test": len(want_test), "test_names": len(want_test)}
            for kind in _LISTS.values():
                kept = int((f[kind[2]][:] < n).sum())  # rows are appended in position order
                sizes.update({d: kept for d in kind})
            for ds, size in sizes.items():
                if f[ds].shape[0] < size:
                    f.close()
                    return f"dataset {ds} shorter than its rows_written marker"
                f[ds].resize(size, axis=0)  # drop rows written after the last marker
            for ds, want in (("train_names", want_train), ("test_names", want_test)):
                if want and decode_strings(f[ds][-1:])[0] != want[-1]:
                    f.close()
                    return f"{ds} do not match the image list"
            f.flush()
        except Exception as e:
            f.close()
            return f"inconsistent: {e.__class__.__name__}: {e}"
        self._f, self.next_index, self.resumed_from = f, n, n
        return None

    # -- writing ------------------------------------------------------------------------------
    def write(self, start: int, ok: np.ndarray, features: np.ndarray | None, errors: dict[int, str],
              damaged: dict[int, str] | None = None) -> None:
        """Record positions ``start .. start+len(ok)``: ``features`` holds one row per ``ok`` position;
        ``errors``: why each other position was skipped; ``damaged``: the ``ok`` positions decoded
        with corrupt data, and what it was. The rows reach the file (and its ``rows_written``
        marker) at the next flush: at once when ``flush_seconds`` is 0, else once that long has
        passed since the last one, and always in :meth:`finish` and :meth:`close`."""
        if self.broken:
            raise RuntimeError(f"{self.partial}: an earlier write failed; rerun the command to resume")
        ok = np.asarray(ok, bool)
        end = start + len(ok)
        if end <= self.next_index:
            return
        if start > self.next_index:
            raise RuntimeError(f"{self.partial}: gap in positions ({self.next_index} written, got {start})")
        feats = np.zeros((0, self.dim), np.float32) if features is None else np.asarray(features, np.float32)
        n_ok = int(ok.sum())
        if feats.shape != (n_ok, self.dim):
            raise ValueError(f"expected features of shape {(n_ok, self.dim)}, got {feats.shape}")
        self._check_values(start, ok, feats)
        first = self.next_index - start  # positions before it are in the file already (a resumed run)
        pos = np.arange(self.next_index, end)
        keep = ok[first:]
        feats = feats[n_ok - int(keep.sum()):]
        good = pos[keep] if len(lost := pos[~keep]) else pos
        lost = lost.tolist()
        train = self._is_train[good]
        split = ((feats, good), (feats[:0], good[:0])) if train.all() else \
            ((feats[:0], good[:0]), (feats, good)) if not train.any() else \
            ((feats[train], good[train]), (feats[~train], good[~train]))  # copies only for a mixed batch
        marked = sorted(p for p in (damaged or {}) if self.next_index <= p < end and ok[p - start])
        self._pending.append((*split,
                              (lost, [errors.get(p, "unknown error") for p in lost]),
                              (marked, [damaged[p] for p in marked])))
        self.next_index = end
        if time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def _check_values(self, start: int, ok: np.ndarray, feats: np.ndarray) -> None:
        """Refuse NaN/Inf rows (named by their files) and, for a float16 cache, values it cannot hold."""
        # one pass: a sum is finite when every value is (a finite sum that overflowed is checked row by row)
        rows = np.flatnonzero(~np.isfinite(feats).all(axis=1)) if not np.isfinite(feats.sum()) else []
        if len(rows):
            bad = [self.names[p] for p in (np.flatnonzero(ok)[rows] + start).tolist()]
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise FloatingPointError(f"{self.attrs.get('backbone')} produced NaN/Inf features for {bad[:5]}{more} "
                                     f"({len(bad)} of the {len(ok)} images of this batch); nothing was written "
                                     "for this batch. Check the weights (--weights) and --precision")
        if str(self.attrs.get("dtype", "float32")) == "float16" and feats.size and np.abs(feats).max() > 65504:
            raise FloatingPointError(f"{self.attrs.get('backbone')} features overflow float16 (|value| > 65504); "
                                     "nothing was written for this batch; extract with --dtype float32")

    def flush(self) -> None:
        """Append every row recorded since the last flush, move ``rows_written`` to ``next_index`` and
        flush the file: one append per dataset, whatever the number of batches. Rows on disk are
        always the prefix the marker names, which is all a resumed run trusts."""
        pending, self._pending = self._pending, []
        self._flushed = time.monotonic()
        if not pending or self.broken:
            return
        rows, lists = {}, {}
        for k, split in enumerate(("train", "test")):
            feats = [b[k][0] for b in pending if len(b[k][1])]
            pos = np.concatenate([b[k][1] for b in pending]) if feats else np.zeros(0, np.int64)
            rows[split] = (np.concatenate(feats) if feats else None, pos)
        for k, kind in ((2, "skipped"), (3, "damaged")):
            lists[kind] = ([p for b in pending for p in b[k][0]], [r for b in pending for r in b[k][1]])
        n_new = {split: len(pos) for split, (_, pos) in rows.items()}
        names = {split: self._encoded[pos] for split, (_, pos) in rows.items()}
        text = sum(len(n) for split in names for n in names[split].tolist())
        text += sum(len(str(self.names[p])) + len(str(r)) for pl, rl in lists.values() for p, r in zip(pl, rl))
        self._check_space(self._chunk_bytes(n_new) + 2 * text + SPACE_MARGIN)
        self._guarded(self._write_rows, rows, names, lists, self.next_index)

    def _write_rows(self, rows: dict, names: dict, lists: dict[str, tuple], end: int) -> None:
        for split, (feats, pos) in rows.items():
            if len(pos):
                self._append(split, feats)
                self._append(f"{split}_names", names[split])
                if split == "train":
                    self._append("label", self.labels[pos].astype(np.int64))
        for kind, (index, reasons) in lists.items():
            if index:
                ds_names, ds_reasons, ds_index = _LISTS[kind]
                self._append(ds_names, self._encoded[np.array(index, np.int64)])
                self._append(ds_reasons, _encode(reasons))
                self._append(ds_index, np.array(index, dtype=np.int64))
        self._f.attrs["rows_written"] = end
        self._f.flush()

    def _chunk_bytes(self, n_new: dict[str, int]) -> int:
        """Bytes of the feature chunks that appending ``n_new`` rows per split allocates."""
        total = 0
        for split, k in n_new.items():
            if k:
                ds = self._f[split]
                rows = ds.chunks[0] if ds.chunks else 1
                n = ds.shape[0]
                total += (-(-(n + k) // rows) - -(-n // rows)) * rows * self.dim * 4
        return total

    def _check_space(self, need: int) -> None:
        """Refuse a write the disk has no room for, before HDF5 starts it.

        HDF5 cannot recover from a failed write (its later calls fail and the process may crash
        when it exits), so running out of space has to be caught here, with the file still whole.
        """
        try:
            st = os.statvfs(self.partial.parent)
        except (OSError, AttributeError):
            return
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: {free:,} bytes free in "
                                        f"{self.partial.parent}, about {need:,} needed")

    def _guarded(self, fn, *args):
        """Run HDF5 calls; after any failure the file object is abandoned, never flushed or closed."""
        hooks = sys.excepthook, sys.unraisablehook
        # h5py reports HDF5 errors met while freeing its objects as ignored exceptions, each with a
        # traceback; the failure is reported once below instead.
        sys.excepthook = lambda t, v, tb: None if _h5_free_error(v) else hooks[0](t, v, tb)
        sys.unraisablehook = lambda u: None if _h5_free_error(u.exc_value) else hooks[1](u)
        try:
            return fn(*args)
        except Exception as e:
            self.broken = True
            _ABANDONED.append(e)  # its traceback holds the datasets in use: freeing them retries the write
            if f"errno = {errno.ENOSPC}," in str(e):
                err = OSError(errno.ENOSPC, "No space left on device; HDF5 stopped mid-write")
            else:
                err = OSError(getattr(e, "errno", None) or errno.EIO, f"HDF5 write failed: {e}".splitlines()[0])
            err.hdf5_unusable = True
            raise err from None
        finally:
            if not self.broken:
                sys.excepthook, sys.unraisablehook = hooks

    @property
    def rows(self) -> int:
        """Feature rows written so far (train + test)."""
        if self._f is None or self.broken:
            return 0
        waiting = sum(len(b[0][1]) + len(b[1][1]) for b in self._pending)
        return int(self._f["train"].shape[0] + self._f["test"].shape[0]) + waiting

    def _append(self, name: str, values: np.ndarray) -> None:
        ds = self._f[name]
        if name in ("train", "test") and ds.dtype != values.dtype:
            values = values.astype(ds.dtype)  # float16 range checked in write(), before any row is written
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Mark complete, close, and atomically move the file into place."""
        if self.next_index != len(self.names):
            raise RuntimeError(f"{self.partial}: finish() after {self.next_index} of {len(self.names)} images")
        self.flush()
        self._check_space(SPACE_MARGIN)
        self._guarded(self._finish_attrs, extra_attrs or {})
        self._f = None
        _fsync(self.partial, _NOFOLLOW)
        try:
            mode = os.lstat(self.partial).st_mode
        except FileNotFoundError:
            raise CacheError(removed_during_run(self.partial)) from None
        if not stat.S_ISREG(mode):  # swapped for a link while we wrote
            raise CacheError(f"{self.partial} is no longer the regular file catfeat wrote; not moving it "
                             f"to {self.path}. Remove it and rerun")
        os.replace(self.partial, self.path)  # replaces a link at self.path itself, never its target
        _fsync(self.path.parent)
        return self.path

    def _marker(self) -> int:
        """``rows_written`` as the file holds it (0 if it cannot be read)."""
        try:
            return int(self._f.attrs["rows_written"])
        except Exception:
            return 0

    def _finish_attrs(self, extra_attrs: dict) -> None:
        f = self._f
        if self.stamps is not None:
            self._write_stamps()
        for k, v in extra_attrs.items():
            f.attrs[k] = v
        f.attrs["skipped_count"] = int(f["skipped_names"].shape[0])
        f.attrs["damaged_count"] = int(f["damaged_names"].shape[0])
        f.attrs["complete"] = True
        f.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.close()

    def _write_stamps(self) -> None:
        """``train_stamps`` and ``test_stamps``: the stamp of each feature row (skipped positions have none)."""
        f = self._f
        kept = np.ones(len(self.names), bool)
        kept[f["skipped_index"][()]] = False
        for split in ("train", "test"):
            values = [s for s, k, sp in zip(self.stamps, kept, self.split) if k and sp == split]
            if len(values) != f[split].shape[0]:
                raise RuntimeError(f"{self.partial}: {len(values)} {split} stamps for {f[split].shape[0]} rows")
            if f"{split}_stamps" in f:
                del f[f"{split}_stamps"]
            f.create_dataset(f"{split}_stamps", data=_encode(values), dtype=_STR, shape=(len(values),))

    def close(self, discard_empty: bool = True) -> None:
        """Close without finishing: the partial file stays for a later resume unless it holds no row."""
        if self._f is None:
            return
        if not self.broken and self._pending:
            try:  # rows recorded before an interruption are kept for the resume
                self.flush()
            except Exception as e:  # the error that stopped the run is the one to report
                LOG.warning(f"catfeat: {self.partial}: the last {self.next_index - self._marker()} rows could not "
                            f"be written ({e}); a resumed run redoes them")
        if not self.broken:
            try:
                self._f.close()
            except Exception:
                self.broken = True
                _ABANDONED.append(self._f)
        else:
            _ABANDONED.append(self._f)  # not closed: HDF5 would retry the failed write
        self._f = None
        if discard_empty and self.next_index == 0:
            try:
                os.unlink(self.partial)
            except OSError:
                pass


def _h5_free_error(e) -> bool:
    return isinstance(e, RuntimeError) and "decrement id ref count" in str(e)


_ABANDONED: list = []  # h5py files whose writes failed: kept referenced so nothing flushes them again


def removed_during_run(partial: Path) -> str:
    """The message for an unfinished cache deleted (with its folder, maybe) while catfeat wrote it."""
    where = partial if partial.parent.is_dir() else f"{partial} (its folder {partial.parent} too)"
    return (f"{where} was removed during the run; nothing was kept (its rows went with it): rerun the same "
            "command to start over")


def remove_planted_link(path: Path) -> bool:
    """Remove ``path`` if it is a symbolic link (the link, never its target); say so."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return False
        target = os.readlink(path)
    except OSError:
        return False
    os.unlink(path)
    LOG.warning(f"catfeat: removed {path}, a symbolic link to {target} that catfeat did not create "
                "(its target was not touched)")
    return True


def _fsync(path: Path, flags: int = 0) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading -------------------------------------------------------------------------------------
_REQUIRED = {"train": 2, "test": 2, "label": 1, "train_names": 1, "test_names": 1}


@dataclass
class FeatureCache:
    """A validated cache file. Arrays are read on demand."""

    path: Path
    attrs: dict

    def _read(self, name: str) -> np.ndarray:
        h5py = import_h5py()
        regular_stat(self.path)
        with h5py.File(self.path, "r") as f:
            check_inside(f, self.path)
            ds = f[name]
            if ds.size * ds.dtype.itemsize > MAX_READ_BYTES:
                raise CacheError(f"{self.path}: dataset {name} declares {ds.shape} ({ds.dtype}), "
                                 f"more than {MAX_READ_BYTES >> 30} GiB (80% of this machine's memory); "
                                 "refusing to load it")
            data = ds[()]
        if name in ("train", "test") and data.dtype != np.float32:
            data = data.astype(np.float32)  # float16 caches load as float32
        return np.asarray(decode_strings(data), dtype=object) if name.endswith(("names", "reasons")) else data

    @property
    def name(self) -> str:
        """The backbone's full registry name (attribute ``backbone``)."""
        return str(self.attrs.get("backbone"))

    @property
    def classes(self) -> list[str]:
        """The class names, label k's at index k (attribute ``classes``, JSON)."""
        return json.loads(self.attrs.get("classes", "[]"))

    def known_classes(self) -> list[str] | None:
        """The class names the cache records, or None when it records none (or not as a JSON list)."""
        try:
            names = json.loads(self.attrs.get("classes") or "[]")
        except (TypeError, ValueError):
            return None
        return [str(c) for c in names] if isinstance(names, list) and names else None

    def features(self, split: str = "train") -> np.ndarray:
        """The (n, D) float32 features of ``split`` ("train" or "test"), read now."""
        return self._read(split)

    def names(self, split: str = "train") -> np.ndarray:
        """The image names of the rows of ``split``, in row order."""
        return self._read(f"{split}_names")

    def labels(self) -> np.ndarray:
        """The class index of each train row (int64; -1: unlabelled), checked against ``classes``.

        A label outside ``0 .. len(classes) - 1`` (or, for a cache without class names, not below
        its number of train rows) is refused before anything is sized by it.
        """
        y = self._read("label")
        classes = self.known_classes()
        limit = len(classes) if classes else len(y)
        bad = y >= limit if y.dtype.kind == "u" else (y < -1) | (y >= limit)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            names = self._read("train_names")
            what = (f"its classes are {classes} (labels 0..{limit - 1})" if classes else
                    f"it records no class names, and a label must be below its {limit} train rows")
            raise CacheError(f"{self.path}: label {y[i]} of {str(names[i])!r} ({int(bad.sum())} bad label(s) in all) "
                             f"is not a class of this cache: {what}; the file is damaged or was edited, "
                             "delete it and extract again")
        return y.astype(np.int64)

    def skipped(self) -> list[dict]:
        """Images that could not be decoded (no row): [{path, reason}]."""
        return [{"path": p, "reason": r} for p, r in zip(self._read("skipped_names"), self._read("skipped_reasons"))]

    def damaged(self) -> list[dict]:
        """Images decoded with corrupt data and kept (a row each): [{path, reason}]; [] in older caches."""
        if not int(self.attrs.get("damaged_count", 0)):
            return []
        return [{"path": p, "reason": r} for p, r in zip(self._read("damaged_names"), self._read("damaged_reasons"))]

    def __len__(self) -> int:
        return int(self.attrs.get("n_train", 0)) + int(self.attrs.get("n_test", 0))


def open_cache(path: str | os.PathLike, require_complete: bool = True) -> FeatureCache:
    """Open and validate a cache file (format, datasets, dtypes, shapes) without loading the arrays."""
    from catfeat.images.listing import printable

    h5py = import_h5py()
    path = Path(path)
    if not path.exists():
        hint = f" (an unfinished {partial_path(path).name} exists: rerun the extraction to resume it)" \
            if partial_path(path).exists() else ""
        raise CacheError(f"no feature cache at {path}{hint}; run `python -m catfeat.extract DATA_DIR` first")
    regular_stat(path)
    if not h5py.is_hdf5(path):
        raise CacheError(f"{path} is not an HDF5 file (truncated or foreign); delete it and extract again")
    try:
        with h5py.File(path, "r") as f:
            a = read_attrs(f)
            if a.get("format") != FORMAT:
                raise CacheError(f"{path} is not a catfeat feature cache (format "
                                 f"{printable(a.get('format'), SHOWN_CHARS, quote=True)}); "
                                 "delete it or point --features elsewhere")
            named = re.fullmatch(r"gap_(.+)\.h5", path.name)
            if named and a.get("backbone") != named.group(1):
                raise CacheError(f"{path} holds features of {printable(a.get('backbone'), SHOWN_CHARS, quote=True)}, "
                                 f"not {named.group(1)} as its name says; rename it back to "
                                 f"gap_{printable(a.get('backbone'), SHOWN_CHARS)}.h5, or extract "
                                 f"{named.group(1)} again (--force)")
            check_inside(f, path)
            if require_complete and a.get("complete") is not True:
                raise CacheError(f"{path} is incomplete ({printable(a.get('rows_written'), SHOWN_CHARS)} of "
                                 f"{printable(a.get('n_images'), SHOWN_CHARS)} images); "
                                 "rerun the extraction to finish it")
            shapes = {}
            for name, ndim in _REQUIRED.items():
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise CacheError(f"{path}: dataset {name!r} is missing; the file is damaged, extract again")
                ds = f[name]
                if ds.ndim != ndim:
                    raise CacheError(f"{path}: dataset {name!r} has {ds.ndim} dimensions, expected {ndim}")
                shapes[name] = ds.shape
                kind = ds.dtype.kind
                if name in ("train", "test") and kind != "f":
                    raise CacheError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected float32")
                if name == "label" and kind not in "iu":
                    raise CacheError(f"{path}: dataset 'label' has dtype {ds.dtype}, expected integers")
                if name.endswith("names") and kind not in "OSU":
                    raise CacheError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected strings")
                if name in ("train", "test") and ds.size and ds.id.get_storage_size() < ds.size * ds.dtype.itemsize:
                    # A real cache stores every row; a dataset that only declares its size is forged
                    # or truncated, and reading it would allocate memory for nothing.
                    raise CacheError(f"{path}: dataset {name!r} declares {ds.shape} but stores only "
                                     f"{ds.id.get_storage_size():,} bytes; the file is damaged or forged")
            dim = a.get("feature_dim")
            n_tr, n_te = shapes["train"][0], shapes["test"][0]
            ok = (shapes["label"][0] == n_tr and shapes["train_names"][0] == n_tr
                  and shapes["test_names"][0] == n_te and shapes["train"][1] == shapes["test"][1]
                  and (dim is None or shapes["train"][1] == dim))
            if not ok:
                raise CacheError(f"{path}: inconsistent shapes {shapes}; the file is damaged, extract again")
            if a.get("complete") is True:
                n_sk = f["skipped_names"].shape[0] if isinstance(f.get("skipped_names"), h5py.Dataset) else 0
                declared = {k: int(a[k]) for k in ("n_images", "rows_written") if k in a}
                bad = {k: v for k, v in declared.items() if v != n_tr + n_te + n_sk}
                if "skipped_count" in a and int(a["skipped_count"]) != n_sk:
                    bad["skipped_count"] = int(a["skipped_count"])
                if bad:
                    said = ", ".join(f"{k}={v}" for k, v in bad.items())
                    raise CacheError(f"{path} is damaged: it declares {said} but holds {n_tr} train + {n_te} test "
                                     f"rows and {n_sk} skipped images; delete it or rerun the extraction with "
                                     "--force to rebuild it")
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{path} cannot be read ({e.__class__.__name__}: {e}); delete it and extract again") from None
    a["n_train"], a["n_test"] = n_tr, n_te
    return FeatureCache(path, a)


def regular_stat(path: Path) -> os.stat_result:
    """``os.stat`` of ``path``, or :class:`CacheError` unless it is a regular file (a FIFO or device
    would block or never end)."""
    from catfeat.images.listing import file_kind, printable

    try:
        st = os.stat(path)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            try:
                target = printable(os.readlink(path), SHOWN_CHARS)
            except OSError:  # removed meanwhile
                target = "?"
            raise CacheError(f"{path} is a broken symbolic link (to {target}); remove it and extract again") from None
        raise CacheError(f"{path} cannot be read ({e.strerror}); delete it and extract again") from None
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path} is not a regular file ({file_kind(st.st_mode)}); delete it and extract again")
    return st


def check_inside(f, path: Path) -> None:
    """Refuse links and datasets whose data live outside the file, before anything is read.

    External storage, virtual datasets and external or soft links would make a reader open other
    files (``/etc/passwd``, a FIFO that never ends) and take them for features.
    """
    from catfeat.images.listing import printable

    h5py = import_h5py()
    for name in f:
        link = f.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            why = f"is an external link to {printable(f'{link.filename}:{link.path}', SHOWN_CHARS)}"
        elif isinstance(link, h5py.SoftLink):
            why = f"is a soft link to {printable(link.path, SHOWN_CHARS)}"
        elif not isinstance(link, h5py.HardLink):
            why = "is a link of an unknown kind"
        else:
            ds = f[name]
            if not isinstance(ds, h5py.Dataset):
                continue
            if ds.external:
                files = ", ".join(str(e[0]) for e in ds.external)
                why = f"is stored in other files ({printable(files, SHOWN_CHARS)})"
            elif ds.is_virtual:
                why = "is a virtual dataset (its data live in other files)"
            else:
                continue
        raise CacheError(f"{path}: {printable(name, SHOWN_CHARS, quote=True)} {why}; a cache must hold its own "
                         "data, refusing to read it. Delete the file and extract again")


def cached_models(features_dir: str | os.PathLike = "features") -> list[str]:
    """Registry names of the backbones with a complete cache in ``features_dir``."""
    from catfeat.models.registry import REGISTRY

    out = []
    for name in REGISTRY:
        path = cache_path(features_dir, name)
        if path.exists():
            try:
                open_cache(path)
            except CacheError:
                continue
            out.append(name)
    return out


def models_or_cached(models: str | Iterable[str] | None, features_dir: str | os.PathLike = "features"
                     ) -> str | Iterable[str]:
    """``models`` as given, or when None the backbones with a complete cache in ``features_dir``.

    Raises :class:`CacheError` when ``models`` is None and there is no complete cache.
    """
    if models is not None:
        return models
    found = cached_models(features_dir)
    if not found:
        raise CacheError(f"no complete feature caches in {features_dir}; run `catfeat extract "
                         f"DATA_DIR --features {features_dir}` first or pass --models")
    return found


def same_labels(caches: Mapping[str, "FeatureCache"], idx: Mapping[str, np.ndarray]) -> np.ndarray:
    """The train labels of the rows ``idx[k]`` of each cache ``caches[k]`` (aligned by :func:`align`),
    checked to be the same in every cache; raises :class:`CacheError` naming two that disagree."""
    first = next(iter(caches))
    labels = caches[first].labels()[idx[first]]
    for k, c in caches.items():
        if not np.array_equal(c.labels()[idx[k]], labels):
            raise CacheError(f"caches of {first} and {k} disagree on labels of the same images")
    return labels


def find_cache(model: str, features_dir: str | os.PathLike = "features") -> FeatureCache:
    """The cache of one backbone (alias or full name) in ``features_dir``."""
    from catfeat.models.registry import get_backbone

    spec = get_backbone(model)
    return open_cache(cache_path(features_dir, spec.name))


def align(named: dict[str, Sequence[str]], join: str = "exact") -> tuple[list[str], dict[str, np.ndarray]]:
    """Row indices that put every cache in the same image order (that of the first).

    ``join="exact"`` requires identical image sets; ``"inner"`` keeps the names all caches share.
    """
    keys = list(named)
    first = list(named[keys[0]])
    sets = {k: set(v) for k, v in named.items()}
    for k in keys:
        if len(sets[k]) != len(named[k]):
            raise CacheError(f"cache of {k} lists the same image twice")
    common = set.intersection(*sets.values())
    if join == "exact":
        for k in keys[1:]:
            if sets[k] != sets[keys[0]]:
                only_a, only_b = sorted(sets[keys[0]] - sets[k]), sorted(sets[k] - sets[keys[0]])
                raise CacheError(
                    f"the caches of {keys[0]} and {k} hold different images "
                    f"({len(only_a)} only in {keys[0]}, e.g. {only_a[:3]}; {len(only_b)} only in {k}, "
                    f"e.g. {only_b[:3]}). Extract both from the same folder, or pass join='inner'")
    elif join != "inner":
        raise ValueError(f"join must be 'exact' or 'inner', got {join!r}")
    order = [n for n in first if n in common]
    idx = {}
    for k in keys:
        pos = {n: i for i, n in enumerate(named[k])}
        idx[k] = np.array([pos[n] for n in order], dtype=np.int64)
    return order, idx


def check_same_source(caches: dict[str, FeatureCache], join: str = "exact") -> None:
    """Refuse to fuse caches extracted from different image folders or class lists.

    Compares ``SOURCE_FIELDS`` where both caches know them (write_cache leaves the fingerprint
    empty: unknown). ``join="inner"`` (a deliberate subset) compares only the classes.
    """
    fields = SOURCE_FIELDS if join == "exact" else ("classes",)
    known = lambda v: v not in (None, "")  # noqa: E731
    (first, a), *rest = caches.items()
    for name, c in rest:
        fp = (a.attrs.get("images_fingerprint"), c.attrs.get("images_fingerprint"))
        for k in fields:
            va, vb = a.attrs.get(k), c.attrs.get(k)
            if not (known(va) and known(vb)) or str(va) == str(vb):
                continue
            if k == "data_root" and all(map(known, fp)) and fp[0] == fp[1]:
                continue  # the same images, moved or copied elsewhere
            raise CacheError(
                f"the caches of {first} and {name} come from different images ({k}: {a.path.name} has {va!r}, "
                f"{c.path.name} has {vb!r}); fusing them would pair unrelated rows. Extract both backbones "
                f"from the same folder in one command (a cache of other images grows to the folder's): "
                f"python -m catfeat.extract DATA_DIR --models {first},{name}")


def feature_recipe(attrs: dict) -> dict:
    """How a cache's features were made: its :data:`RECIPE_FIELDS` (legacy defaults filled in)."""
    out = {k: attrs.get(k, LEGACY_DEFAULTS.get(k)) for k in RECIPE_FIELDS}
    if out["input_size"] is not None:
        out["input_size"] = int(out["input_size"])
    return {k: v if k == "input_size" or v is None else str(v) for k, v in out.items()}


def feature_recipes(models: Iterable[str], features_dir: str | os.PathLike = "features") -> dict[str, dict]:
    """``{backbone: feature_recipe}`` of the caches of ``models`` in ``features_dir``."""
    return {m: feature_recipe(find_cache(m, features_dir).attrs) for m in models}


def load_features(models: str | Iterable[str], features_dir: str | os.PathLike = "features",
                  split: str = "train", join: str = "exact"
                  ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """Features of several backbones aligned by file name.

    Returns ``(X, y, names)``: ``X`` maps each backbone's full name to its (n, D) array, all in the
    order of ``names``; ``y`` are the labels (None for ``split="test"``).
    """
    from catfeat.models.registry import parse_models

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    caches = {s.name: find_cache(s.name, features_dir) for s in parse_models(models)}
    check_same_source(caches, join)
    check_load_memory(caches, split)  # refuse in one line rather than be killed by the OS
    names = {k: c.names(split) for k, c in caches.items()}
    order, idx = align(names, join)
    X = {k: c.features(split)[idx[k]] for k, c in caches.items()}
    y = same_labels(caches, idx) if split == "train" else None
    if not X[next(iter(X))].shape[0]:
        warnings.warn(f"no {split} rows in the caches of {', '.join(caches)}", stacklevel=2)
    return X, y, np.asarray(order, dtype=object)


def write_cache(path: str | os.PathLike, backbone: str, train: np.ndarray, labels: Sequence[int],
                train_names: Sequence[str], test: np.ndarray | None = None, test_names: Sequence[str] = (),
                classes: Sequence[str] = ("cat", "dog"), attrs: dict | None = None) -> Path:
    """Write a complete cache from arrays in memory (merging parts, tests, features from elsewhere)."""
    train = np.asarray(train, np.float32)
    dim = train.shape[1]
    test = np.zeros((0, dim), np.float32) if test is None else np.asarray(test, np.float32)
    names = [*map(str, train_names), *map(str, test_names)]
    split = ["train"] * len(train) + ["test"] * len(test)
    labels_all = np.concatenate([np.asarray(labels, np.int64), -np.ones(len(test), np.int64)])
    base = {"backbone": backbone, "weights": "unknown", "input_size": 0, "preprocessing": "unknown",
            "precision": "float32", "tta": "none", "images_fingerprint": "", "feature_dim": dim,
            "classes": json.dumps(list(classes))}
    base.update(attrs or {})
    partial_path(Path(path)).unlink(missing_ok=True)  # unlink removes a link, never its target
    writer = FeatureWriter(path, base, names, labels_all, split, dim)
    feats = np.concatenate([train, test])
    writer.write(0, np.ones(len(names), bool), feats, {})
    return writer.finish()


def check_finite(X: Mapping[str, np.ndarray], names: Sequence[str] | None = None, what: str = "row") -> None:
    """Raise ``ValueError`` naming the rows of ``X`` (backbone -> (n, D) features) that hold NaN/Inf.

    ``names`` (one per row) names them in the message; else their row indices.
    """
    bad, where = None, []
    for k, a in X.items():
        rows = ~np.isfinite(np.asarray(a)).all(axis=1)
        if rows.any():
            where.append(k)
            bad = rows if bad is None else bad | rows
    if bad is None:
        return
    idx = np.flatnonzero(bad)
    label = (lambda i: str(names[i])) if names is not None else (lambda i: f"#{i}")
    example = ", ".join(label(i) for i in idx[:3]) + (", ..." if len(idx) > 3 else "")
    nan = any(np.isnan(np.asarray(X[k])[idx]).any() for k in where)
    inf = any(np.isinf(np.asarray(X[k])[idx]).any() for k in where)
    kinds = "NaN and Inf" if nan and inf else "NaN" if nan else "Inf"
    head = f"1 {what} (e.g. {example}) of {len(bad)} holds" if len(idx) == 1 else \
        f"{len(idx)} {what}s (e.g. {example}) of {len(bad)} hold"
    raise ValueError(f"{head} {kinds} in the features of {', '.join(where)}: re-extract those images "
                     "(python -m catfeat.extract) or leave them out; a head gives no probability for them")
