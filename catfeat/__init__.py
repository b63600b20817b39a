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
    "extract": "catfeat.extraction",
    "run_extraction": "catfeat.extraction",
    "ExtractionReport": "catfeat.extraction",
    "load_features": "catfeat.store",
    "open_cache": "catfeat.store",
    "write_cache": "catfeat.store",
    "CacheError": "catfeat.store",
    "StaleCacheError": "catfeat.store",
    "list_images": "catfeat.images",
    "ImageSet": "catfeat.images",
    "get_backbone": "catfeat.backbones",
    "build_backbone": "catfeat.backbones",
    "REGISTRY": "catfeat.backbones",
    "Weights": "catfeat.backbones",
    "FusedHead": "catfeat.head",
    "compare": "catfeat.comparison",
    "fit_report": "catfeat.report",
    "FitReport": "catfeat.report",
    "describe_caches": "catfeat.info",
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
