"""The registry and the four Keras backbones (weights=None: no download needed)."""
from __future__ import annotations

import numpy as np
import pytest

from catfeat.backbones import (REGISTRY, WeightsError, build_backbone, get_backbone, normalize_weights,
                               parse_models, preprocess, weights_identity)

KERAS_BACKBONES = ["ResNet50", "InceptionV3", "Xception", "InceptionResNetV2"]
EXPECTED = {"ResNet50": ("r50", 224, 2048), "InceptionV3": ("incv3", 299, 2048),
            "Xception": ("xcep", 299, 2048), "InceptionResNetV2": ("irv2", 299, 1536)}


@pytest.mark.parametrize("name", KERAS_BACKBONES)
def test_registry_entry(name):
    alias, size, dim = EXPECTED[name]
    spec = get_backbone(alias)
    assert spec is get_backbone(name.upper()) is REGISTRY[name]
    assert (spec.input_size, spec.feature_dim) == (size, dim)
    assert spec.min_input_size <= size


def test_parse_models_and_unknown_names():
    assert [s.name for s in parse_models("xcep, incv3,XCEPTION,irv2")] == ["Xception", "InceptionV3",
                                                                          "InceptionResNetV2"]
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        parse_models("vgg16")
    with pytest.raises(ValueError, match="no backbone"):
        parse_models(" , ")


@pytest.mark.parametrize("name", KERAS_BACKBONES)
def test_preprocessing_matches_keras_and_never_mutates(name):
    import importlib

    import keras

    spec = get_backbone(name)
    module, _, fn = spec.keras_preprocess.partition(":")
    reference = getattr(importlib.import_module(module), fn)
    x = np.random.RandomState(0).randint(0, 256, (2, 8, 8, 3)).astype("float32")
    before = x.copy()
    ours = keras.ops.convert_to_numpy(preprocess(spec, keras.ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(ours, reference(x.copy()), atol=1e-5)


def test_weights_arguments(tmp_path):
    assert normalize_weights(None) is None and normalize_weights("None") is None
    assert normalize_weights("ImageNet") == "imagenet"
    with pytest.raises(WeightsError, match="does not exist"):
        normalize_weights(tmp_path / "missing.h5")
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"abc")
    assert weights_identity(f).startswith("sha256:ba7816bf")
    assert weights_identity(None, seed=3) == "none(seed=3)"


def test_imagenet_download_failure_says_where_to_put_the_file(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone("r50", "imagenet")
    msg = str(err.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg and "--weights" in msg


def test_random_weights_are_fixed_by_seed():
    a = build_backbone("r50", None, seed=0).get_weights()
    b = build_backbone("r50", None, seed=0).get_weights()
    c = build_backbone("r50", None, seed=1).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
