#!/usr/bin/env bash
# The whole test suite: everything under TensorFlow (the default backend), then the core tests
# again under JAX. Exit code: the first failure's (pytest's 5 = "no tests collected" included).
set -u
cd "$(dirname "$0")/.."
python -m pytest -q "$@" || exit $?
KERAS_BACKEND=jax python -m pytest -q -m "not tensorflow_only" tests/test_images.py tests/test_backbones.py tests/test_head.py tests/test_predict.py tests/test_cam.py tests/test_pipeline.py \
  tests/test_extract.py "$@" || exit $?
