"""The 1000 ImageNet-1k class names, shipped with the package (no download), in classifier index order."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
import numpy as np

NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The class names, ``imagenet_classes()[k]`` being class ``k`` of every ImageNet classifier
    (0 'tench', 281 'tabby', 277 'red fox')."""
    text = resources.files("catfeat").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line and not line.startswith("#"))
    if len(names) != NUM_CLASSES:
        raise RuntimeError(f"catfeat/data/imagenet_classes.txt holds {len(names)} class names, expected "
                           f"{NUM_CLASSES}; reinstall catfeat")
    return names


def top_classes(probs: np.ndarray, k: int = 5) -> tuple[list[str], list[str]]:
    """Per row of ``probs`` (n, 1000), its ``k`` most probable classes, best first, twice:
    as names with probabilities ('red fox:0.42, kit fox:0.11') and as indices ('277 278')."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"expected ImageNet probabilities of shape (n, {NUM_CLASSES}), got {probs.shape}")
    names = imagenet_classes()
    best = np.argsort(-probs, axis=1, kind="stable")[:, :max(k, 0)]
    labelled = [", ".join(f"{names[j]}:{p[j]:.2f}" for j in row) for p, row in zip(probs, best)]
    return labelled, [" ".join(str(j) for j in row) for row in best]

