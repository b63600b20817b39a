"""End-to-end predictor: image files -> one Keras model; equal to the cache-then-head path."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_kaggle, sharpen_head


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import catfeat

    root = tmp_path_factory.mktemp("pred")
    data = make_kaggle(root / "data", n_per_class=5, n_test=3, size=(48, 36))
    # two backbones of different input sizes, random weights fixed by the seed
    catfeat.run_extraction(data, "lite0,lite1", root / "features", weights=None, batch_size=4, seed=3,
                           progress=False)
    X, y, names = catfeat.load_features("lite0,lite1", root / "features")
    head = catfeat.FusedHead(epochs=3, early_stopping=False, random_state=0).fit(X, y)
    sharpen_head(head, X)
    head.save(root / "head")
    return root, data, head



def test_predictions_equal_cache_then_head(trained):
    import catfeat
    from catfeat.predict import predict_images, record_weights

    root, data, head = trained
    record_weights(root / "head", root / "features")
    assert json.loads((root / "head" / "weights.json").read_text()) == {
        "EfficientNetLite0": "none(seed=3)", "EfficientNetLite1": "none(seed=3)"}
    X, _, names = catfeat.load_features("lite0,lite1", root / "features")
    expected = head.predict_proba(X)
    # weights.json alone identifies the backbones: no features folder needed
    df = predict_images(root / "head", [data / n for n in names], features_dir=None, batch_size=4,
                        allow_random=True)
    assert df["file"].tolist() == [str(data / n) for n in names]
    np.testing.assert_allclose(df[["p_0", "p_1"]].to_numpy(), expected, atol=1e-3)
    assert (df["label"].to_numpy() == head.classes_[expected.argmax(1)]).all()


def test_wrong_seed_gives_other_predictions_and_missing_identity_fails(trained, tmp_path):
    import shutil

    import catfeat
    from catfeat.predict import predict_images

    root, data, head = trained
    bare = tmp_path / "head"
    shutil.copytree(root / "head", bare)
    (bare / "weights.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="unknown weights"):
        predict_images(bare, [data / "train" / "cat.0.jpg"], features_dir=None, allow_random=True)
    X, _, names = catfeat.load_features("lite0,lite1", root / "features")
    # from the caches' attribute: same as recorded
    good = predict_images(bare, [data / names[0]], features_dir=root / "features", allow_random=True)
    np.testing.assert_allclose(good[["p_0", "p_1"]].to_numpy()[0], head.predict_proba(X)[0], atol=1e-3)


def test_cli_csv_export_and_bad_file(trained, tmp_path, capsys):
    import keras

    from catfeat.cli.predict import main

    root, data, head = trained
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    model_path = tmp_path / "model.keras"
    rc = main(["--head", str(root / "head"), "--features", str(root / "features"), str(data / "test"), str(bad),
               "--csv", str(out), "--export", str(model_path), "--allow-random-weights"])
    assert rc == 0
    df = pd.read_csv(out)
    assert len(df) == 4 and df["error"].fillna("").astype(bool).sum() == 1
    assert model_path.is_file()
    reloaded = keras.saving.load_model(model_path, compile=False)
    x = [np.zeros((1, 224, 224, 3), np.uint8), np.zeros((1, 240, 240, 3), np.uint8)]
    from catfeat.predict import build_predictor

    model, _ = build_predictor(root / "head", features_dir=root / "features", allow_random=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)), keras.ops.convert_to_numpy(model(x)),
                               atol=1e-5)
    assert main(["--head", str(root / "head")]) == 2
