#!/usr/bin/env bash
# The whole test suite: everything under TensorFlow (the default backend), then again under JAX the
# tests whose outcome depends on the backend: the files that run Keras code, less the tests marked
# backend_neutral (stubs, file logic, argument checks; see pyproject.toml). Exit code: the first
# failure's (pytest's 5 = "no tests collected" included).
set -u
cd "$(dirname "$0")/.."
python -m pytest -q "$@" || exit $?
KERAS_BACKEND=jax python -m pytest -q -m "not tensorflow_only and not backend_neutral" tests/test_backbones.py \
  tests/test_head.py tests/test_predict.py tests/test_cam.py tests/test_pipeline.py tests/test_extract.py "$@" || exit $?
