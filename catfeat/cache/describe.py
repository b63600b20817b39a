"""`catfeat info [FEATURES]`: what the feature caches in a folder hold, finished or not."""
from __future__ import annotations

import json
import os
from pathlib import Path


COLUMNS = ["file", "status", "backbone", "train", "test", "classes", "skipped", "weights", "backend", "precision",
           "decoder", "created", "size_bytes", "rows_written", "n_images", "error"]


def describe_caches(features_dir: str | os.PathLike = "features") -> "pd.DataFrame":  # noqa: F821
    """One row per ``gap_*.h5`` cache and per unfinished ``gap_*.h5.partial`` in ``features_dir``.

    Columns: ``file, status`` (complete | unfinished | unreadable), ``backbone, train, test`` (rows
    per split; for an unfinished file, the rows so far), ``classes, skipped, weights, backend,
    precision, decoder`` ('pillow' for caches older than the attribute), ``created, size_bytes,
    rows_written, n_images`` and ``error`` (why an unreadable file cannot be used).
    """
    import pandas as pd

    folder = Path(features_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}; extract with `catfeat extract DATA_DIR --features {folder}`")
    files = sorted(folder.glob("gap_*.h5")) + sorted(folder.glob("gap_*.h5.partial"))
    rows = [_describe(p) for p in sorted(files, key=lambda p: (p.name.removesuffix(".partial"), p.suffix))]
    return pd.DataFrame(rows, columns=COLUMNS)


def _describe(path: Path) -> dict:
    from catfeat.cache.store import CacheError, open_cache

    row = {"file": path.name, "size_bytes": path.stat().st_size,
           "backbone": path.name.removeprefix("gap_").split(".h5")[0]}
    if path.suffix == ".partial":
        return {**row, **_partial(path)}
    try:
        cache = open_cache(path)
    except CacheError as e:
        return {**row, "status": "unreadable", "error": str(e)}
    a = cache.attrs
    return {**row, **_common(a), "status": "complete", "train": a["n_train"], "test": a["n_test"],
            "skipped": int(a.get("skipped_count", 0)), "rows_written": a.get("rows_written"),
            "n_images": a.get("n_images")}


def _common(a: dict) -> dict:
    from catfeat.cache.store import LEGACY_DEFAULTS

    try:
        classes = ",".join(map(str, json.loads(a.get("classes", "[]"))))
    except (TypeError, ValueError):
        classes = str(a.get("classes"))
    return {"backbone": a.get("backbone"), "classes": classes, "weights": a.get("weights"),
            "backend": a.get("backend", ""), "precision": a.get("precision"),
            "decoder": a.get("decoder", LEGACY_DEFAULTS["decoder"]),
            "created": a.get("created") or a.get("completed") or ""}


def _partial(path: Path) -> dict:
    """Attributes and rows so far of an unfinished cache; read without a lock, as a writer may hold it."""
    from catfeat.cache.store import import_h5py, read_attrs

    h5py = import_h5py()
    try:
        with h5py.File(path, "r", locking=False) as f:
            a = read_attrs(f)
            train, test = (f[s].shape[0] if s in f else 0 for s in ("train", "test"))
            skipped = f["skipped_names"].shape[0] if "skipped_names" in f else 0
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


def format_caches(df) -> str:
    """``describe_caches``' table as text: sizes in KB/MB, unfinished files as 'unfinished R/N images'."""
    if not len(df):
        return "(no caches)"
    shown = df.copy()
    shown["size"] = shown["size_bytes"].map(format_size)
    unfinished = shown["status"] == "unfinished"
    shown.loc[unfinished, "status"] = [f"unfinished {r}/{n} images" for r, n in
                                       zip(shown.loc[unfinished, "rows_written"], shown.loc[unfinished, "n_images"])]
    cols = [c for c in ["file", "status", "backbone", "train", "test", "classes", "skipped", "weights", "backend",
                        "precision", "decoder", "created", "size"] if c in shown]
    cells = shown[cols].astype(object).where(shown[cols].notna(), "").astype(str)
    widths = [max(len(c), *cells[c].str.len()) for c in cols]
    lines = [cols, *cells.itertuples(index=False)]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)
    errors = [f"{f}: {e}" for f, e in zip(shown["file"], shown["error"]) if isinstance(e, str) and e]
    return "\n".join([text, *errors])


def raw_attrs(path: Path) -> dict:
    """Every attribute of the cache at ``path`` (or ``{'error': why}``), read without a lock."""
    from catfeat.cache.store import import_h5py, read_attrs

    try:
        with import_h5py().File(path, "r", locking=False) as f:
            return read_attrs(f)
    except Exception as e:
        return {"error": f"{e.__class__.__name__}: {e}"}
