"""`catfeat info [FEATURES]`: what the feature caches in a folder hold, finished or not."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


# What is printed of one value (a cell, an attribute); a hostile cache can hold a 10 MB attribute.
SHOWN_CHARS = 200
# What is printed of one error (it names the file and says what to do, so it may be longer).
ERROR_CHARS = 2000
COLUMNS = ["file", "status", "backbone", "train", "test", "classes", "skipped", "weights", "backend", "precision",
           "decoder", "created", "size_bytes", "rows_written", "n_images", "data_root", "grown", "error"]


def describe_caches(features_dir: str | os.PathLike = "features") -> "pd.DataFrame":  # noqa: F821
    """One row per ``gap_*.h5`` cache and per unfinished ``gap_*.h5.partial`` in ``features_dir``.

    Columns: ``file, status`` (complete | unfinished | unreadable), ``backbone, train, test`` (rows
    per split; for an unfinished file, the rows so far), ``classes, skipped, weights, backend,
    precision, decoder`` ('pillow' for caches older than the attribute), ``created, size_bytes,
    rows_written, n_images``, ``grown`` (what the last growth did: "200 kept, 10 added, 2 changed,
    1 removed"; blank for a cache built whole) and ``error`` (why an unreadable file cannot be used). Only regular
    files are opened: a FIFO, a folder or a broken link is a row with status 'unreadable' and why.
    Values are as stored; ``format_caches`` escapes and cuts them for printing.
    """
    import pandas as pd

    folder = Path(features_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}; extract with `catfeat extract DATA_DIR --features {folder}`")
    files = sorted(folder.glob("gap_*.h5")) + sorted(folder.glob("gap_*.h5.partial"))
    rows = [_describe(p) for p in sorted(files, key=lambda p: (p.name.removesuffix(".partial"), p.suffix))]
    columns = {}
    for c in COLUMNS:
        values = [r.get(c) for r in rows]
        numbers = all(v is None or isinstance(v, (int, float, np.integer, np.floating)) for v in values)
        # Text stays object: names that are not valid UTF-8 (surrogates) cannot be pandas strings.
        columns[c] = pd.Series(values, dtype=None if numbers else object)
    return pd.DataFrame(columns, columns=COLUMNS)


def _describe(path: Path) -> dict:
    from catfeat.cache.store import CacheError, growth_text, regular_stat, open_cache

    row = {"file": path.name, "backbone": path.name.removeprefix("gap_").split(".h5")[0]}
    try:
        row["size_bytes"] = regular_stat(path).st_size  # before any open: a FIFO would block it
    except CacheError as e:
        return {**row, "status": "unreadable", "error": str(e)}
    if path.suffix == ".partial":
        return {**row, **_partial(path)}
    try:
        cache = open_cache(path)
    except CacheError as e:
        return {**row, "status": "unreadable", "error": str(e)}
    a = cache.attrs
    return {**row, **_common(a), "status": "complete", "train": a["n_train"], "test": a["n_test"],
            "skipped": int(a.get("skipped_count", 0)), "rows_written": a.get("rows_written"),
            "n_images": a.get("n_images"), "grown": growth_text(a.get("growth")) or None}


def _common(a: dict) -> dict:
    from catfeat.cache.store import LEGACY_DEFAULTS

    try:
        classes = ",".join(map(str, json.loads(a.get("classes", "[]"))))
    except (TypeError, ValueError, RecursionError):  # not JSON, not a list, or nested too deep
        classes = str(a.get("classes"))
    return {"backbone": a.get("backbone"), "classes": classes, "weights": a.get("weights"),
            "backend": a.get("backend", ""), "precision": a.get("precision"),
            "decoder": a.get("decoder", LEGACY_DEFAULTS["decoder"]),
            "created": a.get("created") or a.get("completed") or "", "data_root": a.get("data_root", "")}


def _partial(path: Path) -> dict:
    """Attributes and rows so far of an unfinished cache; read without a lock, as a writer may hold it."""
    from catfeat.cache.store import CacheError, check_inside, import_h5py, read_attrs

    h5py = import_h5py()
    try:
        with h5py.File(path, "r", locking=False) as f:
            check_inside(f, path)  # even `"train" in f` would open the file an external link names
            a = read_attrs(f)
            train, test = (f[s].shape[0] if s in f else 0 for s in ("train", "test"))
            skipped = f["skipped_names"].shape[0] if "skipped_names" in f else 0
    except CacheError as e:
        return {"status": "unreadable", "error": str(e)}
    except Exception as e:  # mid-write or damaged: still worth listing
        return {"status": "unreadable", "error": f"{e.__class__.__name__}: {e}"}
    return {**_common(a), "status": "unfinished", "train": train, "test": test, "skipped": skipped,
            "rows_written": a.get("rows_written"), "n_images": a.get("n_images")}


def format_size(n: float) -> str:
    """Bytes as B / KB / MB / GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cell(value) -> str:
    """One value as printed: blank when missing, whole floats without '.0', control characters
    escaped (``images.printable``), cut after ``SHOWN_CHARS``."""
    from catfeat.images.listing import printable

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a column with blanks holds floats
    return printable(value, SHOWN_CHARS)


def format_caches(df) -> str:
    """``describe_caches``' table as text: sizes in KB/MB, unfinished files as 'unfinished R/N images'.

    Names and values print on one line each, control characters escaped (a class named "do\\ng"
    shows as 'do\\ng'), and at most ``SHOWN_CHARS`` characters of each value.
    """
    from catfeat.images.listing import printable

    if not len(df):
        return "(no caches)"
    shown = df.copy()
    shown["size"] = shown["size_bytes"].map(lambda n: "" if n is None or n != n else format_size(n))  # n != n: NaN
    unfinished = shown["status"] == "unfinished"
    shown.loc[unfinished, "status"] = [f"unfinished {cell(r)}/{cell(n)} images" for r, n in
                                       zip(shown.loc[unfinished, "rows_written"], shown.loc[unfinished, "n_images"])]
    cols = [c for c in ["file", "status", "backbone", "train", "test", "classes", "skipped", "weights", "backend",
                        "precision", "decoder", "created", "size", "grown"] if c in shown]
    if "grown" in cols and not shown["grown"].map(lambda v: isinstance(v, str) and bool(v)).any():
        cols.remove("grown")  # no cache here was grown: no empty column
    cells = shown[cols].astype(object).map(cell)
    widths = [max(len(c), *cells[c].str.len()) for c in cols]
    lines = [cols, *cells.itertuples(index=False)]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)
    errors = [f"{cell(f)}: {printable(e, ERROR_CHARS)}" for f, e in zip(shown["file"], shown["error"])
              if isinstance(e, str) and e]
    return "\n".join([text, *errors])


def raw_attrs(path: Path) -> dict:
    """Every attribute of a cache file, or ``{"error": why}``; only a regular file is opened."""
    from catfeat.cache.store import CacheError, regular_stat, import_h5py, read_attrs

    try:
        regular_stat(path)
        with import_h5py().File(path, "r", locking=False) as f:
            return read_attrs(f)
    except CacheError as e:
        return {"error": str(e)}
    except Exception as e:
        return {"error": f"{e.__class__.__name__}: {e}"}
