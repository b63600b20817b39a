"""``FusedHead.fit`` and ``predict_proba`` on a :class:`catfeat.cache.rows.CacheRows`: the head's recipe,
reading the rows from the caches in blocks (through a Keras ``PyDataset``, every backend).

Kept apart from :mod:`catfeat.cache.rows`, which reads and orders rows and knows nothing of the head,
so that the scoring helpers of :mod:`catfeat.head.scoring` can take streamed rows without importing it.
"""
from __future__ import annotations


import numpy as np

from catfeat.cache import rows as streaming
from catfeat.cache.rows import CacheRows, EpochBatches, is_stream


def _py_dataset_base():
    import keras

    return keras.utils.PyDataset


def _keras_batches(batches: EpochBatches):
    base = _py_dataset_base()

    class _Batches(base):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)

        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            x, *rest = batches.batch_at(int(i))
            return ((x[0] if len(x) == 1 else x), *rest)

        def on_epoch_end(self):
            batches.next_epoch()

    return _Batches()


def _early_stopping_class():
    from catfeat.head.network import LogLossEarlyStopping

    class _StreamEarlyStopping(LogLossEarlyStopping):
        """Early stopping scored on validation rows streamed from the caches each epoch."""

        def predict_validation(self) -> np.ndarray:
            return forward_rows(self.model, self.val_arrays)

    return _StreamEarlyStopping


def forward_rows(model, rows: CacheRows, block_rows: int | None = None) -> np.ndarray:
    """Model outputs (float64) for every row, reading ``block_rows`` rows at a time."""
    from catfeat.head.network import forward

    outs = [forward(model, arrays) for _, arrays in rows.blocks(block_rows)]
    return np.concatenate(outs) if outs else np.zeros((0, model.output_shape[-1]))


def predict_stream(head, rows: CacheRows) -> np.ndarray:
    """``head.predict_proba`` for a :class:`CacheRows`."""
    missing = [b for b in head.backbones_ if b not in rows.paths]
    if missing:
        raise ValueError(f"the head was fitted on backbones {head.backbones_}; the rows lack {missing}")
    rows = rows.select(head.backbones_)
    for b, d in zip(head.backbones_, head.dims_):
        if rows.dims[b] != d:
            raise ValueError(f"backbone {b!r}: expected {d} features per row (as fitted), got {rows.dims[b]}")
    return forward_rows(head.model_, rows)


def fit_stream(head, rows: CacheRows, y, validation_data=None, block_rows: int | None = None,
               buffer_rows: int | None = None, sample_weight=None):
    """``FusedHead.fit`` from a :class:`CacheRows`: the same recipe, reading the rows in blocks.

    ``sample_weight`` (one per row of ``rows``) and ``head.class_weight`` weight the loss as in memory:
    the per-row weights (mean 1) are held in memory and served with each batch.
    """
    from sklearn.utils.validation import column_or_1d

    from catfeat.head.network import (
        compiled_model, passes_per_epoch, record_fit, repeated_rows, schedule, seeded, stratified_split,
        validation_target)

    p = head.resolved_params()
    for attr in ("model_", "history_", "params_", "n_epochs_", "tuning_", "best_params_", "feature_recipes_"):
        head.__dict__.pop(attr, None)
    seed = head._seed()
    classes, y_idx = head._labels(y, len(rows))
    weights = head._weights(column_or_1d(y), sample_weight, len(y_idx))
    head._match_widths(rows.backbones, [rows.dims[b] for b in rows.backbones])
    head.__dict__.pop("feature_names_in_", None)
    head.backbones_ = rows.backbones
    head.dims_ = [rows.dims[b] for b in rows.backbones]
    head.classes_ = classes
    head.n_features_in_ = int(sum(head.dims_))
    k = len(classes)
    target = y_idx.astype(np.float32 if k == 2 else np.int32)
    if head.tune:
        head._tune_first(rows, y_idx, seed, p)

    val = None
    train_rows, train_target, train_w = rows, target, weights
    if p["early_stopping"]:
        if validation_data is not None:
            Xv, yv = validation_data[:2]
            wv = validation_data[2] if len(validation_data) > 2 else None
            val = (Xv.select(head.backbones_) if is_stream(Xv) else head._inputs(Xv),
                   *validation_target(classes, yv, wv, target.dtype))
        else:
            tr, va = stratified_split(y_idx, head.validation_fraction, seed)
            train_rows, train_target = rows.subset(tr), target[tr]
            train_w = None if weights is None else weights[tr]
            val = (rows.subset(va), target[va], None if weights is None else weights[va])
        if is_stream(val[0]) and val[0].nbytes <= streaming.VAL_IN_MEMORY_BYTES:
            val = (val[0].read(), *val[1:])  # small enough: read once, score like the in-memory path

    batch, epochs = schedule(p, len(train_rows))
    passes = passes_per_epoch(p, len(train_rows))
    rep = repeated_rows(len(train_rows), passes)
    if rep is not None:  # few rows: one epoch is several passes, as in memory
        train_rows, train_target = train_rows.subset(rep), train_target[rep]
        train_w = None if train_w is None else train_w[rep]
    with seeded(seed):
        model = compiled_model(head.dims_, head.backbones_, k, p)
        stopper = None
        if val is not None:
            from catfeat.head.network import LogLossEarlyStopping

            cls = _early_stopping_class() if is_stream(val[0]) else LogLossEarlyStopping
            stopper = cls(val, int(p["patience"]), k)
        batches = EpochBatches(train_rows, train_target, batch, seed, block_rows, buffer_rows, weights=train_w)
        # shuffle=False: Keras would otherwise ask for the batches in random order, reading every
        # buffer again for each batch; the rows are shuffled by EpochBatches.
        try:
            hist = model.fit(_keras_batches(batches), epochs=epochs, shuffle=False,
                             callbacks=[stopper] if stopper else [], verbose=head.verbose)
        finally:
            batches.close()
    return record_fit(head, model, hist, p, batch, epochs, stopper, passes)
