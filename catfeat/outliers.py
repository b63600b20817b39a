"""Find training images that are neither cats nor dogs, from the cached features alone.

Each backbone's ImageNet classifier is applied to its cached GAP vectors (``logits = gap @ W + b``,
no second pass over the images). An image whose top-N ImageNet classes hold no cat (281-285) and
no dog (151-268) class gets one vote from that backbone; ``min_votes`` votes flag it.

``python -m catfeat outliers --models lite0,lite1 --out outliers.csv --sheet outliers.png``
writes the ranked table; ``python -m catfeat.fit --exclude outliers.csv`` trains without the
flagged rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from catfeat.models.weights import cache_weights
from catfeat.models.imagenet import top_classes

CAT_CLASSES = tuple(range(281, 286))
DOG_CLASSES = tuple(range(151, 269))
ANIMAL_CLASSES = np.array(CAT_CLASSES + DOG_CLASSES)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _classifier_for(cache, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """``(W (D, 1000), b)``: the ImageNet classifier of a cache's backbone under ``weights``, or (None)
    the weights the cache was built with (random ones made again from their seed)."""
    import keras

    from catfeat.models.registry import classifier

    if weights is None:
        weights, seed = cache_weights(str(cache.attrs.get("weights")))
        keras.utils.set_random_seed(seed)
    return classifier(cache.name, weights)


def imagenet_probabilities(model: str, features_dir: str = "features", split: str = "train",
                           weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageNet class probabilities of the cached images of one backbone: ``(probs (n, 1000), names, labels)``.

    ``weights`` None: those the cache was built with (its ``weights`` attribute).
    """
    from catfeat.cache.store import find_cache

    cache = find_cache(model, features_dir)
    W, b = _classifier_for(cache, weights)
    feats = cache.features(split).astype(np.float32)
    labels = cache.labels() if split == "train" else -np.ones(len(feats), np.int64)
    return _softmax(feats.astype(np.float64) @ W + b), cache.names(split), labels


def find_outliers(models: str | Sequence[str] | None = None, features_dir: str = "features", top: int = 30,
                  min_votes: int | None = None, split: str = "train", weights=None,
                  show: int = 5, allow_random: bool = False) -> "pd.DataFrame":  # noqa: F821
    """Vote across backbones for images whose top-``top`` ImageNet classes hold no cat or dog class.

    ``min_votes`` defaults to a majority of the backbones. Returns one row per image, flagged first
    (most votes, then lowest cat+dog probability): ``file, label, votes, flagged, p_animal``
    (mean over backbones of the cat+dog probability), ``top_classes`` (the first backbone's
    ``show`` best ImageNet classes by name with probabilities, "red fox:0.42, kit fox:0.11"),
    ``top_class_ids`` (their indices, "277 278") and per backbone the best rank of a cat
    or dog class (``animal_rank_<Model>``, 1 = top class). ``df.attrs`` holds models, top, min_votes.
    Caches (or ``weights``) of random weights raise ``WeightsError`` unless ``allow_random``: their
    ImageNet classes mean nothing.
    """
    import pandas as pd

    from catfeat.models.registry import parse_models
    from catfeat.cache.store import models_or_cached

    specs = parse_models(models_or_cached(models, features_dir))
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    min_votes = len(specs) // 2 + 1 if min_votes is None else int(min_votes)
    if not 1 <= min_votes <= len(specs):
        raise ValueError(f"min_votes must be in 1..{len(specs)}, got {min_votes}")

    # Chunks of rows, aligned by file name to the first cache: memory stays flat in the number of
    # images (a chunk's 1,000 ImageNet probabilities per row are reduced to a rank and a sum).
    from catfeat.cache.store import check_same_source, find_cache
    from catfeat.cache.rows import CacheRows

    caches = [find_cache(s.name, features_dir) for s in specs]
    check_same_source({s.name: c for s, c in zip(specs, caches)})
    if not allow_random:
        _refuse_random(caches, weights)
    n_first = caches[0].attrs.get(f"n_{split}", 0)
    rows = CacheRows.open([s.name for s in specs], features_dir, split, join="inner")
    if len(rows) < n_first:
        first_names = caches[0].names(split)
        for c in caches[1:]:
            have = set(c.names(split))
            missing = [nm for nm in first_names if nm not in have]
            if missing:
                raise ValueError(f"{c.name}'s cache lacks {len(missing)} images of the first cache "
                                 f"(e.g. {missing[0]}); extract every backbone from the same folder")
    order = np.argsort(rows.file_rows[specs[0].name], kind="stable")  # the first cache's order
    rows = rows.subset(order)
    names = list(rows.names)
    labels = rows.labels if split == "train" else -np.ones(len(rows), np.int64)
    classes = caches[0].classes
    ranks = {s.name: np.empty(len(rows), np.int64) for s in specs}
    p_animal = {s.name: np.empty(len(rows)) for s in specs}
    tops, top_ids = [""] * len(rows), [""] * len(rows)
    for i, spec in enumerate(specs):
        W, b = _classifier_for(caches[i], weights)
        one = rows.select([spec.name])
        for pos, (feats,) in one.blocks(4096):
            probs = _softmax(feats.astype(np.float64) @ W + b)
            srt = np.argsort(-probs, axis=1)
            is_animal = np.isin(srt, ANIMAL_CLASSES)
            ranks[spec.name][pos] = np.where(is_animal.any(axis=1), is_animal.argmax(axis=1) + 1, probs.shape[1] + 1)
            p_animal[spec.name][pos] = probs[:, ANIMAL_CLASSES].sum(axis=1)
            if i == 0:
                named, ids = top_classes(probs, show)
                for r, text, idx in zip(pos, named, ids):
                    tops[r], top_ids[r] = text, idx

    rank_arr = np.column_stack([ranks[s.name] for s in specs])
    votes = (rank_arr > top).sum(axis=1)
    label_names = [classes[int(v)] if 0 <= int(v) < len(classes or []) else "" for v in labels]
    # file as object, not pandas' Arrow strings: those refuse file names that are not valid UTF-8
    df = pd.DataFrame({"file": pd.Series(names, dtype=object), "label": label_names, "votes": votes,
                       "flagged": votes >= min_votes,
                       "p_animal": np.mean([p_animal[s.name] for s in specs], axis=0), "top_classes": tops,
                       "top_class_ids": top_ids})
    for s in specs:
        df[f"animal_rank_{s.name}"] = ranks[s.name]
    df = df.sort_values(["votes", "p_animal"], ascending=[False, True], kind="stable").reset_index(drop=True)
    df.attrs.update(models=[s.name for s in specs], top=top, min_votes=min_votes)
    return df


