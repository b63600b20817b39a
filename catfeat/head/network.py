"""The Keras side of the fused head, shared by :mod:`catfeat.head.estimator` (in-memory rows) and
:mod:`catfeat.head.streamed` (rows read from the caches in blocks): the model, seeding, the chunked
forward pass, the log-loss early stopping and the stratified validation split.

Neither of those modules is imported here, so both can import it without a cycle.
"""
from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager
from typing import Sequence

import keras
import numpy as np

# epochs="auto": about max_steps optimizer steps, within these bounds (tiny sets have ~2 steps an epoch).
MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS = 8, 200
# epochs="auto" on few rows: an epoch makes enough passes over them for at least this many optimizer
# steps. The default preset was measured on ~1,800 training rows (15 steps an epoch): counted in epochs,
# its step budget and its patience would shrink with the data, and 45 rows (one step a pass) stopped
# after 200 steps of Adam, far from trained (scikit-learn's check_class_weight_classifiers failed).
MIN_EPOCH_STEPS = 10


def _layer_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "input"
    if not base[0].isalpha():
        base = "f_" + base
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


def build_model(dims: Sequence[int], names: Sequence[str], n_classes: int, dropout: float,
                weight_decay: float = 0.0):
    """The head as a Keras model: one Input per backbone -> Concatenate -> Dropout -> Dense.

    Binary labels get ``Dense(1, sigmoid)``; more classes get ``Dense(K, softmax)``. ``weight_decay``
    is an L2 penalty on the kernel, scaled like the mean loss.
    """
    taken: set[str] = set()
    inputs = [keras.Input((int(d),), name=_layer_name(n, taken)) for d, n in zip(dims, names)]
    x = inputs[0] if len(inputs) == 1 else keras.layers.Concatenate(name="concat")(inputs)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    if n_classes == 2:
        out = keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=reg, name="output")(x)
    else:
        out = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg, name="output")(x)
    return keras.Model(inputs, out, name="fused_head")


@contextmanager
def seeded(seed: int | None):
    """Seed Keras (backend, Python, NumPy) with ``seed`` for the block, then give Python's and NumPy's
    global generators back their state: fitting a head must not change what ``np.random`` draws next."""
    if seed is None:
        yield
        return
    py, npy = random.getstate(), np.random.get_state()
    try:
        keras.utils.set_random_seed(int(seed))
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def forward(model, arrays: list[np.ndarray], chunk: int = 8192) -> np.ndarray:
    """Model outputs as float64 numpy, by direct calls in chunks.

    A plain call skips ``model.predict``'s per-model tf.function tracing, which costs more than
    the forward pass of a Dense layer and floods the log with retracing warnings in CV loops.
    """
    n = arrays[0].shape[0]
    outs = [keras.ops.convert_to_numpy(model([a[i:i + chunk] for a in arrays], training=False))
            for i in range(0, n, chunk)]
    return np.concatenate(outs).astype(np.float64) if outs else np.zeros((0, model.output_shape[-1]))


