"""Outlier finder: real Lite0/Lite1 ImageNet weights on real photos plus planted non-animal images."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import real_data

N_REAL = 12  # per class
PLANTED = ("cat.9001.png", "cat.9002.png", "dog.9003.png", "dog.9004.png", "cat.9005.png")


def _plant(folder):
    from PIL import Image, ImageDraw

    Image.new("RGB", (200, 160), (30, 90, 220)).save(folder / PLANTED[0])
    g = np.zeros((160, 200, 3), np.uint8)
    g[..., 0] = np.linspace(0, 255, 200, dtype=np.uint8)[None, :]
    g[..., 2] = np.linspace(255, 0, 160, dtype=np.uint8)[:, None]
    Image.fromarray(g).save(folder / PLANTED[1])
    im = Image.new("RGB", (240, 180), "white")
    d = ImageDraw.Draw(im)
    for i in range(8):
        d.text((10, 10 + 20 * i), "INVOICE 2019 total due: $1,234.56", fill="black")
    im.save(folder / PLANTED[2])
    Image.new("RGB", (200, 200), (250, 250, 40)).save(folder / PLANTED[3])
    s = np.indices((180, 180)).sum(axis=0) // 20 % 2 * 255
    Image.fromarray(np.stack([s, s, s], -1).astype(np.uint8)).save(folder / PLANTED[4])


@pytest.fixture(scope="module")
def lite_features(tmp_path_factory):
    import catfeat.extraction.run

    src = real_data("original")
    root = tmp_path_factory.mktemp("outl")
    data = root / "data"
    data.mkdir()
    for k in range(N_REAL):
        shutil.copy(src / f"cat.{k}.jpg", data / f"cat.{k}.jpg")
        shutil.copy(src / f"dog.{1000 + k}.jpg", data / f"dog.{1000 + k}.jpg")
    _plant(data)
    catfeat.extraction.run.extract(data, models="lite0,lite1", out=root / "features", weights="imagenet", batch_size=8)
    return root


def test_classifier_matches_the_full_model():
    import keras

    from catfeat.models.registry import build_backbone, classifier
    from catfeat.models.lite import EfficientNetLite

    W, b = classifier("lite0", "imagenet")
    assert W.shape == (1280, 1000) and b.shape == (1000,)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
    gap = keras.ops.convert_to_numpy(build_backbone("lite0", "imagenet")(x))
    full = keras.ops.convert_to_numpy(EfficientNetLite("lite0", "imagenet", include_top=True)(x))
    np.testing.assert_allclose(gap @ W + b, full, atol=1e-3)


def test_keras_classifier_needs_imagenet_weights():
    from catfeat.models.registry import classifier
    from catfeat.models.weights import WeightsError

    with pytest.raises(WeightsError, match="only with weights='imagenet'"):
        classifier("r50", None)


def test_planted_images_are_flagged_real_pets_are_not(lite_features, tmp_path, capsys):
    from catfeat.models.imagenet import imagenet_classes
    from catfeat.outliers import CAT_CLASSES, DOG_CLASSES, find_outliers
    from catfeat.cli.outliers import main

    df = find_outliers("lite0,lite1", lite_features / "features", top=30)
    assert df.attrs["min_votes"] == 2 and len(df) == 2 * N_REAL + len(PLANTED)
    flagged = set(df.loc[df["flagged"], "file"])
    assert set(PLANTED) <= flagged
    real_flagged = flagged - set(PLANTED)
    assert len(real_flagged) <= 3, real_flagged
    # ranked: flagged rows first, the planted ones far below any real pet in cat+dog probability
    assert df["flagged"].tolist() == sorted(df["flagged"].tolist(), reverse=True)
    planted = df[df["file"].isin(PLANTED)]
    assert planted["p_animal"].max() < df[~df["file"].isin(flagged)]["p_animal"].median()
    assert (df.loc[df["file"].isin(PLANTED), "label"].isin(["cat", "dog"])).all()

    out, sheet = tmp_path / "o.csv", tmp_path / "o.png"
    rc = main(["--features", str(lite_features / "features"), "--models", "lite0,lite1", "--out", str(out),
               "--sheet", str(sheet)])
    assert rc == 0 and out.is_file() and sheet.is_file()
    saved = pd.read_csv(out)
    assert set(saved.loc[saved["flagged"], "file"]) == flagged
    # ImageNet classes by name (the indices beside them): a real cat's best class is a cat or dog breed
    names = imagenet_classes()
    pets = [names[k] for k in CAT_CLASSES + DOG_CLASSES]
    for text, ids in zip(saved["top_classes"], saved["top_class_ids"]):
        shown = [part.rsplit(":", 1)[0] for part in text.split(", ")]
        assert len(shown) == 5 and shown == [names[int(k)] for k in str(ids).split()]
    real_cats = saved[saved["file"].str.match(r"cat\.\d+\.jpg") & ~saved["flagged"]]
    assert len(real_cats) and real_cats["top_classes"].map(lambda t: t.split(":")[0] in pets).mean() >= 0.8
    printed = capsys.readouterr().out
    first = saved.loc[saved["flagged"], "top_classes"].iloc[0].split(":")[0]
    assert first in printed and not re.search(r"(?<![\w.])\d{1,3}:0\.\d\d", printed)


def test_exclude_file_drops_flagged_training_rows(lite_features, tmp_path):
    from catfeat.outliers import find_outliers, read_exclude

    df = find_outliers("lite0", lite_features / "features", top=30)
    csv = tmp_path / "outliers.csv"
    df.to_csv(csv, index=False)
    assert read_exclude(csv) == set(df.loc[df["flagged"], "file"])
    plain = tmp_path / "list.txt"
    plain.write_text("cat.1.jpg\n\ndog.1001.jpg\n")
    assert read_exclude(plain) == {"cat.1.jpg", "dog.1001.jpg"}


def test_votes_threshold_and_bad_arguments(lite_features):
    from catfeat.outliers import find_outliers

    one = find_outliers("lite0,lite1", lite_features / "features", top=30, min_votes=1)
    two = find_outliers("lite0,lite1", lite_features / "features", top=30, min_votes=2)
    assert one["flagged"].sum() >= two["flagged"].sum()
    strict = find_outliers("lite0", lite_features / "features", top=1)
    loose = find_outliers("lite0", lite_features / "features", top=300)
    assert strict["flagged"].sum() >= loose["flagged"].sum()
    with pytest.raises(ValueError, match="min_votes"):
        find_outliers("lite0", lite_features / "features", min_votes=3)