def _refuse_random(caches, weights) -> None:
    """``WeightsError`` when the features or the classifier come from random weights ('none(seed=N)')."""
    from catfeat.models.weights import Weights, WeightsError

    def is_random(w) -> bool:
        try:
            return Weights.parse(w).kind == "none"
        except (WeightsError, ValueError):
            return False

    random = [f"{c.name}: {c.attrs.get('weights')}" for c in caches if is_random(str(c.attrs.get("weights")))]
    if weights is not None and is_random(weights):
        random.append(f"--weights {weights}")
    if random:
        raise WeightsError(f"outliers needs ImageNet classifiers, and these are random weights ({', '.join(random)}): "
                           "their classes carry no meaning, so which images are flagged would be chance; extract with "
                           "--weights imagenet, or pass --allow-random-weights (allow_random=True) to run anyway")


def read_exclude(path: str | Path) -> set[str]:
    """Image names to leave out: a CSV with a ``file`` column (and ``flagged``, if present, true) or
    a plain list, one name per line.

    Read as UTF-8 with surrogate escapes, as the outliers CSV is written, so a file name that is
    not valid UTF-8 matches its cached name. Anything but a regular file is refused (a FIFO would
    block forever).
    """
    import csv
    import io
    import os
    import stat

    from catfeat.images.listing import file_kind

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"--exclude {path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else f"not a regular file ({file_kind(mode)})"
        raise ValueError(f"--exclude {path} is {kind}; name a text file of image names, one per line, or an "
                         "outliers CSV")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"--exclude {path}: cannot read it ({e.strerror or e})") from None
    text = raw.decode("utf-8", "surrogateescape")
    lines = text.splitlines()
    if lines and lines[0].split(",")[0].strip() == "file":
        # the csv module, not pandas: names stay text ("NA", "007") and undecodable bytes stay escaped
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise ValueError(f"--exclude {path} is not a readable CSV ({e})") from None
        return {r["file"] for r in rows if r.get("file") is not None
                and ("flagged" not in r or str(r["flagged"]).strip().lower() in ("true", "1"))}
    return {line.strip() for line in lines if line.strip()}


def save_contact_sheet(files: Sequence[str], data_root: str | Path, out_png: str | Path, cols: int = 6,
                       thumb: int = 128, captions: Sequence[str] | None = None) -> Path:
    """A grid of thumbnails of ``files`` (relative to ``data_root``: a folder, folder URL or manifest)
    with captions, as a PNG."""
    from PIL import Image, ImageDraw, ImageOps

    from catfeat.images.listing import image_location
    from catfeat.images.sources import FetchError, fetch, openable

    files = list(files)
    if not files:
        raise ValueError("no images for the contact sheet")
    cols = max(1, min(cols, len(files)))
    rows = -(-len(files) // cols)
    pad = 14
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(files):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + pad)
        try:
            with Image.open(openable(fetch(image_location(data_root, name)))) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((thumb - 4, thumb - 4))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except (OSError, FetchError):
            draw.text((x + 4, y + thumb // 2), "unreadable", fill="red")
        text = captions[i] if captions is not None else Path(name).name
        draw.text((x + 2, y + thumb), text[: thumb // 6], fill="black")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
