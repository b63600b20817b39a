"""Extraction engines beyond this process. Each one writes the same cache files as the local engine
(:func:`catfeat.extraction.run_extraction`), so everything downstream reads them unchanged.

* :mod:`catfeat.engines.ray_engine`: Ray Data over a cluster (``pip install "catfeat[ray]"``).

Engines import their optional dependencies only when they run, so ``import catfeat`` never needs them.
"""
from __future__ import annotations


class EngineUnavailableError(RuntimeError):
    """An engine's optional dependency is missing; the message says what to install."""


__all__ = ["EngineUnavailableError"]
