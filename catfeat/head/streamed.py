"""The Keras adapters that let ``FusedHead`` train and predict on a :class:`catfeat.cache.rows.CacheRows`:
batches read from the caches in blocks (a Keras ``PyDataset``, every backend), early stopping scored
on streamed validation rows, and the blockwise forward pass.

``FusedHead.fit`` (:mod:`catfeat.head.estimator`) holds the one recipe for arrays and streamed rows
and calls these where the rows stay on disk. Kept apart from :mod:`catfeat.cache.rows`, which reads
and orders rows and knows nothing of Keras or the head.
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from catfeat.cache import rows as streaming
from catfeat.cache.rows import CacheRows, EpochBatches, is_stream
from catfeat.head.network import LogLossEarlyStopping, forward


class _Batches(keras.utils.PyDataset):
    """The batches of :class:`EpochBatches` as Keras reads them, one epoch after another."""

    def __init__(self, batches: EpochBatches):
        super().__init__(workers=1, use_multiprocessing=False)
        self.epoch_batches = batches

    def __len__(self):
        return len(self.epoch_batches)

    def __getitem__(self, i):
        x, *rest = self.epoch_batches.batch_at(int(i))
        return ((x[0] if len(x) == 1 else x), *rest)

    def on_epoch_end(self):
        self.epoch_batches.next_epoch()


class StreamEarlyStopping(LogLossEarlyStopping):
    """Early stopping scored on validation rows streamed from the caches each epoch."""

    def predict_validation(self) -> np.ndarray:
        return forward_rows(self.model, self.val_arrays)


def early_stopping(val: tuple, patience: int, n_classes: int) -> LogLossEarlyStopping:
    """The early-stopping callback for validation ``(X, target[, weight])``: ``X`` a list of arrays,
    or a :class:`CacheRows`, read once when it takes at most ``VAL_IN_MEMORY_BYTES``, else streamed
    each epoch."""
    if is_stream(val[0]) and val[0].nbytes <= streaming.VAL_IN_MEMORY_BYTES:
        val = (val[0].read(), *val[1:])  # small enough: read once, score like the in-memory path
    cls = StreamEarlyStopping if is_stream(val[0]) else LogLossEarlyStopping
    return cls(val, patience, n_classes)


def fit_streamed(model, rows: CacheRows, target: np.ndarray, weights: np.ndarray | None, batch: int, epochs: int,
                 seed: int | None, callbacks: Sequence, verbose: int = 0):
    """``model.fit`` on ``rows`` read in shuffled blocks (:class:`EpochBatches`); the Keras history.

    ``weights`` (one per row, or None) are held in memory and served with each batch.
    """
    batches = EpochBatches(rows, target, batch, seed, weights=weights)
    # shuffle=False: Keras would otherwise ask for the batches in random order, reading every
    # buffer again for each batch; the rows are shuffled by EpochBatches.
    try:
        return model.fit(_Batches(batches), epochs=epochs, shuffle=False, callbacks=list(callbacks),
                         verbose=verbose)
    finally:
        batches.close()


def forward_rows(model, rows: CacheRows, block_rows: int | None = None) -> np.ndarray:
    """Model outputs (float64) for every row, reading ``block_rows`` rows at a time."""
    outs = [forward(model, arrays) for _, arrays in rows.blocks(block_rows)]
    return np.concatenate(outs) if outs else np.zeros((0, model.output_shape[-1]))


def predict_stream(head, rows: CacheRows) -> np.ndarray:
    """The fitted ``head``'s model outputs for a :class:`CacheRows` (``predict_proba`` before its columns)."""
    missing = [b for b in head.backbones_ if b not in rows.paths]
    if missing:
        raise ValueError(f"the head was fitted on backbones {head.backbones_}; the rows lack {missing}")
    rows = rows.select(head.backbones_)
    for b, d in zip(head.backbones_, head.dims_):
        if rows.dims[b] != d:
            raise ValueError(f"backbone {b!r}: expected {d} features per row (as fitted), got {rows.dims[b]}")
    return forward_rows(head.model_, rows)
