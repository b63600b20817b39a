"""Past the machine's memory: train, score and predict from the HDF5 caches in blocks.

:class:`CacheRows` stands for the rows of several backbone caches aligned by file name, without
their features: it holds the file names, labels and, per backbone, the row of each aligned image
in that backbone's file (8 bytes a row). Features are read when needed, in blocks of rows sorted
by file position (HDF5 reads contiguous ranges fast and scattered rows slowly), and returned as
float32 whatever the cache stores (float32 or float16).

``FusedHead.fit``/``predict_proba`` and the helpers of :mod:`catfeat.head.scoring` take a
``CacheRows`` wherever they take a dict of arrays; splits are row subsets (``rows.subset(idx)``).
Training (:mod:`catfeat.head.streamed`) reads each epoch as shuffled blocks of ``block_rows``
gathered into buffers of ``buffer_rows`` that are shuffled row by row (:class:`EpochBatches`), so
the memory used depends on the buffer size, not on the number of rows. This module knows nothing
of the head: the memory checks live in :mod:`catfeat.cache.store`, the training in :mod:`catfeat.head.streamed`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from catfeat.cache.store import check_memory, format_gib

# python -m catfeat.fit streams (by default) when the features of the training rows, as float32,
# take more than this share of the machine's memory; the in-memory path needs about 3 copies.
STREAM_FRACTION = 0.125
BLOCK_BYTES = 4 << 20  # one contiguous read: ~270 rows of 3 x 1280 float32 features
BUFFER_BYTES = 128 << 20  # rows shuffled together: ~8,700 rows of 3 x 1280
FORWARD_BYTES = 64 << 20  # rows per read when predicting
VAL_IN_MEMORY_BYTES = 256 << 20  # an early-stopping split up to this size is read once and kept
COMPARE_MAX_ROWS = 20000  # compare's many candidate heads run on a stratified sample of this size


def estimate_bytes(models, features_dir, split: str = "train") -> int:
    """Bytes of the features of ``split`` as float32 arrays, from the caches' attributes only."""
    from catfeat.models.registry import parse_models
    from catfeat.cache.store import find_cache

    total = 0
    for s in parse_models(models):
        c = find_cache(s.name, features_dir)
        total += int(c.attrs.get(f"n_{split}", 0)) * int(c.attrs.get("feature_dim") or 0) * 4
    return total


def is_stream(X) -> bool:
    return isinstance(X, CacheRows)


# -- reading -----------------------------------------------------------------------------------------
_FILES: dict = {}


def _file(path: Path):
    import h5py

    key = str(path)
    f = _FILES.get(key)
    if f is None or not f.id.valid:
        f = _FILES[key] = h5py.File(path, "r")
    return f


def close_files() -> None:
    """Close the HDF5 files opened for reading rows."""
    for f in _FILES.values():
        try:
            f.close()
        except Exception:
            pass
    _FILES.clear()


def _read_rows(ds, rows: np.ndarray, out: np.ndarray, span: int) -> None:
    """``out[i] = ds[rows[i]]`` for ascending ``rows``: contiguous reads of at most ``span`` rows."""
    i, n = 0, len(rows)
    while i < n:
        lo = int(rows[i])
        j = int(np.searchsorted(rows, lo + span, "left"))
        hi = int(rows[j - 1]) + 1
        if hi - lo == j - i and ds.dtype == out.dtype:
            ds.read_direct(out, np.s_[lo:hi], np.s_[i:j])  # no temporary copy
        else:
            block = ds[lo:hi]
            out[i:j] = block if hi - lo == j - i else block[rows[i:j] - lo]
        i = j


