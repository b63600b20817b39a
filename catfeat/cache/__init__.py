"""The HDF5 feature caches: writing, validating and loading them, streaming their rows, describing a folder of them."""
