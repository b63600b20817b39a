"""Caches that grow: a rerun on a changed image set keeps the rows of unchanged files.

A cache's identity has two parts (:mod:`catfeat.cache.store`): *how* its features are made
(``HOW_FIELDS``: backbone, weights, preprocessing, precision, TTA, decoder, dtype, on_damaged, DCT
scaling), which must match the request, and *which* images (``IMAGE_FIELDS``), which may change.
Every feature row records the change stamp of its file (``train_stamps``, ``test_stamps``). A rerun lists the images
again and sorts each image of the new listing into:

* kept: the cache holds a feature row of the same name and stamp. Its features (bit for bit) and
  damaged reason are copied; its label and split come from the new listing, so a class that appears
  or goes (label indices shift) re-maps kept rows by class name, as a full rebuild would label them;
* computed: a new name (added), a new stamp (changed), or an image the cache skipped (retried, as a
  rebuild would try it again).

The computed images are extracted by the engine as a cache of their own,
``OUT/.grow/gap_<Model>.h5`` (resumed after a crash like any cache), then merged with the kept rows in
the listing's order into ``gap_<Model>.h5.partial``, renamed over the old cache when complete. Until
that rename the old cache stays valid; a growth interrupted in either step resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import stat
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from catfeat.cache.store import (
    MERGE_ROWS, FeatureWriter, decode_strings, differences, import_h5py, open_cache, partial_attrs, partial_path,
    remove_planted_link)
from catfeat.images.listing import ImageSet

GROW_DIR = ".grow"  # OUT/.grow/gap_<Model>.h5: the computed images of a growth, until merged
_SPLITS = ("train", "test")


@dataclass
class Growth:
    """How the rows of a new image listing come from an old cache.

    ``old_split[i]`` is 0 (train) or 1 (test) where position ``i`` is kept from row ``old_row[i]`` of
    that split of the old cache, -1 where it is computed; ``compute`` lists the computed positions in
    order; ``damaged`` holds the damaged reason of kept rows by name; ``counts`` the images per kind
    (``store.GROWTH_COUNTS``), ``relabelled`` the kept rows whose label or split changed, and
    ``old_classes`` the class names the old cache records (None when it records none).
    """

    old_split: np.ndarray
    old_row: np.ndarray
    compute: list[int]
    counts: dict[str, int]
    damaged: dict[str, str] = field(default_factory=dict)
    relabelled: int = 0
    note: str = ""  # why nothing could be kept, when so
    old_classes: list[str] | None = None


def delta_path(cache: Path) -> Path:
    """``OUT/.grow/gap_<Model>.h5``: where the computed images of a growth of ``cache`` are extracted."""
    return cache.parent / GROW_DIR / cache.name


def _stamps(f, split: str) -> list[str] | None:
    """The stored stamps of ``split``'s rows, or None when absent or not one per row."""
    h5py = import_h5py()
    ds = f.get(f"{split}_stamps")
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] != f[split].shape[0] or \
            ds.dtype.kind not in "OSU":
        return None
    return decode_strings(ds[()])


def plan_growth(cache: Path, images: ImageSet, stamps: Sequence[str]) -> Growth:
    """Sort the images of ``images`` (with their ``stamps``) into kept and computed against the
    complete cache at ``cache`` (already validated by ``open_cache``)."""
    h5py = import_h5py()
    known = open_cache(cache).known_classes()
    old_classes = known or []
    with h5py.File(cache, "r") as f:
        rows: dict[str, tuple[int, int, str | None, str]] = {}  # name -> (split, row, stamp, old class/split)
        note = ""
        labels = f["label"][()]
        for code, split in enumerate(_SPLITS):
            names = decode_strings(f[f"{split}_names"][()])
            st = _stamps(f, split)
            if st is None:
                note = f"{cache} records no per-image stamps (written by an earlier catfeat or damaged): " \
                       "every image is computed again"
            for r, name in enumerate(names):
                was = "test" if split == "test" else (old_classes[labels[r]] if 0 <= labels[r] < len(old_classes)
                                                      else str(labels[r]))
                rows[name] = (code, r, None if st is None else st[r], was)
        skipped = set(decode_strings(f["skipped_names"][()]))
        damaged = {}
        if "damaged_names" in f:
            damaged = dict(zip(decode_strings(f["damaged_names"][()]), decode_strings(f["damaged_reasons"][()])))
    n = len(images)
    old_split = np.full(n, -1, np.int8)
    old_row = np.full(n, -1, np.int64)
    counts = dict.fromkeys(("kept", "added", "changed", "removed", "retried"), 0)
    compute, kept_damage, relabelled = [], {}, 0
    classes = list(images.classes)
    for pos, (name, stamp) in enumerate(zip(images.names, stamps)):
        old = rows.get(name)
        if old is not None and old[2] is not None and old[2] == stamp and stamp != "missing":
            old_split[pos], old_row[pos] = old[0], old[1]
            counts["kept"] += 1
            if name in damaged:
                kept_damage[name] = damaged[name]
            label = int(images.labels[pos])
            now = "test" if images.split[pos] == "test" else (classes[label] if 0 <= label < len(classes)
                                                              else str(label))
            relabelled += now != old[3]
            continue
        compute.append(pos)
        counts["changed" if old is not None else "retried" if name in skipped else "added"] += 1
    listed = set(images.names)
    counts["removed"] = sum(1 for name in rows if name not in listed) + len(skipped - listed)
    return Growth(old_split, old_row, compute, counts, kept_damage, relabelled, note, known)


