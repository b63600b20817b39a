"""The registry and the four Keras backbones (weights=None: no download needed)."""
from __future__ import annotations

import numpy as np
import pytest

from catfeat.models.registry import REGISTRY, build_backbone, get_backbone, parse_models, preprocess
from catfeat.models.weights import Weights, WeightsError, cache_weights, normalize_weights, weights_identity

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


@pytest.mark.backend_neutral
@pytest.mark.parametrize("name", KERAS_BACKBONES)
def test_feature_model_has_the_registered_shapes(name):
    """Each Keras backbone as extraction builds it (uint8 in, preprocessing inside, GAP features out),
    built but neither compiled nor run: test_extract's CLI run takes two of them end to end. Keras
    infers these shapes the same way on every backend (building under JAX took 20-100 s a model here)."""
    from catfeat.models.forward import feature_model

    spec = get_backbone(name)
    model = feature_model(spec, weights=None)
    assert tuple(model.input.shape) == (None, spec.input_size, spec.input_size, 3) and model.input.dtype == "uint8"
    assert tuple(model.output.shape) == (None, spec.feature_dim) == (None, EXPECTED[name][2])
    assert model.output.dtype == "float32"


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


ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_weights_vocabulary_parses_once(tmp_path):
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"abc")
    assert Weights.parse(None) == Weights.parse("none") == Weights.parse("Random") == Weights("none")
    assert Weights.parse("IMAGENET") == Weights("imagenet")
    assert Weights.parse("none(seed=7)") == Weights("none", seed=7) and Weights.parse("none(seed=-2)").seed == -2
    assert Weights.parse(f) == Weights.parse(str(f)) == Weights("file", path=f)
    assert Weights.parse("sha256:" + ABC_SHA256.upper()) == Weights("sha256", digest=ABC_SHA256)
    w = Weights.parse(f)
    assert Weights.parse(w) is w
    assert [Weights.parse(v).argument() for v in (None, "imagenet", f)] == [None, "imagenet", str(f)]
    assert Weights.parse("none(seed=7)").seed_or(0) == 7 and Weights.parse("none").seed_or(3) == 3


@pytest.mark.parametrize("value", ["imagenet", "none", "none(seed=5)", "sha256:" + ABC_SHA256])
def test_weights_round_trip(value):
    w = Weights.parse(value)
    assert str(w) == value and Weights.parse(str(w)) == w


def test_weights_identity_and_file_round_trip(tmp_path):
    f = tmp_path / "w.h5"
    f.write_bytes(b"abc")
    w = Weights.parse(f)
    assert Weights.parse(str(w)) == w
    assert w.identity() == "sha256:" + ABC_SHA256 == Weights.parse(w.identity()).identity()
    assert Weights.parse(None).identity(seed=4) == "none(seed=4)"
    assert Weights.parse("none(seed=9)").identity(seed=4) == "none(seed=9)"  # the value's own seed wins
    assert weights_identity("none(seed=9)") == "none(seed=9)" and normalize_weights("none(seed=9)") is None
    for ident in ("imagenet", "none(seed=2)", "sha256:" + ABC_SHA256):
        assert Weights.from_identity(ident).identity() == ident


def test_bad_weights_values_say_what_is_accepted(tmp_path):
    with pytest.raises(WeightsError, match=r"'imagenet'.*'none'.*path"):
        Weights.parse(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        Weights.parse("imagenett")
    with pytest.raises(WeightsError, match="64 hex digits"):
        Weights.parse("sha256:abc")
    with pytest.raises(WeightsError, match="got int 3"):
        Weights.parse(3)
    with pytest.raises(WeightsError, match="not a weights identity"):
        Weights.from_identity("weights.h5")
    with pytest.raises(WeightsError, match="pass that file"):
        Weights.parse("sha256:" + ABC_SHA256).argument()
    with pytest.raises(WeightsError, match="kind must be one of"):
        Weights("random")
    with pytest.raises(WeightsError, match="needs a path"):
        Weights("file")
    with pytest.raises(WeightsError, match="only random"):
        Weights("imagenet", seed=1)


def test_cache_weights_rebuild_arguments():
    assert cache_weights("imagenet") == ("imagenet", 0)
    assert cache_weights("none(seed=3)") == (None, 3)
    for ident in ("sha256:" + ABC_SHA256, "None", "/some/file.h5"):
        with pytest.raises(ValueError, match="pass the weights file explicitly"):
            cache_weights(ident)


def test_build_backbone_refuses_an_identity_and_honours_a_named_seed():
    with pytest.raises(WeightsError, match="SHA-256 only"):
        build_backbone("r50", "sha256:" + ABC_SHA256)
    a = build_backbone("r50", "none(seed=1)", seed=0).get_weights()
    b = build_backbone("r50", None, seed=1).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_builder_takes_keras_applications_arguments(name):
    import importlib
    import inspect

    module, _, attr = REGISTRY[name].builder.partition(":")
    params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    keras_args = {"include_top": True, "weights": "imagenet", "input_tensor": None, "input_shape": None,
                  "pooling": None, "classes": 1000, "classifier_activation": "softmax"}
    assert {k: params[k].default for k in keras_args if k in params} == keras_args


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
