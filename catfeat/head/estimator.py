"""The fused head: one input per backbone -> Concatenate -> Dropout -> Dense, with scikit-learn's API.

``FusedHead`` trains in seconds on cached GAP features and behaves like a scikit-learn classifier
(``fit``/``predict_proba``/``score``, ``clone``, ``get_params``), so the CV, search and comparison
helpers in :mod:`catfeat.head.scoring` work on it as on ``LogisticRegression``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_array, check_is_fitted, column_or_1d, validate_data

from catfeat.models.weights import file_sha256
from catfeat.cache.rows import CacheRows, is_stream
from catfeat.cache.store import check_finite
from catfeat.head.network import (
    compiled_model, forward, passes_per_epoch, record_fit, repeated_rows, schedule, seeded, proba_columns,
    stratified_split, validation_target)
from catfeat.head.scoring import n_rows, plain_value, take_rows
from catfeat.head.streamed import early_stopping, fit_streamed, predict_stream

# What each preset fills in for the hyper-parameters left at None.
# "reference" is the classic bottleneck-features recipe, kept exactly: Dropout 0.5, Dense sigmoid,
# Adam at its default rate, 8 epochs of batch 128, no early stopping, no weight decay.
# "default" was chosen by measurement on real EfficientNet-Lite0/1/2 features of 3,000 photos (5-fold
# CV and a 2,000/1,000 holdout): with early stopping and a rate of 3e-3 the head matches or beats
# LogisticRegression(C=1); dropout 0.2-0.5 and weight decay 0-1e-3 changed log loss by less than the
# noise (~0.002) while dropout doubles the time of an epoch, so the default has none. An epoch budget
# of ~1,200 steps lets 2,000 rows train ~80 epochs (the early stop usually comes at 30-60) and keeps
# 25,000 x 5,632 features at 8 epochs, a few seconds on 2 cores.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"dropout": 0.5, "weight_decay": 0.0, "learning_rate": 1e-3, "epochs": 8, "batch_size": 128,
                  "early_stopping": False, "patience": 0, "max_steps": 0},
    "default": {"dropout": 0.0, "weight_decay": 1e-4, "learning_rate": 3e-3, "epochs": "auto", "batch_size": 128,
                "early_stopping": True, "patience": 10, "max_steps": 1200},
}
_TUNABLE = ("dropout", "weight_decay", "learning_rate", "epochs", "batch_size", "early_stopping", "patience",
            "max_steps")
# Parameters of heads saved by catfeat before tuning moved to catfeat.head.scoring.tune_head; load drops them.
_TUNE_PARAMS = ("tune", "tune_grid", "tune_cv", "tune_max_rows")
FORMAT = "catfeat-head/1"
# Checks of sklearn.utils.estimator_checks that FusedHead fails by design, with the reason; pass it as
# ``check_estimator(head, expected_failed_checks=EXPECTED_FAILED_CHECKS)`` (scikit-learn >= 1.6).
EXPECTED_FAILED_CHECKS: dict[str, str] = {
    "check_sample_weight_equivalence_on_dense_data":
        "mini-batch Adam in float32 on shuffled rows: a weight of 2 equals a repeated row only in expectation, "
        "not to rtol 1e-7 (the rows, batches and validation split differ)",
}


def _widths_json(v):
    """backbone_widths for head.json: a dict stays a dict, a sequence becomes a list of ints."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        return {str(k): int(d) for k, d in v.items()}
    return [int(d) for d in v]