def delta_is_done(path: Path, attrs: dict, n_images: int) -> bool:
    """Whether ``path`` is a complete cache of the computed images described by ``attrs``."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        a = open_cache(path).attrs
    except (OSError, ValueError):  # absent, or a CacheError: not done
        return False
    return not differences(a, attrs) and a.get("n_images") == n_images


def drop_stale_delta(path: Path, attrs: dict, n_images: int, log: Callable[[str], None]) -> None:
    """Remove an unfinished or complete delta of another growth (the images changed again since):
    it is catfeat's own scratch, and the engine would refuse or restart it."""
    for p in (path, partial_path(path)):
        if remove_planted_link(p) or not os.path.lexists(p):
            continue
        held = partial_attrs(p)
        if held is not None and not differences(held, attrs) and held.get("n_images") == n_images:
            continue
        log(f"catfeat: removing {p}: the computed images of an earlier growth, since changed")
        if stat.S_ISREG(os.lstat(p).st_mode):
            os.unlink(p)


def make_grow_dir(cache: Path) -> Path:
    """Create ``OUT/.grow`` (a planted link there is removed, never followed)."""
    folder = cache.parent / GROW_DIR
    remove_planted_link(folder)
    folder.mkdir(exist_ok=True)
    return folder


def remove_delta(cache: Path) -> None:
    """Delete the growth scratch of ``cache`` (``OUT/.grow/gap_<Model>.h5`` and its ``.partial``), then
    ``OUT/.grow`` when empty. Only regular files are deleted; links are removed, never followed."""
    folder = cache.parent / GROW_DIR
    if remove_planted_link(folder) or not folder.is_dir():
        return
    for p in (delta_path(cache), partial_path(delta_path(cache))):
        if remove_planted_link(p):
            continue
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(folder)  # when nothing else is in it
    except OSError:
        pass


def merge_growth(path: Path, attrs: dict, images: ImageSet, stamps: Sequence[str], dim: int, growth: Growth,
                 old: Path, delta: Path | None) -> Path:
    """Write the grown cache: kept rows from ``old``, computed ones from ``delta`` (a cache of
    ``images.subset(growth.compute)``), in the listing's order, into ``<path>.partial``; rename it over
    ``path`` when complete. A ``.partial`` of the same growth left by a crash is resumed."""
    h5py = import_h5py()
    n = len(images)
    d_split = np.full(n, -1, np.int8)  # where each computed position's row is in the delta
    d_row = np.full(n, -1, np.int64)
    d_skip: dict[int, str] = {}
    d_damaged: dict[int, str] = {}
    writer = FeatureWriter(path, attrs, images.names, images.labels, images.split, dim, stamps=stamps)
    try:
        with ExitStack() as files:
            fo = files.enter_context(h5py.File(old, "r"))
            fd = files.enter_context(h5py.File(delta, "r")) if delta is not None else None
            if fd is not None:
                skipped = fd["skipped_index"][()].tolist()
                why = dict(zip(skipped, decode_strings(fd["skipped_reasons"][()])))
                bad = dict(zip(fd["damaged_index"][()].tolist(), decode_strings(fd["damaged_reasons"][()])))
                next_row = [0, 0]
                for j, pos in enumerate(growth.compute):
                    if j in why:
                        d_skip[pos] = why[j]
                        continue
                    code = _SPLITS.index(images.split[pos])
                    d_split[pos], d_row[pos] = code, next_row[code]
                    next_row[code] += 1
                    if j in bad:
                        d_damaged[pos] = bad[j]
            elif growth.compute:
                raise ValueError("computed images but no delta cache to take them from")
            for a in range(writer.next_index, n, MERGE_ROWS):
                b = min(a + MERGE_ROWS, n)
                ok = np.array([p not in d_skip for p in range(a, b)], bool)
                feats = np.zeros((int(ok.sum()), dim), np.float32)
                out_row = np.cumsum(ok) - 1  # the row of feats each ok position fills
                for src, code_of, row_of in ((fo, growth.old_split, growth.old_row), (fd, d_split, d_row)):
                    if src is None:
                        continue
                    for code, split in enumerate(_SPLITS):
                        sel = np.flatnonzero(code_of[a:b] == code)
                        if len(sel):
                            feats[out_row[sel]] = _rows(src[split], row_of[a:b][sel])
                errors = {p: d_skip[p] for p in range(a, b) if p in d_skip}
                damaged = {p: d_damaged[p] for p in range(a, b) if p in d_damaged}
                damaged.update({p: growth.damaged[images.names[p]] for p in range(a, b)
                                if growth.old_split[p] >= 0 and images.names[p] in growth.damaged})
                writer.write(a, ok, feats, errors, damaged)
        return writer.finish()
    finally:
        writer.close()


def _rows(ds, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` as float32 for any order of ``rows``; a contiguous span is read in one slice."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 4 * len(rows):
        return np.asarray(ds[lo:hi], np.float32)[rows - lo]
    uniq, back = np.unique(rows, return_inverse=True)
    return np.asarray(ds[uniq], np.float32)[back]


def growth_attrs(growth: Growth) -> dict:
    """The attribute a grown cache records: ``growth``, the JSON of its counts."""
    return {"growth": json.dumps(growth.counts)}
