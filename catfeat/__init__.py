"""catfeat: transfer learning by bottleneck features.

Pretrained backbones run once over an image set, their global-average-pooled features are cached
in HDF5, and a small fused head trains on them in seconds::

    import catfeat
    catfeat.extract("data/", models="lite0,lite1", out="features/")
    X, y, names = catfeat.load_features("lite0,lite1", "features/")
    head = catfeat.FusedHead().fit(X, y)
    report = catfeat.fit_report("lite0,lite1", "features/", cv=5, clip="auto")  # what `catfeat fit` does
"""
from __future__ import annotations

import importlib
import os

# TensorFlow prints start-up chatter on stderr that buries catfeat's own messages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _default_backend() -> None:
    """With the GPU extra (JAX + its CUDA plugin) installed, use JAX unless KERAS_BACKEND says
    otherwise or Keras is already imported. (keras.json is not consulted: Keras writes one naming
    tensorflow on its first import, so it does not tell a choice from a default.)"""
    import importlib.util
    import sys

    if "KERAS_BACKEND" in os.environ or "keras" in sys.modules:
        return
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        os.environ["KERAS_BACKEND"] = "jax"


_default_backend()

__version__ = "0.1.0"

# Public names -> defining module. Loaded on first use so `import catfeat` stays cheap and the
# `python -m catfeat.<command>` modules are never imported before they run.
_EXPORTS = {
    "extract": "catfeat.extraction.run",
    "run_extraction": "catfeat.extraction.run",
    "ExtractionReport": "catfeat.extraction.run",
    "load_features": "catfeat.cache.store",
    "open_cache": "catfeat.cache.store",
    "write_cache": "catfeat.cache.store",
    "CacheError": "catfeat.cache.store",
    "StaleCacheError": "catfeat.cache.store",
    "list_images": "catfeat.images.listing",
    "ImageSet": "catfeat.images.listing",
    "get_backbone": "catfeat.models.registry",
    "build_backbone": "catfeat.models.registry",
    "REGISTRY": "catfeat.models.registry",
    "Weights": "catfeat.models.weights",
    "FusedHead": "catfeat.head.estimator",
    "compare": "catfeat.head.comparison",
    "fit_report": "catfeat.head.report",
    "FitReport": "catfeat.head.report",
    "describe_caches": "catfeat.cache.describe",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'catfeat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
