"""Class activation maps: size of the photo, consistent with the head's logit, driven by the head weights."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import real_data


@pytest.fixture(scope="module")
def lite_head(tmp_path_factory):
    import catfeat

    import shutil

    src = real_data("original")
    root = tmp_path_factory.mktemp("cam")
    data = root / "data"
    data.mkdir()
    for k in range(4):  # real photos, real Lite0 weights: activations of a realistic scale
        shutil.copy(src / f"cat.{20 + k}.jpg", data / f"cat.{20 + k}.jpg")
        shutil.copy(src / f"dog.{1020 + k}.jpg", data / f"dog.{1020 + k}.jpg")
    # a recipe other than today's defaults (OpenCV, no TTA): the CAM must follow the head's record
    catfeat.run_extraction(data, "lite0", root / "features", weights="imagenet", batch_size=4, progress=False,
                           decoder="pillow", tta="flip")
    X, y, names = catfeat.load_features("lite0", root / "features")
    catfeat.FusedHead(epochs=2, early_stopping=False, random_state=0).fit(X, y).save(root / "head",
                                                                                   features=root / "features")
    head = catfeat.FusedHead.load(root / "head")
    assert head.feature_recipes_["EfficientNetLite0"]["decoder"] == "pillow"
    return data, head, X, names


def test_cam_has_photo_size_and_matches_the_logit(lite_head):
    from catfeat.cam import ActivationMapper, head_weights

    data, head, X, names = lite_head
    mapper = ActivationMapper(head)  # weights, decoder and TTA as head.json records them
    from PIL import Image

    cam = mapper(data / names[0], class_index=1)
    w_px, h_px = Image.open(data / names[0]).size
    assert cam.shape == (h_px, w_px) and cam.dtype == np.float32 and np.ptp(cam) > 0
    low = mapper(data / names[0], class_index=1, full_size=False)
    assert low.shape == (7, 7)
    # mean over positions of F @ w is GAP @ w (the cached feature row): the head's logit minus its bias
    w, b = head_weights(head, 1)
    gap = X["EfficientNetLite0"][0].astype(np.float64)
    np.testing.assert_allclose(low.mean(), gap @ w, rtol=1e-4, atol=1e-5)
    p = head.predict_proba(X)[0, 1]
    np.testing.assert_allclose(1 / (1 + np.exp(-(low.mean() + b))), p, atol=1e-4)
    # class 0 of a sigmoid head is the mirror image
    np.testing.assert_allclose(mapper(data / names[0], class_index=0, full_size=False), -low, atol=1e-6)


def test_cam_changes_with_head_weights(lite_head):
    from sklearn.base import clone

    from catfeat.cam import ActivationMapper

    data, head, X, names = lite_head
    mapper = ActivationMapper(head, weights="imagenet")
    before = mapper(data / names[1], class_index=1)
    other = clone(head).fit(X, 1 - np.asarray([0, 0, 0, 0, 1, 1, 1, 1]))
    layer = other.model_.get_layer("output")
    kernel, bias = layer.get_weights()
    layer.set_weights([np.random.RandomState(1).normal(size=kernel.shape).astype("float32"), bias])
    after = ActivationMapper(other, model=mapper.model)(data / names[1], class_index=1)
    assert after.shape == before.shape
    assert not np.allclose(before, after)
    assert abs(np.corrcoef(before.ravel(), after.ravel())[0, 1]) < 0.99


def test_grid_png_and_fused_head_refused(lite_head, tmp_path):
    from PIL import Image

    import catfeat
    from catfeat.cam import ActivationMapper, overlay, save_cam_grid

    data, head, X, names = lite_head
    out = save_cam_grid([data / n for n in names[:3]], head, tmp_path / "cam.png", weights="imagenet",
                        cols=2, thumb=96)
    assert Image.open(out).size == (2 * 96, 2 * (96 + 14))
    photo = np.zeros((10, 12, 3), np.uint8)
    blended = overlay(photo, np.linspace(0, 1, 120).reshape(10, 12).astype(np.float32))
    assert blended.shape == photo.shape and blended.max() > 0
    two = catfeat.FusedHead(epochs=1, early_stopping=False).fit([X["EfficientNetLite0"]] * 2, [0] * 4 + [1] * 4)
    with pytest.raises(ValueError, match="one backbone"):
        ActivationMapper(two, weights="imagenet")


def test_feature_map_of_a_keras_application_found_by_type():
    from catfeat.cam import conv_model

    m = conv_model("r50", weights=None)
    assert tuple(m.output.shape) == (None, 7, 7, 2048)