def stack_backbones(blocks: Mapping[str, Any] | Sequence[Any]) -> tuple[np.ndarray, dict[str, int] | tuple[int, ...]]:
    """``(X, widths)``: one (n, sum D) float32 matrix from per-backbone blocks, and how it splits back.

    ``blocks`` is a dict backbone name -> (n, D) array (``widths`` is then a dict name -> D, so the
    head's inputs keep the names) or a list of arrays (``widths`` is a tuple). ``FusedHead(
    backbone_widths=widths).fit(X, y)`` builds the same model as ``FusedHead().fit(blocks, y)``, and
    ``X`` is a plain 2-D matrix for ``cross_val_score``, ``GridSearchCV`` and ``Pipeline``.
    """
    if isinstance(blocks, Mapping):
        names, arrays = [str(k) for k in blocks], list(blocks.values())
    elif isinstance(blocks, (list, tuple)):
        names, arrays = None, list(blocks)
    else:
        raise TypeError(f"blocks must be a dict name -> 2-D array or a list of 2-D arrays, got {type(blocks).__name__}")
    if not arrays:
        raise ValueError("blocks holds no feature arrays")
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    bad = [i for i, a in enumerate(arrays) if a.ndim != 2]
    if bad:
        raise ValueError(f"every block must be 2-D (rows, dims); block {(names or list(range(len(arrays))))[bad[0]]!r} "
                         f"has shape {arrays[bad[0]].shape}")
    if len({a.shape[0] for a in arrays}) > 1:
        raise ValueError("blocks have different row counts: " + ", ".join(str(a.shape[0]) for a in arrays))
    X = np.ascontiguousarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays, axis=1)
    dims = [int(a.shape[1]) for a in arrays]
    return X, (tuple(dims) if names is None else dict(zip(names, dims)))


def _class_weight_json(v):
    """class_weight for head.json: a dict as [label, weight] pairs, so int labels stay ints."""
    if isinstance(v, Mapping):
        return [[plain_value(k), plain_value(w)] for k, w in v.items()]
    return plain_value(v)


