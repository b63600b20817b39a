"""The ImageNet class names shipped with the package, and how the outlier table writes them."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import pytest

from catfeat.models.imagenet import imagenet_classes, top_classes

REPO = Path(__file__).resolve().parents[1]


def test_thousand_unique_names_in_index_order():
    names = imagenet_classes()
    assert len(names) == 1000 == len(set(names))
    assert all(n == n.strip() and n and "," not in n for n in names)
    assert (names[0], names[151], names[277], names[999]) == ("tench", "Chihuahua", "red fox", "toilet tissue")


def test_cat_and_dog_ranges_of_the_outlier_finder_are_cats_and_dogs():
    from catfeat.outliers import CAT_CLASSES, DOG_CLASSES

    names = imagenet_classes()
    assert [names[k] for k in CAT_CLASSES] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert (names[DOG_CLASSES[0]], names[DOG_CLASSES[-1]]) == ("Chihuahua", "Mexican hairless")
    assert names[DOG_CLASSES[-1] + 1] == "timber wolf"


def test_top_classes_names_probabilities_and_indices():
    probs = np.full((2, 1000), 1e-4)
    probs[0, [277, 281, 3]] = [0.42, 0.30, 0.05]
    probs[1, [999, 0]] = [0.9, 0.05]
    named, ids = top_classes(probs, 3)
    assert named[0] == "red fox:0.42, tabby:0.30, tiger shark:0.05"
    assert ids[0] == "277 281 3"
    assert named[1].startswith("toilet tissue:0.90, tench:0.05, ") and ids[1].startswith("999 0 ")
    with pytest.raises(ValueError, match=r"\(n, 1000\)"):
        top_classes(probs[:, :10])


def test_the_class_list_ships_in_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["catfeat"]
    data = REPO / "catfeat" / "data" / "imagenet_classes.txt"
    assert data.is_file() and any(fnmatch.fnmatch("data/imagenet_classes.txt", g) for g in globs)
