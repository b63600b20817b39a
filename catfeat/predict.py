"""End to end: image files -> backbones -> saved fused head, as one Keras model.

The head's ``head.json`` names its backbones and records how their features were made (weights,
precision, TTA, decoder, storage dtype: ``FusedHead.save(dir, features=...)``, done by ``catfeat fit
--save``); the predictor repeats it with the extraction's own functions (``runtime.feature_model``,
the ``decoders`` table). The weights of a head saved without that record are read from
``weights.json`` in the head folder (written by :func:`record_weights`), else from the feature
caches' ``weights`` attribute, or given explicitly; its features use today's defaults.

``catfeat predict --head head/ IMG... [--out out.csv] [--export model.keras]``
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from catfeat.images.listing import ByteBudget
from catfeat.images.sources import is_url
from catfeat.models.weights import Weights, WeightsError, cache_weights

WEIGHTS_FILE = "weights.json"
# How a head saved without a record of its features (before catfeat recorded it) is predicted: the
# defaults of extraction then (auto decoder, no TTA, float32 model and storage).
DEFAULT_RECIPE = {"precision": "float32", "tta": "none", "decoder": "auto", "dtype": "float32"}


class UnrecordedFeaturesWarning(UserWarning):
    """A saved head does not record how its features were made; predict assumes today's defaults."""


def record_weights(head_dir: str | os.PathLike, features_dir: str | os.PathLike = "features") -> Path:
    """Write ``head_dir/weights.json``: each backbone of the head -> the ``weights`` attribute of its cache."""
    from catfeat.cache.store import find_cache

    meta = json.loads((Path(head_dir) / "head.json").read_text())
    ids = {name: str(find_cache(name, features_dir).attrs.get("weights")) for name in meta["backbones"]}
    path = Path(head_dir) / WEIGHTS_FILE
    path.write_text(json.dumps(ids, indent=2))
    return path


def record_features(head_dir: str | os.PathLike, features_dir: str | os.PathLike = "features") -> Path:
    """Record in ``head_dir/head.json`` how the features of each backbone were made, read from the
    caches in ``features_dir`` (for a head saved without it; ``catfeat fit --save`` records it)."""
    from catfeat.head.estimator import FusedHead

    head = FusedHead.load(head_dir)
    return head.save(head_dir, features=features_dir)


def _recorded_recipes(head_dir: str | os.PathLike) -> dict:
    """The ``features`` record of ``head.json``; {} when absent or unreadable (``FusedHead.load`` names why)."""
    from catfeat.head.estimator import read_head_meta

    try:
        return read_head_meta(head_dir).get("features") or {}
    except (OSError, ValueError):
        return {}


def resolve_weights(head_dir: str | os.PathLike, backbones: Sequence[str], weights=None,
                    features_dir: str | os.PathLike | None = "features", allow_random: bool = False
                    ) -> dict[str, tuple]:
    """``{backbone: (weights argument, seed)}`` for building the head's backbones.

    ``weights`` (one value for all, or a dict per backbone) wins; else the record in ``head.json``;
    else ``weights.json`` in the head folder; else the caches in ``features_dir``. A file identity ('sha256:...') needs the file.
    Random weights ('none(seed=N)', or ``weights`` none) raise ``WeightsError`` unless ``allow_random``.
    """
    from catfeat.cache.store import CacheError, find_cache

    recorded_path = Path(head_dir) / WEIGHTS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    recipes = _recorded_recipes(head_dir)
    out = {}
    for name in backbones:
        given = weights.get(name) if isinstance(weights, dict) else weights
        ident = (recipes.get(name) or {}).get("weights") or recorded.get(name)
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