class FusedHead(ClassifierMixin, BaseEstimator):
    """Dropout + Dense head on the concatenated features of one or more backbones.

    ``X`` may be a dict backbone name -> (n, D) array, a list of such arrays, or one (n, sum D)
    array. Hyper-parameters left at ``None`` take the value of ``preset``: ``"default"`` (early
    stopping on a shuffled, stratified internal split with the best weights restored, an epoch
    budget of about ``max_steps`` optimizer steps) or ``"reference"`` (the classic recipe: Dropout
    0.5, Adam, 8 epochs, batch 128). ``epochs="auto"`` means ``ceil(max_steps / steps per epoch)``,
    within [8, 200], where on few rows an epoch is several passes over them, enough for
    ``MIN_EPOCH_STEPS`` (10) steps (``params_["passes_per_epoch"]``), so that the step budget and
    the early-stopping patience do not shrink with the data. Tuning is done outside the estimator,
    as scikit-learn's ``GridSearchCV`` does: :func:`catfeat.head.scoring.tune_head` searches
    dropout, weight decay and learning rate by CV and returns the head fitted with the winner.
    ``random_state`` makes fitting reproducible on CPU (``seed`` is its deprecated alias) without
    touching Python's or NumPy's global generators.
    ``class_weight`` (``"balanced"`` or a dict label -> weight) and ``fit(..., sample_weight=...)``
    weight the loss, for in-memory and streamed (``CacheRows``) input alike. A 2-D array, DataFrame
    or list of rows is validated as scikit-learn does (``n_features_in_``, ``feature_names_in_``);
    a dict or list of 2-D arrays is one input per backbone.

    Several backbones through scikit-learn's tools: ``backbone_widths`` (a tuple of ints, or a dict
    backbone name -> int, in column order) says how the columns of a 2-D ``X`` split into backbones.
    ``FusedHead(backbone_widths=(2048, 1536)).fit(X, y)`` on the concatenated matrix builds the same
    model, and with the same ``random_state`` gives the same predictions, as ``FusedHead().fit([A,
    B], y)`` (a dict gives the inputs the backbones' names, as a dict of blocks does); being a plain
    2-D ``X``, it works in ``cross_val_score``, ``GridSearchCV``, ``Pipeline`` and ``clone``.
    :func:`stack_backbones` builds ``(X, widths)`` from a dict of blocks. The widths must sum to the
    number of columns (checked in ``fit``); with dict or list input they must match the blocks.
    """

    def __init__(self, preset: str = "default", dropout: float | None = None, weight_decay: float | None = None,
                 learning_rate: float | None = None, epochs: int | str | None = None,
                 batch_size: int | None = None, early_stopping: bool | None = None,
                 validation_fraction: float = 0.1, patience: int | None = None, max_steps: int | None = None,
                 random_state: int | None = 2019,
                 class_weight: dict | str | None = None, verbose: int = 0, seed: int | None = None,
                 backbone_widths: Sequence[int] | Mapping[str, int] | None = None):
        self.preset = preset
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.max_steps = max_steps
        self.random_state = random_state
        self.class_weight = class_weight
        self.verbose = verbose
        self.seed = seed
        self.backbone_widths = backbone_widths

    def _seed(self) -> int | None:
        """The integer seed in force: ``random_state`` (or the deprecated ``seed``), None for none."""
        rs = self.random_state
        if self.seed is not None:
            warnings.warn("FusedHead(seed=...) is deprecated; use random_state=...", FutureWarning, stacklevel=3)
            rs = self.seed
        if rs is None:
            return None
        if isinstance(rs, np.random.RandomState):
            return int(rs.randint(2**31 - 1))
        if isinstance(rs, np.random.Generator):
            return int(rs.integers(2**31 - 1))
        return int(rs)

    def _widths(self, n_features: int | None = None) -> tuple[list[str], list[int]] | None:
        """(backbone names, widths) of ``backbone_widths``, checked; None when not set.

        ``n_features``: the columns of X, which the widths must sum to.
        """
        w = self.backbone_widths
        if w is None:
            return None
        if isinstance(w, Mapping):
            names, dims = [str(k) for k in w], list(w.values())
        elif isinstance(w, (list, tuple, np.ndarray)) and np.ndim(w) == 1:
            dims = list(w)
            names = [f"input_{i}" for i in range(len(dims))]
        else:
            raise ValueError(f"backbone_widths must be a tuple of ints or a dict name -> int, got {w!r}")
        if not dims:
            raise ValueError("backbone_widths is empty")
        if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims):
            raise ValueError(f"backbone_widths must be integers >= 1, got {w!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"backbone_widths names a backbone twice: {names}")
        dims = [int(d) for d in dims]
        if n_features is not None and sum(dims) != n_features:
            raise ValueError(f"backbone_widths {' + '.join(map(str, dims))} = {sum(dims)} columns, but X has "
                             f"{n_features} columns")
        return names, dims

    def _match_widths(self, keys: Sequence[str], dims: Sequence[int]) -> None:
        """With ``backbone_widths`` set, per-backbone input must have those widths (and names, for a dict)."""
        w = self._widths()
        if w is None:
            return
        names, widths = w
        named = isinstance(self.backbone_widths, Mapping)
        if list(dims) != widths or (named and list(keys) != names):
            got = ", ".join(f"{k} ({d})" for k, d in zip(keys, dims))
            want = ", ".join(f"{k} ({d})" for k, d in zip(names, widths)) if named else ", ".join(map(str, widths))
            raise ValueError(f"backbone_widths say {want}; the per-backbone X has {got}")

    def _labels(self, y, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(classes, class index of each row) of labels ``y`` for ``n`` rows, checked like scikit-learn's."""
        if y is None:
            raise ValueError("FusedHead requires y to be passed, but the target y is None")
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if len(y) != n:
            raise ValueError(f"y must be 1-D with one label per row ({n}), got shape {y.shape}")
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"need at least 2 classes to fit, got 1 class: {classes.tolist()}")
        return classes, y_idx

    def _weights(self, y, sample_weight, n: int) -> np.ndarray | None:
        """Per-row weights: ``sample_weight`` times the ``class_weight`` ones; None when all are 1."""
        if sample_weight is None and self.class_weight is None:
            return None
        w = _check_sample_weight(sample_weight, np.empty((n, 0)), dtype=np.float64)
        if self.class_weight is not None:
            w = w * compute_sample_weight(self.class_weight, column_or_1d(y))
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("sample weights must be finite, >= 0 and not all 0")
        # Mean 1: Keras averages the weighted losses over the batch size, so the scale of the
        # weights would otherwise act as a learning rate.
        return (w * (len(w) / w.sum())).astype(np.float32)

    # -- parameters -------------------------------------------------------------------------------
    def resolved_params(self) -> dict[str, Any]:
        """The hyper-parameters in force: explicit values over those of ``preset``."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        out = dict(PRESETS[self.preset])
        for k in _TUNABLE:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        numbers = {k: out[k] for k in ("dropout", "weight_decay", "learning_rate", "batch_size", "patience",
                                        "max_steps")}
        numbers.update(validation_fraction=self.validation_fraction, epochs=out["epochs"])
        for k, v in numbers.items():
            if k == "epochs" and v == "auto":
                continue
            try:
                finite = math.isfinite(float(v))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ValueError(f"{k} must be a finite number, got {v!r}")
        if not 0 <= float(out["dropout"]) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {out['dropout']}")
        if float(out["weight_decay"]) < 0 or float(out["learning_rate"]) <= 0:
            raise ValueError("weight_decay must be >= 0 and learning_rate > 0, got "
                             f"{out['weight_decay']} and {out['learning_rate']}")
        if not 0 < float(self.validation_fraction) < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if int(out["batch_size"]) < 1:
            raise ValueError(f"batch_size must be >= 1, got {out['batch_size']}")
        if out["epochs"] != "auto" and int(out["epochs"]) < 1:
            raise ValueError(f"epochs must be >= 1 or 'auto', got {out['epochs']}")
        return out

    # -- inputs -----------------------------------------------------------------------------------
    def _inputs(self, X, fitting: bool = False, names: Sequence[str] | None = None,
                what: str = "row") -> list[np.ndarray]:
        """X as a list of float32 arrays in the fitted backbone order, checked against fitted dims.

        A dict (backbone -> 2-D array) or a list of 2-D arrays is one input per backbone; anything
        else (an array, a DataFrame, a list of rows) is one 2-D array, validated as scikit-learn does
        (``n_features_in_``, ``feature_names_in_``). Rows holding NaN/Inf are refused: named (by
        ``names`` or index) for backbone inputs and whenever ``names`` is given.
        """
        if isinstance(X, Mapping) and not issparse(X):  # scipy's dok sparse format is a dict
            keys = [str(k) for k in X]
            arrays = [X[k] for k in X]
            if not fitting:
                have = dict(zip(keys, arrays))
                missing = [n for n in self.backbones_ if n not in have]
                extra = [k for k in keys if k not in self.backbones_]
                if missing or extra:
                    raise ValueError(f"the head was fitted on backbones {self.backbones_}; X "
                                     + (f"lacks {missing}" if missing else "")
                                     + ("; " if missing and extra else "")
                                     + (f"has unknown {extra}" if extra else ""))
                keys, arrays = list(self.backbones_), [have[n] for n in self.backbones_]
        elif isinstance(X, (list, tuple)) and len(X) and all(np.ndim(a) == 2 for a in X):
            arrays = list(X)
            keys = [f"input_{i}" for i in range(len(arrays))] if fitting else list(self.backbones_)
            if not fitting and len(arrays) != len(self.backbones_):
                raise ValueError(f"the head was fitted on {len(self.backbones_)} inputs {self.backbones_}; "
                                 f"got a list of {len(arrays)}")
        else:
            try:
                a = validate_data(self, X, reset=fitting, dtype=np.float32, ensure_all_finite=names is None)
            except ValueError as e:
                if not fitting and len(self.dims_) > 1 and "features, but" in str(e):
                    raise ValueError(f"X has {np.shape(X)[1]} columns; the head was fitted on "
                                     + " + ".join(f"{n} ({d})" for n, d in zip(self.backbones_, self.dims_))
                                     + f" = {sum(self.dims_)}") from None
                raise
            if fitting:
                w = self._widths(a.shape[1])
                if w is None:
                    keys, arrays = ["features"], [a]
                else:  # one concatenated matrix, split into the backbones' inputs
                    keys, arrays = w[0], np.split(a, np.cumsum(w[1])[:-1], axis=1)
            elif len(self.dims_) > 1:
                # One concatenated array for a multi-backbone head: split it in the fitted order.
                keys, arrays = list(self.backbones_), np.split(a, np.cumsum(self.dims_)[:-1], axis=1)
            else:
                keys, arrays = list(self.backbones_), [a]
            out = [np.ascontiguousarray(v, dtype=np.float32) for v in arrays]
            if fitting:
                self.backbones_, self.dims_ = list(keys), [int(v.shape[1]) for v in out]
            if names is not None:
                check_finite(dict(zip(keys, out)), names, what)
            return out
        if not arrays:
            raise ValueError("X holds no feature arrays")
        out = []
        for k, a in zip(keys, arrays):
            if np.ndim(a) != 2:
                raise ValueError(f"features of {k!r} must be 2-D (rows, dims), got shape {np.shape(a)}")
            out.append(np.ascontiguousarray(check_array(a, dtype=np.float32, ensure_all_finite=False,
                                                        input_name=f"X[{k!r}]"), dtype=np.float32))
        rows = {a.shape[0] for a in out}
        if len(rows) > 1:
            raise ValueError("backbones have different row counts: "
                             + ", ".join(f"{k}: {a.shape[0]}" for k, a in zip(keys, out)))
        if fitting:
            self._fitted_inputs(keys, [int(a.shape[1]) for a in out])
        else:
            for k, a, d in zip(keys, out, self.dims_):
                if a.shape[1] != d:
                    raise ValueError(f"backbone {k!r}: expected {d} features per row (as fitted), got {a.shape[1]}")
        check_finite(dict(zip(keys, out)), names, what)
        return out

    # -- fitting ----------------------------------------------------------------------------------
    def _fitted_inputs(self, keys: Sequence[str], dims: Sequence[int]) -> None:
        """Record per-backbone training input (``backbones_``, ``dims_``, ``n_features_in_``),
        checked against ``backbone_widths``."""
        self._match_widths(keys, dims)
        self.backbones_ = list(keys)
        self.dims_ = [int(d) for d in dims]
        self.n_features_in_ = int(sum(self.dims_))
        self.__dict__.pop("feature_names_in_", None)

    def _training_data(self, X) -> list[np.ndarray] | CacheRows:
        """The training rows: a :class:`CacheRows` in the order of its backbones (read in blocks
        when training), or the arrays of :meth:`_inputs`."""
        if is_stream(X):
            self._fitted_inputs(X.backbones, [X.dims[b] for b in X.backbones])
            return X
        return self._inputs(X, fitting=True, what="training row")

    def fit(self, X, y, validation_data: tuple | None = None, sample_weight=None) -> "FusedHead":
        """Train on ``X`` (dict/list/array of features, or a streamed ``CacheRows``) and labels ``y``
        (any 2+ distinct values).

        Early stopping holds out a shuffled, stratified ``validation_fraction`` of the rows unless
        ``validation_data=(X_val, y_val)`` (or ``(X_val, y_val, sample_weight_val)``) is given.
        ``sample_weight`` (one per row; for a ``CacheRows``, per row in its aligned order) and
        ``class_weight`` weight the training loss and the validation log loss of the internal split.
        A ``CacheRows`` is read from the caches in blocks (:mod:`catfeat.head.streamed`), by the same
        recipe. Seeds the backend with ``random_state`` and leaves Python's and NumPy's global random
        generators as they were.
        """
        p = self.resolved_params()
        for attr in ("model_", "history_", "params_", "n_epochs_", "feature_recipes_"):
            self.__dict__.pop(attr, None)
        seed = self._seed()
        data = self._training_data(X)
        classes, y_idx = self._labels(y, n_rows(data))
        weights = self._weights(column_or_1d(y), sample_weight, len(y_idx))
        self.classes_ = classes
        k = len(classes)
        target = y_idx.astype(np.float32 if k == 2 else np.int32)

        val = None
        train, train_target, train_w = data, target, weights
        if p["early_stopping"]:
            if validation_data is not None:
                Xv, yv = validation_data[:2]
                wv = validation_data[2] if len(validation_data) > 2 else None
                val = (Xv.select(self.backbones_) if is_stream(Xv) else self._inputs(Xv, what="validation row"),
                       *validation_target(classes, yv, wv, target.dtype))
            else:
                tr, va = stratified_split(y_idx, self.validation_fraction, seed)
                # Rows are taken by index, not by Keras's validation_split, which would take the last
                # rows (all dogs in a sorted cat/dog list).
                train, train_target = take_rows(data, tr), target[tr]
                train_w = None if weights is None else weights[tr]
                val = (take_rows(data, va), target[va], None if weights is None else weights[va])

        n_train = n_rows(train)
        batch, epochs = schedule(p, n_train)
        passes = passes_per_epoch(p, n_train)
        rep = repeated_rows(n_train, passes)
        if rep is not None:  # few rows: one epoch is several passes over them
            train, train_target = take_rows(train, rep), train_target[rep]
            train_w = None if train_w is None else train_w[rep]
        with seeded(seed):
            model = compiled_model(self.dims_, self.backbones_, k, p)
            stopper = early_stopping(val, int(p["patience"]), k) if val is not None else None
            callbacks = [stopper] if stopper else []
            if is_stream(train):
                hist = fit_streamed(model, train, train_target, train_w, batch, epochs, seed, callbacks, self.verbose)
            else:
                hist = model.fit(train, train_target, sample_weight=train_w, batch_size=batch, epochs=epochs,
                                 shuffle=True, callbacks=callbacks, verbose=self.verbose)
        return record_fit(self, model, hist, p, batch, epochs, stopper, passes)

    # -- predicting -------------------------------------------------------------------------------
    def predict_proba(self, X, names: Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in the order of ``classes_``.

        Refuses rows whose features hold NaN/Inf (``names``, one per row, name them in the error)
        and a head whose weights are not finite, rather than return NaN probabilities.
        """
        check_is_fitted(self)
        self.check_weights()
        if is_stream(X):
            out = predict_stream(self, X)
        else:
            out = forward(self.model_, self._inputs(X, names=names))
        if not np.isfinite(out).all():
            raise FloatingPointError(f"the head predicted NaN/Inf for {int((~np.isfinite(out)).any(1).sum())} "
                                     "rows from finite features and weights")
        return proba_columns(out, len(self.classes_))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row (labels as given to ``fit``)."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def check_weights(self) -> None:
        """Raise ``FloatingPointError`` if the trained weights hold NaN/Inf (training diverged)."""
        check_is_fitted(self, "model_")
        bad = [v.path for v in self.model_.weights if not np.isfinite(keras.ops.convert_to_numpy(v)).all()]
        if bad:
            rate = getattr(self, "params_", {}).get("learning_rate")
            raise FloatingPointError(f"the head's trained weights hold NaN/Inf ({', '.join(bad)}): training diverged"
                                     + (f" (learning rate {rate:g})" if isinstance(rate, (int, float)) else "")
                                     + "; refit with a lower learning rate")

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike,
             features: str | os.PathLike | Mapping[str, Mapping] | None = None) -> Path:
        """Write ``head.keras`` and ``head.json`` (params, backbones, dims, classes) into ``directory``.

        ``features``: the folder of the caches the head was fitted on, or ``{backbone: cache
        attributes}``; ``head.json`` then records per backbone how its features were made (weights,
        input size, preprocessing, precision, TTA, decoder, dtype: ``store.RECIPE_FIELDS``), which
        ``catfeat predict`` repeats. Without it, a record read by :meth:`load` is kept. Each file is
        written under a temporary name and renamed, and ``head.json`` holds the SHA-256 of
        ``head.keras``, so a head interrupted mid-save is refused rather than mixed with an older one.
        """
        check_is_fitted(self, "model_")
        self.check_weights()  # a NaN head saved would predict NaN for every image
        recipes = getattr(self, "feature_recipes_", None)
        if features is not None:
            from catfeat.cache.store import feature_recipe, feature_recipes

            recipes = (feature_recipes(self.backbones_, features) if isinstance(features, (str, os.PathLike))
                       else {k: feature_recipe(dict(v)) for k, v in features.items()})
            missing = [b for b in self.backbones_ if b not in recipes]
            if missing:
                raise ValueError(f"features names no recipe for the head's backbones {missing}")
            recipes = {b: recipes[b] for b in self.backbones_}
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp_model = d / f".head.{os.getpid()}.tmp.keras"  # Keras insists on the .keras suffix
        tmp_meta = d / f".head.{os.getpid()}.tmp.json"
        try:
            self.model_.save(tmp_model)
            from catfeat import __version__

            meta = {"format": FORMAT, "catfeat_version": __version__,
                    "params": {k: _class_weight_json(v) if k == "class_weight" else
                               _widths_json(v) if k == "backbone_widths" else plain_value(v)
                               for k, v in self.get_params().items()},
                    "resolved_params": {k: plain_value(v) for k, v in self.params_.items()},
                    "backbones": list(self.backbones_), "dims": list(self.dims_),
                    "classes": [plain_value(c) for c in self.classes_.tolist()], "n_epochs": self.n_epochs_,
                    "model_sha256": file_sha256(tmp_model)}
            if recipes is not None:
                meta["features"] = recipes
            if hasattr(self, "feature_names_in_"):  # fitted on a DataFrame
                meta["feature_names_in"] = [str(c) for c in self.feature_names_in_]
            tmp_meta.write_text(json.dumps(meta, indent=2))
            os.replace(tmp_model, d / "head.keras")
            os.replace(tmp_meta, d / "head.json")
        finally:
            tmp_model.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        if recipes is not None:
            self.feature_recipes_ = recipes
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FusedHead":
        """Read a head written by :meth:`save`.

        A damaged or edited head raises :class:`HeadFileError` (a ``ValueError``) naming the file
        and what is wrong: invalid JSON, unknown parameters, a class list or widths that do not fit
        the model, a ``head.keras`` that is not the one saved with this ``head.json``.
        """
        d = Path(directory)
        meta = read_head_meta(d)
        meta_path, model_path = d / "head.json", d / "head.keras"
        params = dict(meta["params"])
        if isinstance(params.get("class_weight"), list):  # a dict, saved as pairs to keep int labels
            params["class_weight"] = {k: v for k, v in params["class_weight"]}
        if isinstance(params.get("backbone_widths"), list):  # a tuple, saved as a JSON list
            params["backbone_widths"] = tuple(params["backbone_widths"])
        if "random_state" not in params and "seed" in params:  # saved before random_state
            params["random_state"] = params.pop("seed")
        for k in _TUNE_PARAMS:  # saved before tuning moved out of the estimator: the search, not the model
            params.pop(k, None)
        unknown = sorted(set(params) - set(cls._get_param_names()))
        if unknown:
            raise HeadFileError(f"{meta_path}: 'params' holds unknown key(s) {unknown}, not parameters of FusedHead "
                                f"(saved by catfeat {meta.get('catfeat_version', '?')}); remove them, or re-save "
                                "the head (catfeat fit --save DIR)")
        head = cls(**params)
        if meta.get("model_sha256") is not None and file_sha256(model_path) != meta["model_sha256"]:
            raise HeadFileError(f"{model_path} is not the model saved with {meta_path} (its SHA-256 differs from "
                                "the one recorded there: replaced, damaged, or a save was interrupted); "
                                "re-save the head (catfeat fit --save DIR)")
        try:
            head.model_ = keras.saving.load_model(model_path, compile=False)
        except Exception as e:  # a damaged zip fails deep inside Keras, in many ways
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise HeadFileError(f"{model_path} cannot be loaded as a Keras model ({type(e).__name__}"
                                f"{': ' + why[:200] if why else ''}); re-save the head (catfeat fit --save DIR)"
                                ) from None
        head.backbones_ = list(meta["backbones"])
        head.dims_ = [int(v) for v in meta["dims"]]
        head.classes_ = np.asarray(meta["classes"])
        _check_model_fits(head.model_, meta, meta_path, model_path)
        head.n_features_in_ = int(sum(head.dims_))
        if meta.get("feature_names_in") is not None:
            head.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
        head.params_ = meta.get("resolved_params", {})
        head.n_epochs_ = meta.get("n_epochs")
        head.history_ = {}
        if meta.get("features") is not None:
            head.feature_recipes_ = meta["features"]
        return head


