"""End to end: image files -> backbones -> saved fused head, as one Keras model.

The head's ``head.json`` names its backbones; the weights they were extracted with are read from
``weights.json`` in the head folder (written by :func:`record_weights`), else from the feature
caches' ``weights`` attribute, or given explicitly.

``catfeat predict --head head/ IMG... [--out out.csv] [--export model.keras]``
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from catfeat.models.registry import Weights, WeightsError, cache_weights

WEIGHTS_FILE = "weights.json"


def record_weights(head_dir: str | os.PathLike, features_dir: str | os.PathLike = "features") -> Path:
    """Write ``head_dir/weights.json``: each backbone of the head -> the ``weights`` attribute of its cache."""
    from catfeat.cache.store import find_cache

    meta = json.loads((Path(head_dir) / "head.json").read_text())
    ids = {name: str(find_cache(name, features_dir).attrs.get("weights")) for name in meta["backbones"]}
    path = Path(head_dir) / WEIGHTS_FILE
    path.write_text(json.dumps(ids, indent=2))
    return path


def resolve_weights(head_dir: str | os.PathLike, backbones: Sequence[str], weights=None,
                    features_dir: str | os.PathLike | None = "features", allow_random: bool = False
                    ) -> dict[str, tuple]:
    """``{backbone: (weights argument, seed)}`` for building the head's backbones.

    ``weights`` (one value for all, or a dict per backbone) wins; else ``weights.json`` in the head
    folder; else the caches in ``features_dir``. A file identity ('sha256:...') needs the file.
    Random weights ('none(seed=N)', or ``weights`` none) raise ``WeightsError`` unless ``allow_random``.
    """
    from catfeat.cache.store import CacheError, find_cache

    recorded_path = Path(head_dir) / WEIGHTS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    out = {}
    for name in backbones:
        given = weights.get(name) if isinstance(weights, dict) else weights
        ident = recorded.get(name)
        if ident is None and features_dir is not None:
            try:
                ident = str(find_cache(name, features_dir).attrs.get("weights"))
            except (CacheError, OSError):
                ident = None
        if given is not None:
            w = Weights.parse(given)
            if w.kind == "file" and str(ident).startswith("sha256:") and w.identity() != ident:
                raise ValueError(f"weights file {given} is not the one the features of {name} were built with")
            out[name] = (w.argument(), w.seed_or(0))
        elif ident is None:
            raise ValueError(f"unknown weights of {name}: save them with catfeat.predict.record_weights(head_dir, "
                             "features_dir), pass --features DIR of the caches, or --weights imagenet|none|PATH")
        else:
            out[name] = cache_weights(ident)
    random = [n for n, (w, _) in out.items() if Weights.parse(w).kind == "none"]
    if random and not allow_random:
        raise WeightsError(f"the head in {head_dir} reads features of random weights ("
                           + ", ".join(f"{n}: none(seed={out[n][1]})" for n in random)
                           + "): they carry no ImageNet knowledge, so its predictions would be meaningless; "
                           "extract with --weights imagenet and refit, or pass --allow-random-weights "
                           "(allow_random=True) to predict anyway")
    return out


def build_predictor(head_dir: str | os.PathLike, weights=None, features_dir: str | os.PathLike | None = "features",
                    allow_random: bool = False):
    """One Keras model: uint8 images (one input per backbone, at its size) -> class probabilities.

    Returns ``(model, head)``; the model's inputs follow ``head.backbones_``, its output is the
    head's (sigmoid P(class 1) for two classes, softmax otherwise). ``allow_random``: see
    :func:`resolve_weights`.
    """
    import keras

    from catfeat.models.registry import get_backbone
    from catfeat.head.estimator import FusedHead
    from catfeat.models.forward import feature_model

    head = FusedHead.load(head_dir)
    head.check_weights()  # a NaN head would answer NaN for every image
    chosen = resolve_weights(head_dir, head.backbones_, weights, features_dir, allow_random)
    inputs, feats = [], []
    for name, dim in zip(head.backbones_, head.dims_):
        spec = get_backbone(name)
        if spec.feature_dim != dim:
            raise ValueError(f"head expects {dim} features from {name}, the backbone gives {spec.feature_dim}")
        w, seed = chosen[name]
        fm = feature_model(spec, w, seed)
        inp = keras.Input((spec.input_size, spec.input_size, 3), dtype="uint8", name=f"image_{spec.name}")
        inputs.append(inp)
        feats.append(fm(inp))
    out = head.model_(feats)
    return keras.Model(inputs, out, name="catfeat_predictor"), head


def _proba(out: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.asarray(out, np.float64)
    return np.column_stack([1.0 - out[:, 0], out[:, 0]]) if n_classes == 2 else out


def predict_images(head_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], weights=None,
                   features_dir: str | os.PathLike | None = "features", batch_size: int = 16,
                   predictor=None, allow_random: bool = False) -> "pd.DataFrame":  # noqa: F821
    """Class probabilities straight from image files: ``file, p_<class>..., label`` (and ``error`` for
    files that could not be decoded). ``predictor``: a ``(model, head)`` from :func:`build_predictor`.

    Raises ``FloatingPointError`` rather than return NaN/Inf probabilities.
    """
    import keras
    import pandas as pd

    from catfeat.models.registry import get_backbone
    from catfeat.images.decoders import decode_image
    from catfeat.images.listing import DecodeError

    model, head = predictor or build_predictor(head_dir, weights, features_dir, allow_random)
    sizes = [get_backbone(n).input_size for n in head.backbones_]
    errors, probs = {}, []
    batch: list[dict] = []
    ok_files: list[str] = []

    def flush():
        if not batch:
            return
        arrays = [np.stack([d[s] for d in batch]) for s in sizes]
        out = keras.ops.convert_to_numpy(model(arrays, training=False))
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if len(bad):
            files = ok_files[len(ok_files) - len(batch):]
            raise FloatingPointError(
                f"the model predicted NaN/Inf for {len(bad)} of {len(batch)} images (e.g. {files[bad[0]]}): "
                "the backbones' features of them are not finite (damaged weights file, or an overflow in "
                "reduced precision); no probabilities written")
        probs.append(_proba(out, len(head.classes_)))
        batch.clear()

    for p in map(str, paths):
        try:
            batch.append(decode_image(p, sorted(set(sizes))))
            ok_files.append(p)
        except DecodeError as e:
            errors[p] = str(e)
        if len(batch) >= batch_size:
            flush()
    flush()
    P = np.concatenate(probs) if probs else np.zeros((0, len(head.classes_)))
    # object, not pandas' Arrow strings: those refuse file names that are not valid UTF-8
    df = pd.DataFrame({"file": pd.Series(ok_files, dtype=object)})
    for i, c in enumerate(head.classes_):
        df[f"p_{c}"] = P[:, i]
    df["label"] = head.classes_[np.argmax(P, axis=1)] if len(P) else []
    if errors:
        bad = pd.DataFrame({"file": pd.Series(list(errors), dtype=object),
                            "error": pd.Series(list(errors.values()), dtype=object)})
        df = pd.concat([df.assign(error=""), bad], ignore_index=True)
    return df


def export(model, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Save ``model``: a ``.keras`` file, or a TensorFlow SavedModel folder (tensorflow backend only).

    An existing ``path`` raises ``FileExistsError`` unless ``overwrite``.
    """
    import keras

    path = Path(path)
    check_new(path, overwrite)
    if path.suffix == ".keras":
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        return f"model {path}"
    if keras.backend.backend() != "tensorflow":
        return f"skipped SavedModel export to {path}: needs the tensorflow backend (now {keras.backend.backend()})"
    model.export(str(path), format="tf_saved_model")
    return f"SavedModel {path}"


def check_new(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing ``path`` unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")


def expand_images(items: Sequence[str]) -> list[str]:
    """The image paths in ``items``: files as given, folders as every image in them (natural order)."""
    from catfeat.images.listing import IMAGE_SUFFIXES, natural_key

    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted((str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        else:
            out.append(str(p))
    return out