class LogLossEarlyStopping(keras.callbacks.Callback):
    """Stop when the validation log loss has not improved for ``patience`` epochs; keep the best weights.

    Scores with a direct forward pass (Keras's per-epoch ``evaluate`` machinery cost about a third
    of the training time on small sets) and on the log loss alone, without the L2 term.
    """

    def __init__(self, val, patience: int, n_classes: int):
        super().__init__()
        self.val_arrays, self.val_y = val[:2]
        self.val_w = val[2] if len(val) > 2 else None
        self.patience, self.n_classes = patience, n_classes
        self.losses: list[float] = []
        self.best, self.best_epoch, self.best_weights = np.inf, -1, None

    def predict_validation(self) -> np.ndarray:
        """The model's outputs for the validation rows (a subclass may read them from elsewhere)."""
        return forward(self.model, self.val_arrays)

    def on_epoch_end(self, epoch, logs=None):
        p = np.clip(self.predict_validation(), 1e-7, 1 - 1e-7)
        y = self.val_y.astype(np.int64)
        pt = np.where(y == 1, p[:, 0], 1 - p[:, 0]) if self.n_classes == 2 else p[np.arange(len(y)), y]
        loss = float(-np.average(np.log(pt), weights=self.val_w))
        self.losses.append(loss)
        if loss < self.best:
            self.best, self.best_epoch, self.best_weights = loss, epoch, self.model.get_weights()
        elif epoch - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def proba_columns(out: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities from the head's output: two classes have one sigmoid column (class 1),
    returned as the two columns ``[1 - p, p]``; more classes are returned as they are."""
    if n_classes == 2:
        p = out[:, 0]
        return np.column_stack([1.0 - p, p])
    return out


def stratified_split(y_idx: np.ndarray, fraction: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled, stratified (train, validation) row indices."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    idx = np.arange(len(y_idx))
    counts = np.bincount(y_idx)
    stratify = y_idx if counts.min() >= 2 and round(fraction * len(y_idx)) >= len(counts) else None
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(tr), np.sort(va)


def passes_per_epoch(p: dict, n: int) -> int:
    """Passes over ``n`` training rows that make one epoch under resolved params ``p``: 1, except with
    ``epochs="auto"`` on rows too few for ``MIN_EPOCH_STEPS`` optimizer steps a pass."""
    if p["epochs"] != "auto" or n < 1:
        return 1
    return math.ceil(MIN_EPOCH_STEPS / math.ceil(n / int(min(p["batch_size"], n))))


def schedule(p: dict, n: int) -> tuple[int, int]:
    """(batch size, epochs) for ``n`` training rows under resolved params ``p`` (epochs="auto":
    about ``max_steps`` optimizer steps, within ``MIN_AUTO_EPOCHS .. MAX_AUTO_EPOCHS`` epochs of
    :func:`passes_per_epoch` passes each)."""
    batch = int(min(p["batch_size"], n))
    epochs = p["epochs"]
    if epochs == "auto":
        steps = math.ceil(n * passes_per_epoch(p, n) / batch)
        epochs = min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(int(p["max_steps"]) / steps)))
    return batch, int(epochs)


def repeated_rows(n: int, passes: int) -> np.ndarray | None:
    """Row indices that repeat ``n`` rows ``passes`` times (one epoch of several passes; the fit
    shuffles them), or None for a single pass."""
    return None if passes <= 1 else np.tile(np.arange(n), passes)


def compiled_model(dims: Sequence[int], names: Sequence[str], n_classes: int, p: dict):
    """:func:`build_model` compiled with Adam and the log loss, under resolved params ``p``
    (call inside :func:`seeded`)."""
    model = build_model(dims, names, n_classes, float(p["dropout"]), float(p["weight_decay"]))
    model.compile(optimizer=keras.optimizers.Adam(float(p["learning_rate"])),
                  loss="binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy",
                  jit_compile=False)
    return model


def validation_target(classes: np.ndarray, y, sample_weight, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions in ``classes`` of validation labels ``y`` (as ``dtype``) and their checked weights."""
    from sklearn.utils.validation import _check_sample_weight, column_or_1d

    y = column_or_1d(y)
    pos = np.searchsorted(classes, y)
    k = len(classes)
    if np.any(pos >= k) or np.any(classes[np.minimum(pos, k - 1)] != y):
        raise ValueError("validation labels hold classes not seen in y")
    w = None if sample_weight is None else _check_sample_weight(sample_weight, np.empty((len(pos), 0)))
    return pos.astype(dtype), w


def record_fit(head, model, history, p: dict, batch: int, epochs: int, stopper=None, passes: int = 1):
    """Set a fitted head's ``model_``, ``history_``, ``params_`` (with ``passes_per_epoch``) and
    ``n_epochs_``; returns ``head``."""
    head.model_ = model
    head.history_ = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    head.params_ = {**p, "epochs": epochs, "batch_size": batch, "passes_per_epoch": passes}
    if stopper is not None:
        head.history_["val_log_loss"] = stopper.losses
        head.n_epochs_ = stopper.best_epoch + 1
    else:
        head.n_epochs_ = epochs
    return head
