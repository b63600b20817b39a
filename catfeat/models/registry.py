"""The backbone registry: one table maps a name or alias to everything catfeat needs to know.

Nothing else in catfeat branches on a model's name; it looks the name up here.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from catfeat.models.weights import Weights, WeightsArg, WeightsError


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it.

    ``preprocessing`` names the rule applied to RGB 0..255 floats inside the compiled model
    ("caffe": RGB->BGR minus the ImageNet mean; "tf": x/127.5 - 1; "lite": (x - 127)/128).
    """

    name: str
    aliases: tuple[str, ...]
    builder: str  # "module:function"; imported lazily so the registry never loads a framework
    input_size: int
    min_input_size: int
    feature_dim: int
    preprocessing: str
    keras_preprocess: str | None  # the matching keras.applications preprocess_input, for reference
    weights_file: str | None  # Keras's cache file name of the "imagenet" no-top weights
    weights_url: str | None
    has_classifier: bool = True
    extra: dict = field(default_factory=dict)
    # "module:function" called as f(**extra, weights=w) -> (W, b) of the ImageNet classifier; None: the
    # Keras application built with include_top=True and its "predictions" Dense layer
    classifier_fn: str | None = None

    def __str__(self) -> str:
        return self.name


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"

_SPECS = (
    BackboneSpec("ResNet50", ("r50", "resnet", "resnet50"), "keras.applications:ResNet50", 224, 32, 2048,
                 "caffe", "keras.applications.resnet50:preprocess_input",
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 _KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("InceptionV3", ("incv3", "inception", "inceptionv3", "inception_v3"),
                 "keras.applications:InceptionV3", 299, 75, 2048,
                 "tf", "keras.applications.inception_v3:preprocess_input",
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 _KERAS_WEIGHTS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("Xception", ("xcep", "xception"), "keras.applications:Xception", 299, 71, 2048,
                 "tf", "keras.applications.xception:preprocess_input",
                 "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 _KERAS_WEIGHTS + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("InceptionResNetV2", ("irv2", "inception_resnet_v2", "inceptionresnetv2"),
                 "keras.applications:InceptionResNetV2", 299, 75, 1536,
                 "tf", "keras.applications.inception_resnet_v2:preprocess_input",
                 "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 _KERAS_WEIGHTS + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("EfficientNetLite0", ("lite0", "efficientnet-lite0", "efficientnet_lite0"),
                 "catfeat.models.lite:EfficientNetLite0", 224, 32, 1280, "lite", None, None, None,
                 extra={"variant": "lite0"}, classifier_fn="catfeat.models.lite:lite_classifier"),
    BackboneSpec("EfficientNetLite1", ("lite1", "efficientnet-lite1", "efficientnet_lite1"),
                 "catfeat.models.lite:EfficientNetLite1", 240, 32, 1280, "lite", None, None, None,
                 extra={"variant": "lite1"}, classifier_fn="catfeat.models.lite:lite_classifier"),
    BackboneSpec("EfficientNetLite2", ("lite2", "efficientnet-lite2", "efficientnet_lite2"),
                 "catfeat.models.lite:EfficientNetLite2", 260, 32, 1280, "lite", None, None, None,
                 extra={"variant": "lite2"}, classifier_fn="catfeat.models.lite:lite_classifier"),
)

REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}
_LOOKUP: dict[str, BackboneSpec] = {}
for _s in _SPECS:
    for _key in (_s.name, *_s.aliases):
        _LOOKUP[_key.lower()] = _s


def get_backbone(name: str | BackboneSpec) -> BackboneSpec:
    """Look a backbone up by full name or alias, case-insensitive."""
    if isinstance(name, BackboneSpec):
        return name
    try:
        return _LOOKUP[str(name).strip().lower()]
    except KeyError:
        known = ", ".join(f"{s.name} ({'/'.join(s.aliases[:1])})" for s in _SPECS)
        raise ValueError(f"unknown backbone {name!r}; known: {known}") from None


def parse_models(models: str | list | tuple) -> list[BackboneSpec]:
    """'xcep,incv3' or ['xcep', 'InceptionV3'] -> specs, in the order given, without repeats."""
    if isinstance(models, (str, BackboneSpec)):
        models = [models] if isinstance(models, BackboneSpec) else [m for m in models.split(",") if m.strip()]
    specs: list[BackboneSpec] = []
    for m in models:
        spec = get_backbone(m)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ValueError("no backbone named; pass e.g. --models r50,incv3 (known: " + ", ".join(REGISTRY) + ")")
    return specs


def _import(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_backbone(name: str | BackboneSpec, weights: WeightsArg = "imagenet", seed: int = 0):
    """Build the backbone as a Keras model: preprocessed float input -> GAP features (None, feature_dim).

    ``weights``: anything :meth:`Weights.parse` reads: "imagenet" (Keras's download and cache, or the
    Lite packages' files), None for random weights (deterministic for ``seed``, or the seed of
    'none(seed=N)'), or a path to a weights file. Every registry builder is called the same way,
    Keras-applications style: ``builder(include_top=False, weights=..., input_shape=..., pooling="avg")``.
    """
    import keras

    spec = get_backbone(name)
    w = Weights.parse(weights)
    if w.kind == "none":  # random weights: make them reproducible. Only then: under JAX or PyTorch,
        keras.utils.set_random_seed(w.seed_or(seed))  # it imports TensorFlow (seconds) just to seed it
    shape = (spec.input_size, spec.input_size, 3)
    try:
        return _import(spec.builder)(include_top=False, weights=w.argument(), input_shape=shape, pooling="avg")
    except WeightsError:
        raise
    except (OSError, ValueError) as e:
        if w.kind == "file":
            raise WeightsError(f"could not load weights file {str(w.path)!r} into {spec.name}: {e}") from None
        raise
    except Exception as e:  # keras.utils.get_file raises a bare Exception when the download fails
        if w.kind == "imagenet" and spec.weights_url:
            raise WeightsError(
                f"could not download the ImageNet weights of {spec.name} ({e.__class__.__name__}: {e}). "
                f"Offline? Fetch {spec.weights_url} on a machine with internet and put it at "
                f"{_keras_cache_dir() / spec.weights_file}, or pass --weights PATH_TO_FILE"
            ) from None
        raise


def classifier(name: str | BackboneSpec, weights: WeightsArg = "imagenet") -> tuple[np.ndarray, np.ndarray]:
    """The backbone's ImageNet classifier as ``(W (feature_dim, 1000), b (1000,))`` float32, so that
    ``logits = gap_features @ W + b``. Keras applications have it only with ``weights="imagenet"``."""
    spec = get_backbone(name)
    if not spec.has_classifier:
        raise ValueError(f"{spec.name} has no ImageNet classifier")
    w = Weights.parse(weights)
    if spec.classifier_fn is not None:
        W, b = _import(spec.classifier_fn)(**spec.extra, weights=w)
    else:
        if w.kind != "imagenet":
            raise WeightsError(f"the ImageNet classifier of {spec.name} exists only with weights='imagenet' "
                               f"(Keras's include_top weights), not {weights!r}")
        top_file = (spec.weights_file or "").replace("_notop", "")
        try:
            model = _import(spec.builder)(include_top=True, weights="imagenet")
        except Exception as e:  # keras.utils.get_file raises a bare Exception when the download fails
            raise WeightsError(
                f"could not load the ImageNet classifier weights of {spec.name} ({e.__class__.__name__}: {e}). "
                f"Offline? Fetch {(spec.weights_url or '').replace('_notop', '')} elsewhere and put it at "
                f"{_keras_cache_dir() / top_file}") from None
        W, b = model.get_layer("predictions").get_weights()
    W, b = np.asarray(W, np.float32), np.asarray(b, np.float32)
    if W.shape != (spec.feature_dim, 1000) or b.shape != (1000,):
        raise ValueError(f"classifier of {spec.name} has shapes {W.shape}/{b.shape}, "
                         f"expected {(spec.feature_dim, 1000)}/(1000,)")
    return W, b


def preprocess(spec: BackboneSpec, x):
    """Apply the backbone's preprocessing to a float tensor of RGB 0..255 (keras.ops; returns a new tensor)."""
    from keras import ops

    if spec.preprocessing == "tf":
        return x / 127.5 - 1.0
    if spec.preprocessing == "lite":
        return (x - 127.0) / 128.0
    if spec.preprocessing == "caffe":
        mean = np.array([103.939, 116.779, 123.68], dtype="float32")
        return ops.flip(x, axis=-1) - mean
    raise ValueError(f"unknown preprocessing {spec.preprocessing!r} for {spec.name}")