def feature_steps(head, head_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """``{backbone: {"precision", "tta", "decoder", "dtype"}}``: how predict computes each backbone's
    features for ``head`` (a loaded ``FusedHead``): as recorded in its ``head.json``, checked against
    the backbone and this installation, or :data:`DEFAULT_RECIPE` for a head saved without a record.

    Raises ``ValueError`` (one line, naming ``head_dir/head.json``) when a recorded step cannot be
    repeated here: another input size or preprocessing, features made elsewhere, an unknown
    TTA/precision/dtype, a decoder that is not installed.
    """
    from catfeat.models.registry import get_backbone
    from catfeat.images.decoders import DECODERS, available
    from catfeat.models.forward import PRECISIONS, TTA_MODES
    from catfeat.cache.store import DTYPES

    where = Path(head_dir) / "head.json" if head_dir is not None else "the head's record"
    recorded = getattr(head, "feature_recipes_", None)
    out = {}
    for name in head.backbones_:
        if not recorded:
            out[name] = dict(DEFAULT_RECIPE)
            continue
        r, spec = recorded[name], get_backbone(name)

        def refuse(why: str) -> ValueError:
            return ValueError(f"{where}: the features of {name} were {why}, so predict cannot compute the same "
                              "features from images")
        if r.get("preprocessing") == "unknown":
            raise refuse("made outside catfeat (catfeat.write_cache: weights and preprocessing unknown)")
        if r.get("input_size") is not None and int(r["input_size"]) != spec.input_size:
            raise refuse(f"made at input size {r['input_size']} and {spec.name} takes {spec.input_size}")
        if r.get("preprocessing") is not None and r["preprocessing"] != spec.preprocessing:
            raise refuse(f"preprocessed as {r['preprocessing']!r} and {spec.name} uses {spec.preprocessing!r}")
        step = {k: r.get(k) or v for k, v in DEFAULT_RECIPE.items()}
        if step["precision"] not in PRECISIONS:
            raise refuse(f"computed in precision {step['precision']!r}, which is not one of {', '.join(PRECISIONS)}")
        if step["tta"] not in TTA_MODES:
            raise refuse(f"made with TTA {step['tta']!r}, which is not one of {', '.join(TTA_MODES)}")
        if step["dtype"] not in DTYPES:
            raise refuse(f"stored as {step['dtype']!r}, which is not one of {', '.join(DTYPES)}")
        dec = step["decoder"]
        if dec not in DECODERS:
            raise refuse(f"decoded by {dec!r}, which is not one of {', '.join(DECODERS)}")
        if not available(dec):
            raise ValueError(f"{where}: the features of {name} were decoded by {dec!r}, whose module "
                             f"{DECODERS[dec].module!r} is not installed in {sys.executable}: "
                             f"{DECODERS[dec].install.split(',')[0]}, so that predict decodes images as extraction "
                             "did")
        out[name] = step
    return out


def build_predictor(head_dir: str | os.PathLike, weights=None, features_dir: str | os.PathLike | None = "features",
                    allow_random: bool = False):
    """One Keras model: uint8 images (one input per backbone, at its size) -> class probabilities.

    Returns ``(model, head)``; the model's inputs follow ``head.backbones_``, its output is the
    head's (sigmoid P(class 1) for two classes, softmax otherwise). Each backbone's features are
    computed as its caches' were (precision, TTA, float16 storage: see :func:`feature_steps`;
    :func:`predict_images` decodes with the recorded decoder). A head saved without that record
    warns (:class:`UnrecordedFeaturesWarning`) and uses :data:`DEFAULT_RECIPE`. ``allow_random``:
    see :func:`resolve_weights`.
    """
    import keras

    from catfeat.models.registry import get_backbone
    from catfeat.head.estimator import FusedHead
    from catfeat.models.forward import feature_model

    head = FusedHead.load(head_dir)
    head.check_weights()  # a NaN head would answer NaN for every image
    chosen = resolve_weights(head_dir, head.backbones_, weights, features_dir, allow_random)
    steps = feature_steps(head, head_dir)
    inputs, feats = [], []
    for name, dim in zip(head.backbones_, head.dims_):
        spec = get_backbone(name)
        if spec.feature_dim != dim:
            raise ValueError(f"head expects {dim} features from {name}, the backbone gives {spec.feature_dim}")
        w, seed = chosen[name]
        fm = feature_model(spec, w, seed, steps[name]["precision"], steps[name]["tta"])
        inp = keras.Input((spec.input_size, spec.input_size, 3), dtype="uint8", name=f"image_{spec.name}")
        inputs.append(inp)
        f = fm(inp)
        if steps[name]["dtype"] == "float16":  # the head was fitted on features rounded to float16
            f = keras.ops.cast(keras.ops.cast(f, "float16"), "float32")
        feats.append(f)
    out = head.model_(feats)
    if not getattr(head, "feature_recipes_", None):
        warnings.warn(f"{Path(head_dir) / 'head.json'} does not record how its features were made (saved without "
                      "it): predicting with the defaults (decoder auto, no TTA, float32); if its caches used another "
                      "--decoder, --tta, --precision or --dtype, the predictions will differ: re-save it with catfeat "
                      "fit --save, or catfeat.predict.record_features(head_dir, features_dir)",
                      UnrecordedFeaturesWarning, stacklevel=2)
    return keras.Model(inputs, out, name="catfeat_predictor"), head


def predict_images(head_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], weights=None,
                   features_dir: str | os.PathLike | None = "features", batch_size: int = 16,
                   predictor=None, allow_random: bool = False,
                   budget: ByteBudget | None = None) -> "pd.DataFrame":  # noqa: F821
    """Class probabilities straight from image files: ``file, p_<class>..., label`` (and ``error`` for
    files that could not be decoded). ``paths``: local files or URLs (``s3://``, ``gs://``, ``file://``;
    see :func:`expand_images` for folders and manifests), each read once. ``predictor``: a
    ``(model, head)`` from :func:`build_predictor`.
    Each file goes through extraction's per-image unit (:func:`catfeat.images.unit.decode_timed`),
    so it is skipped for the same reasons, under ``budget`` (default: a new ``ByteBudget``).

    Raises ``FloatingPointError`` rather than return NaN/Inf probabilities.
    """
    import keras
    import pandas as pd

    from catfeat.models.registry import get_backbone
    from catfeat.images.decoders import get_decoder
    from catfeat.images.unit import decode_timed, fetch_image, unit_decode
    from catfeat.head.network import proba_columns

    model, head = predictor or build_predictor(head_dir, weights, features_dir, allow_random)
    steps = feature_steps(head, head_dir)
    # (decoder, size) of each backbone's input; each decoder decodes a file once for all its sizes,
    # as extraction does
    keys = [(steps[n]["decoder"], get_backbone(n).input_size) for n in head.backbones_]
    plan: dict[str, list[int]] = {}
    for dec, size in keys:
        plan.setdefault(dec, [])
        if size not in plan[dec]:
            plan[dec].append(size)
    units = {dec: unit_decode(get_decoder(dec).decode) for dec in plan}
    budget = ByteBudget() if budget is None else budget
    errors, probs = {}, []
    batch: list[dict] = []
    ok_files: list[str] = []

    def decode(path) -> dict | str:
        """``{(decoder, size): array}``, or the reason the file cannot be used (a URL is read once)."""
        path, reason, _ = fetch_image(path)
        if path is None:
            return reason
        out = {}
        for dec, sizes in plan.items():
            arrays, reason = decode_timed(path, sorted(sizes), budget, units[dec])[:2]
            if arrays is None:
                return reason
            out.update({(dec, s): a for s, a in arrays.items()})
        return out

    def flush():
        if not batch:
            return
        arrays = [np.stack([d[k] for d in batch]) for k in keys]
        out = keras.ops.convert_to_numpy(model(arrays, training=False))
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if len(bad):
            files = ok_files[len(ok_files) - len(batch):]
            raise FloatingPointError(
                f"the model predicted NaN/Inf for {len(bad)} of {len(batch)} images (e.g. {files[bad[0]]}): "
                "the backbones' features of them are not finite (damaged weights file, or an overflow in "
                "reduced precision); no probabilities written")
        probs.append(proba_columns(np.asarray(out, np.float64), len(head.classes_)))
        batch.clear()

    for p in paths:
        got = decode(p if is_url(p) else os.fspath(p))  # a URL keeps the size its listing gave
        p = str(p)
        if isinstance(got, str):
            errors[p] = got
        else:
            batch.append(got)
            ok_files.append(p)
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
    """The image files named by ``items``: files as given (an undecodable one becomes a row with its
    error), every image under a folder, the matches of a quoted glob pattern; and, read as extraction
    reads them (:mod:`catfeat.images.listing`): an image URL (``s3://``, ``gs://``, ``file://``), every
    image under a folder URL (one listing, sizes included), every row of a CSV/Parquet manifest (local
    or at a URL; column ``image``, labels not needed). An item that names nothing (no such path, a
    pattern matching no file, a folder without images) raises ``ValueError`` listing every such item:
    a typo must not look like a prediction; a store that cannot be listed is one
    :class:`~catfeat.images.sources.SourceError`."""
    import glob

    from catfeat.images.listing import IMAGE_SUFFIXES, natural_key, shown
    from catfeat.images.manifest import is_manifest

    out, empty = [], []
    for item in items:
        p = Path(item)
        if is_manifest(item):
            out += [str(loc) if isinstance(loc, Path) else loc for loc in _manifest_images(item)]
        elif is_url(item):
            if item.split("?", 1)[0].lower().endswith(IMAGE_SUFFIXES):
                out.append(item)  # one object (its row says so if it is not there)
                continue
            found = _folder_url_images(item)
            if not found:
                empty.append(f"{shown(item)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_dir():
            found = sorted((str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
            if not found:
                empty.append(f"folder {shown(item)!r} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif os.path.lexists(item):  # a file, or a link / special file that becomes a row with its error
            out.append(str(p))
        elif any(c in item for c in "*?["):  # a pattern the shell left alone (quoted, or it matched nothing)
            found = sorted(glob.glob(item), key=natural_key)
            if not found:
                empty.append(f"{shown(item)!r} matches no file")
            out += expand_images(found) if found else []
        else:
            empty.append(f"{shown(item)!r} does not exist")
    if empty:
        raise ValueError("; ".join(empty[:3]) + (f" (and {len(empty) - 3} more)" if len(empty) > 3 else "")
                         + ": nothing predicted; check the names")
    return out


def _manifest_images(manifest: str) -> list:
    """What to read for each row of a manifest, in its order (train rows first, as extraction lists them)."""
    from catfeat.images.listing import list_images

    return list_images(manifest).paths()


def _folder_url_images(url: str) -> list[str]:
    """Every image under the folder ``url``, in natural order, each with the size its listing gave."""
    from catfeat.images.listing import IMAGE_SUFFIXES, natural_key
    from catfeat.images.sources import join_url, list_folder, listed_url

    listed = list_folder(url)
    names = sorted((n for n in listed if n.lower().endswith(IMAGE_SUFFIXES)
                    and not any(part.startswith(".") for part in n.split("/"))), key=natural_key)
    return [listed_url(join_url(url, n), listed[n]) for n in names]