class HeadFileError(ValueError):
    """A saved head (``head.json`` / ``head.keras``) is missing, damaged or edited; the message names the file."""


def _is_label(v) -> bool:
    return isinstance(v, (str, int, float))  # bool is an int: labels may be True/False


def read_head_meta(directory: str | os.PathLike) -> dict:
    """``head.json`` of a saved head, checked for its shape (not yet against ``head.keras``).

    Raises :class:`HeadFileError` naming the file and what is wrong, ``FileNotFoundError`` when
    a file is missing.
    """
    d = Path(directory)
    meta_path, model_path = d / "head.json", d / "head.keras"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} holds no saved head: no such folder (save one with catfeat fit --save DIR)")
    missing = [p.name for p in (meta_path, model_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{d} holds no saved head: {' and '.join(missing)} missing (a saved head is "
                                "head.json + head.keras; save one with catfeat fit --save DIR)")
    try:
        meta = json.loads(meta_path.read_bytes())
    except json.JSONDecodeError as e:
        raise HeadFileError(f"{meta_path} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}); "
                            "restore it or re-save the head (catfeat fit --save DIR)") from None
    except UnicodeDecodeError:
        raise HeadFileError(f"{meta_path} is not valid JSON (not UTF-8 text); restore it or re-save the head "
                            "(catfeat fit --save DIR)") from None

    def bad(what: str) -> HeadFileError:
        return HeadFileError(f"{meta_path}: {what}; restore it or re-save the head (catfeat fit --save DIR)")

    if not isinstance(meta, dict):
        raise bad(f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise HeadFileError(f"{meta_path} is not a catfeat head (format {meta.get('format')!r}, expected {FORMAT!r})")
    if not isinstance(meta.get("params"), dict):
        raise bad("'params' is missing or not an object")
    backbones, dims, classes = meta.get("backbones"), meta.get("dims"), meta.get("classes")
    if not isinstance(backbones, list) or not backbones or not all(isinstance(b, str) for b in backbones):
        raise bad(f"'backbones' must be a non-empty list of names, got {backbones!r}")
    if len(set(backbones)) != len(backbones):
        raise bad(f"'backbones' names a backbone twice: {backbones}")
    if (not isinstance(dims, list) or len(dims) != len(backbones)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in dims)):
        raise bad(f"'dims' must be one width >= 1 per backbone ({len(backbones)}), got {dims!r}")
    if not isinstance(classes, list) or len(classes) < 2 or not all(_is_label(c) for c in classes):
        raise bad(f"'classes' must be a list of at least 2 class labels, got {classes!r}")
    if len(set(map(str, classes))) != len(classes):
        raise bad(f"'classes' names a class twice: {classes}")
    feats = meta.get("features")
    if feats is not None and (not isinstance(feats, dict) or set(feats) != set(backbones)
                              or not all(isinstance(v, dict) for v in feats.values())):
        raise bad(f"'features' must hold one record per backbone {backbones}, got {feats!r}"[:400])
    return meta


def _check_model_fits(model, meta: dict, meta_path: Path, model_path: Path) -> None:
    """The model's inputs and outputs must be those ``head.json`` describes (an edited file would
    otherwise mislabel columns or fail deep inside Keras)."""
    classes, dims = meta["classes"], meta["dims"]
    shapes = [tuple(t.shape) for t in model.inputs]
    widths = [s[-1] for s in shapes]
    if widths != dims:
        raise HeadFileError(f"{meta_path} says the head reads {len(dims)} input(s) of widths {dims}, but {model_path} "
                            f"reads {len(widths)} of widths {widths}: they do not belong together; restore the "
                            "file or re-save the head (catfeat fit --save DIR)")
    outputs = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
    want = 1 if len(classes) == 2 else len(classes)
    if outputs != want:
        raise HeadFileError(f"{meta_path} lists {len(classes)} classes {classes}, but {model_path} has "
                            f"{outputs if outputs is not None else len(model.outputs)} output(s), which is a head "
                            f"of {2 if outputs == 1 else outputs} classes (2 classes: 1 sigmoid output, K > 2: K "
                            "outputs); the class list does not belong to this model: restore it or re-save the head "
                            "(catfeat fit --save DIR)")
