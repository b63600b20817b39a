"""Extraction: one run over an image set (local engine), its reader / model / writer stages, and the Ray engine."""
