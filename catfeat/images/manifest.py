"""Manifests: a CSV or Parquet table of images, local or at a URL, instead of a folder layout.

Column ``image``: the image's path relative to the manifest, an absolute local path, or a URL;
optional ``label`` (any text or number; sorted label values -> 0..K-1) and ``split`` (``train`` or
``test``; where absent or empty, rows with a label are train rows and rows without one test rows).
Test rows are unlabelled in the cache, as for folders. Other columns are ignored. Images keep the
manifest's order, train rows first; their names are the ``image`` values as written.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from catfeat.images.sources import is_url, join_url, parent_url, read_url

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
SPLITS = ("train", "test")


class ManifestError(ValueError):
    """A manifest that cannot be read, or a column of it that does not hold what it must."""


@dataclass
class Manifest:
    """The rows of one manifest: ``names`` as written, ``locations`` to read (URL or absolute path)."""

    where: str  # the manifest: URL, or absolute local path
    names: list[str]
    locations: list[str]
    labels: list[str | None]
    splits: list[str]


def is_manifest(location) -> bool:
    """Whether ``location`` (path or URL) names a manifest rather than a folder: a CSV or Parquet file."""
    text = location.split("?", 1)[0] if is_url(location) else os.fspath(location)
    if not text.lower().endswith(MANIFEST_SUFFIXES):
        return False
    return is_url(location) or not Path(text).expanduser().is_dir()


def _cell(value) -> str | None:
    """A table cell as text; None when empty (NaN, None, blank). Whole floats lose their '.0'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _table(data: bytes, where: str):
    import pandas as pd

    kind = "Parquet" if where.split("?", 1)[0].lower().endswith((".parquet", ".pq")) else "CSV"
    try:
        if kind == "CSV":
            return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_filter=False)
        return pd.read_parquet(io.BytesIO(data))
    except ImportError as e:
        raise ManifestError(f"reading the Parquet manifest {where} needs pyarrow ({e}): pip install pyarrow") from None
    except Exception as e:
        raise ManifestError(f"cannot read the manifest {where} as {kind} ({e.__class__.__name__}: {e})") from None


def locate(entry: str, base: str) -> str:
    """What to read for the manifest entry ``entry``: a URL or an absolute path as is, else relative
    to the folder of the manifest ``base``."""
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(base):
        return join_url(parent_url(base), entry)
    return os.path.normpath(os.path.join(os.path.dirname(base), entry))


def read_manifest(location: str | os.PathLike) -> Manifest:
    """The rows of the manifest at ``location``; :class:`ManifestError` names the column at fault."""
    if is_url(location):
        where, data = str(location), read_url(str(location))
    else:
        path = Path(location).expanduser().resolve()
        if not path.is_file():
            raise ManifestError(f"manifest {str(path)!r} does not exist")
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ManifestError(f"cannot read the manifest {where}: {e.strerror}") from None
    df = _table(data, where)
    columns = [str(c) for c in df.columns]
    if "image" not in columns:
        raise ManifestError(f"manifest {where} has no column 'image' (its columns: {', '.join(columns) or 'none'}); "
                            "name the column of image paths or URLs 'image'")
    if not len(df):
        raise ManifestError(f"manifest {where} has no rows; list one image per row in its column 'image'")
    n = len(df)
    images = [_cell(v) for v in df["image"].tolist()]
    labels = [_cell(v) for v in df["label"].tolist()] if "label" in columns else [None] * n
    asked = [_cell(v) for v in df["split"].tolist()] if "split" in columns else [None] * n
    rows: dict[str, list] = {s: [] for s in SPLITS}
    seen: dict[str, int] = {}
    for i, (image, label, split) in enumerate(zip(images, labels, asked), start=1):
        if image is None:
            raise ManifestError(f"column 'image' of {where}: row {i} is empty; give each row an image path or URL")
        if image in seen:
            raise ManifestError(f"column 'image' of {where}: {image!r} is listed twice (rows {seen[image]} and {i}); "
                                "list each image once")
        seen[image] = i
        if split is not None:
            split = split.lower()
            if split not in SPLITS:
                raise ManifestError(f"column 'split' of {where}: row {i} ({image!r}) holds {split!r}; use 'train' "
                                    "(labelled) or 'test' (unlabelled), or leave it empty")
        split = split or ("train" if label is not None else "test")
        if split == "train" and label is None:
            raise ManifestError(f"column 'label' of {where}: row {i} ({image!r}) is a train image without a label"
                                + ("" if "label" in columns else " (the manifest has no column 'label')")
                                + "; give it a label or mark it 'test' in column 'split'")
        rows[split].append((image, locate(image, where), label if split == "train" else None))
    ordered = rows["train"] + rows["test"]
    return Manifest(where, [r[0] for r in ordered], [r[1] for r in ordered], [r[2] for r in ordered],
                    ["train"] * len(rows["train"]) + ["test"] * len(rows["test"]))