class CacheRows:
    """Rows of one or more backbone caches aligned by file name, read from disk in blocks.

    Build with :meth:`open`; take row subsets with :meth:`subset` (what splits do); read features
    with :meth:`read` (positions) or :meth:`blocks`; :meth:`to_arrays` loads everything (checked
    against the available memory). ``labels`` is None for the test split.
    """

    def __init__(self, paths: dict, file_rows: dict, dims: dict, names: np.ndarray, labels: np.ndarray | None,
                 split: str = "train", dtypes: dict | None = None):
        self.paths = {k: Path(v) for k, v in paths.items()}
        self.file_rows = {k: np.asarray(v, np.int64) for k, v in file_rows.items()}
        self.dims = {k: int(v) for k, v in dims.items()}
        self.names = np.asarray(names, dtype=object)
        self.labels = None if labels is None else np.asarray(labels)
        self.split = split
        self.dtypes = dict(dtypes or {k: "float32" for k in paths})

    @classmethod
    def open(cls, models, features_dir="features", split: str = "train", join: str = "exact") -> "CacheRows":
        """Align the caches of ``models`` by file name, reading names and labels only."""
        from catfeat.models.registry import parse_models
        from catfeat.cache.store import align, find_cache, same_labels

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        caches = {s.name: find_cache(s.name, features_dir) for s in parse_models(models)}
        order, idx = align({k: c.names(split) for k, c in caches.items()}, join)
        labels = same_labels(caches, idx) if split == "train" else None
        dims = {k: int(c.attrs.get("feature_dim") or _file(c.path)[split].shape[1]) for k, c in caches.items()}
        dtypes = {k: str(c.attrs.get("dtype", "float32")) for k, c in caches.items()}
        return cls({k: c.path for k, c in caches.items()}, idx, dims, np.asarray(order, dtype=object), labels,
                   split, dtypes)

    # -- shape ----------------------------------------------------------------------------------------
    @property
    def backbones(self) -> list[str]:
        return list(self.paths)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.paths)

    @property
    def row_bytes(self) -> int:
        return 4 * sum(self.dims.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all these rows as float32 arrays."""
        return len(self) * self.row_bytes

    def __repr__(self) -> str:
        return (f"CacheRows({len(self):,} {self.split} rows of {', '.join(f'{k} ({d})' for k, d in self.dims.items())}"
                f", {format_gib(self.nbytes)} as float32)")

    # -- views ----------------------------------------------------------------------------------------
    def subset(self, rows) -> "CacheRows":
        """These rows at positions ``rows`` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return CacheRows(self.paths, {k: v[rows] for k, v in self.file_rows.items()}, self.dims, self.names[rows],
                         None if self.labels is None else self.labels[rows], self.split, self.dtypes)

    def select(self, backbones: Sequence[str]) -> "CacheRows":
        """The same rows for some of the backbones."""
        bs = list(backbones)
        return CacheRows({k: self.paths[k] for k in bs}, {k: self.file_rows[k] for k in bs},
                         {k: self.dims[k] for k in bs}, self.names, self.labels, self.split,
                         {k: self.dtypes[k] for k in bs})

    def __getitem__(self, backbone: str) -> "CacheRows":
        return self.select([backbone])

    # -- reading --------------------------------------------------------------------------------------
    def read(self, positions=None, span: int | None = None) -> list[np.ndarray]:
        """float32 features of the rows at ``positions`` (default: all), one array per backbone."""
        pos = np.arange(len(self)) if positions is None else np.asarray(positions, np.int64)
        out = []
        for k in self.paths:
            r = self.file_rows[k][pos]
            ds = _file(self.paths[k])[self.split]
            a = np.empty((len(r), self.dims[k]), np.float32)
            if len(r):
                step = span or max(64, BLOCK_BYTES // (4 * self.dims[k]))
                if np.all(np.diff(r) > 0):
                    _read_rows(ds, r, a, step)
                else:
                    order = np.argsort(r, kind="stable")
                    tmp = np.empty_like(a)
                    _read_rows(ds, r[order], tmp, step)
                    a[order] = tmp
                if not np.isfinite(a.sum()) and not np.isfinite(a).all():
                    from catfeat.cache.store import check_finite

                    try:
                        check_finite({k: a}, self.names[pos], "training row" if self.split == "train" else "test row")
                    except ValueError as e:  # names the images; the file says where they are
                        raise ValueError(f"{self.paths[k]}: {e}") from None
            out.append(a)
        return out

    def blocks(self, rows: int | None = None) -> Iterable[tuple[np.ndarray, list[np.ndarray]]]:
        """(positions, arrays) for consecutive blocks of ``rows`` rows, in order."""
        rows = rows or max(256, FORWARD_BYTES // max(self.row_bytes, 1))
        for a in range(0, len(self), rows):
            pos = np.arange(a, min(a + rows, len(self)))
            yield pos, self.read(pos)

    def to_arrays(self, what: str | None = None) -> dict[str, np.ndarray]:
        """Every row in memory: {backbone: (n, D) float32}, refused in one line if it would not fit."""
        check_memory(self.nbytes, what or f"loading {len(self):,} rows of {', '.join(self.paths)}",
                     "stream the rows instead (pass the CacheRows itself; python -m catfeat.fit --stream)")
        return dict(zip(self.paths, self.read()))


# -- training order ----------------------------------------------------------------------------------
class EpochBatches:
    """Batches of one epoch over ``rows``: shuffled blocks, shuffled again row by row within a buffer.

    Every row appears once an epoch whatever the block and buffer sizes; the order depends on
    ``seed`` and the epoch. ``epoch_order()`` gives the positions of an epoch in the order served.
    With ``weights`` (one per row), :meth:`batch_at` gives ``(x, target, weight)``, as Keras takes them.
    """

    def __init__(self, rows: CacheRows, target: np.ndarray, batch_size: int, seed: int | None = 0,
                 block_rows: int | None = None, buffer_rows: int | None = None, shuffle: bool = True,
                 weights: np.ndarray | None = None):
        self.rows, self.target, self.batch = rows, np.asarray(target), int(batch_size)
        self.weights = None if weights is None else np.asarray(weights, np.float32)
        if self.weights is not None and self.weights.shape != (len(rows),):
            raise ValueError(f"weights must hold one value per row ({len(rows)}), got shape {self.weights.shape}")
        self.seed = 0 if seed is None else int(seed)
        rb = max(rows.row_bytes, 1)
        self.block_rows = int(block_rows or max(64, BLOCK_BYTES // rb))
        buf = int(buffer_rows or max(self.block_rows, BUFFER_BYTES // rb))
        self.buffer_rows = max(self.batch, buf // self.batch * self.batch)  # batches never straddle buffers
        self.shuffle = shuffle
        self.epoch = 0
        self._buf_id, self._buf = None, None
        self._orders: dict[int, np.ndarray] = {}
        self._pending: dict = {}  # (epoch, buffer) -> Future: the next buffer is read while Keras trains
        self._pool = None

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        n = len(self.rows)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        starts = np.arange(0, n, self.block_rows)
        blocks = [np.arange(a, min(a + self.block_rows, n)) for a in starts[rng.permutation(len(starts))]]
        order = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
        out = np.empty_like(order)
        for a in range(0, n, self.buffer_rows):
            piece = np.sort(order[a:a + self.buffer_rows])
            out[a:a + len(piece)] = piece[rng.permutation(len(piece))]
        return out

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = self.epoch_order(epoch)
        return self._orders[epoch]

    def _read_buffer(self, epoch: int, j: int):
        pos = self._order_of(epoch)[j * self.buffer_rows:(j + 1) * self.buffer_rows]
        srt = np.argsort(pos, kind="stable")
        arrays = self.rows.read(pos[srt])  # sorted positions: contiguous reads
        inv = np.empty_like(srt)
        inv[srt] = np.arange(len(srt))
        return [a[inv] for a in arrays], self.target[pos], None if self.weights is None else self.weights[pos]

    def _load(self, j: int) -> None:
        key = (self.epoch, j)
        fut = self._pending.pop(key, None)
        self._pending.clear()
        self._buf = None  # drop the previous buffer before the next is held
        self._buf = fut.result() if fut is not None else self._read_buffer(*key)
        self._buf_id = key
        n_buf = math.ceil(len(self.rows) / self.buffer_rows)
        nxt = (self.epoch, j + 1) if j + 1 < n_buf else (self.epoch + 1, 0)
        if n_buf > 1 or nxt[0] != self.epoch:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(1, thread_name_prefix="catfeat-read")
            self._pending[nxt] = self._pool.submit(self._read_buffer, *nxt)

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def batch_at(self, i: int):
        j = i * self.batch // self.buffer_rows
        if self._buf_id != (self.epoch, j):
            self._load(j)
        a = i * self.batch - j * self.buffer_rows
        arrays, t, w = self._buf
        out = tuple(x[a:a + self.batch] for x in arrays), t[a:a + self.batch]
        return out if w is None else (*out, w[a:a + self.batch])

    def next_epoch(self) -> None:
        self.epoch += 1
        self._buf_id, self._buf = None, None  # a prefetched (epoch, 0) stays pending


# -- compare -----------------------------------------------------------------------------------------
def sample_for_compare(rows: CacheRows, y, seed, max_rows: int | None = None):
    """(arrays, y, note): at most ``max_rows`` stratified rows in memory for compare's many heads."""
    y = np.asarray(y)
    max_rows = COMPARE_MAX_ROWS if max_rows is None else max_rows
    note = ""
    if len(rows) > max_rows:
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(rows)), train_size=max_rows, random_state=seed, stratify=y)
        keep = np.sort(keep)
        rows, y = rows.subset(keep), y[keep]
        note = f"on a stratified sample of {max_rows:,} of {len(keep) + len(_):,} rows"
    return rows.to_arrays(f"compare on {len(rows):,} rows"), y, note
