"""The compiled forward pass: uint8 images in, float32 GAP features out, on any Keras 3 backend.

Cast and preprocessing run inside the model, so only uint8 crosses to the accelerator. Each
backend gets its own compiled call (``jax.jit`` over ``stateless_call``, ``tf.function``,
``torch.no_grad``); ``model.predict`` costs 1.6-2.3x more per batch on this project's CPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from catfeat.models.registry import BackboneSpec, build_backbone, preprocess

PRECISIONS = {"float32": "float32", "mixed": None, "mixed_float16": "mixed_float16",
              "mixed_bfloat16": "mixed_bfloat16"}


def backend_name() -> str:
    import keras

    return keras.backend.backend()


def resolve_precision(precision: str) -> str:
    """'mixed' picks float16 on a CUDA GPU, bfloat16 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "mixed":
        return "mixed_float16" if _has_gpu() else "mixed_bfloat16"
    return precision


def _has_gpu() -> bool:
    b = backend_name()
    try:
        if b == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if b == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if b == "torch":
            import torch

            return torch.cuda.is_available()
    except Exception:
        return False
    return False


def device_description() -> str:
    """Where the model runs, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu``."""
    b = backend_name()
    try:
        if b == "jax":
            import jax

            d = jax.devices()[0]
            kind = getattr(d, "device_kind", "")
            return f"{'cuda' if d.platform == 'gpu' else d.platform}:{d.id}" + (f" ({kind})" if d.platform != "cpu" else "")
        if b == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                return f"cuda:0 ({name})"
        if b == "torch":
            import torch

            if torch.cuda.is_available():
                return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    except Exception:
        pass
    return "cpu"


GPU_INSTALL = 'pip install -e ".[gpu]"'


def unused_gpu_hint() -> str | None:
    """One line when this machine has an NVIDIA GPU that Keras does not use, else None."""
    import os
    import shutil

    present = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
    if not present or _has_gpu():
        return None
    return (f"an NVIDIA GPU is present but Keras ({backend_name()}) runs on the CPU; install the GPU build "
            f"with `{GPU_INSTALL}` (JAX with CUDA 12; catfeat then picks the jax backend by itself)")


CPU_BATCH, GPU_BATCH = 32, 128


def default_batch_size(gpu: bool | None = None) -> int:
    """Images per model call when none is given: 32 on a CPU, 128 on a GPU, where large batches
    keep the device busy. ``gpu``: whether the model runs on one (default: this process sees one)."""
    return GPU_BATCH if (_has_gpu() if gpu is None else gpu) else CPU_BATCH


@contextlib.contextmanager
def dtype_policy(policy: str):
    """Within the block, Keras builds layers under the dtype policy ``policy`` (e.g. "mixed_float16")."""
    import keras

    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


TTA_MODES = ("none", "flip")


def feature_model(spec: BackboneSpec, weights="imagenet", seed: int = 0, precision: str = "float32",
                  tta: str = "none"):
    """Keras model: uint8 (size, size, 3) -> float32 GAP features, preprocessing included.

    ``tta="flip"``: the mean of the features of the image and of its mirror image.
    """
    import keras
    from keras import ops

    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    policy = resolve_precision(precision)
    with dtype_policy(policy):
        backbone = build_backbone(spec, weights=weights, seed=seed)
    inp = keras.Input((spec.input_size, spec.input_size, 3), dtype="uint8", name="image")
    x = preprocess(spec, ops.cast(inp, "float32"))
    out = ops.cast(backbone(x), "float32")
    if tta == "flip":
        out = (out + ops.cast(backbone(ops.flip(x, axis=2)), "float32")) / 2.0
    return keras.Model(inp, out, name=f"catfeat_{spec.name}")


def to_device(x: np.ndarray):
    """Move one host batch to the backend's default device (once; every backbone of that input size
    then reads the same copy)."""
    b = backend_name()
    if b == "jax":
        import jax

        return jax.device_put(x)
    if b == "tensorflow":
        import tensorflow as tf  # the TensorFlow fast path; only reached under that backend

        return tf.convert_to_tensor(x)
    if b == "torch":
        import keras

        return keras.ops.convert_to_tensor(x)
    return x


def on_accelerator() -> bool:
    """Whether Keras runs the model on an accelerator (a GPU) rather than on this host's CPU."""
    return _has_gpu()


def copies_off_host() -> bool:
    """Whether :func:`to_device` copies a host batch into the accelerator's own memory, so that the
    host memory may be reused once :func:`copy_done` returns (JAX and PyTorch on a GPU). On the CPU
    the backend may keep using the host array itself, and TensorFlow copies it to the GPU only
    inside the model's call: the host batch must then stay as it is until its results are read."""
    return backend_name() in ("jax", "torch") and _has_gpu()


def copy_done(device_batches) -> None:
    """Wait until the host-to-device copies of ``device_batches`` (from :func:`to_device`) are
    complete; the computations queued on them are not waited for."""
    for x in device_batches:
        ready = getattr(x, "block_until_ready", None)  # JAX copies asynchronously; torch from pageable memory does not
        if ready is not None:
            ready()


def to_host(y) -> np.ndarray:
    """Block until a dispatched result is ready and copy it to a float32 numpy array."""
    if hasattr(y, "detach"):  # torch
        y = y.detach().cpu()
    return np.asarray(y.numpy() if hasattr(y, "numpy") and not isinstance(y, np.ndarray) else y, np.float32)


def compile_forward(model, batch_size: int | None = None) -> Callable:
    """A function device (or numpy) uint8 batch -> backend output, compiled for the current backend.

    The result is not copied back: on an accelerator the call only dispatches work, so several
    models can be queued before :func:`to_host` waits for any of them. With ``batch_size`` the
    compilation happens here, without running a batch: JAX lowers and compiles the call for
    ``batch_size`` rows ahead of time (a batch of another size compiles on first use), TensorFlow
    traces one concrete function for any number of rows (its graph optimisation still runs on the
    first call); PyTorch runs eagerly, with nothing to compile. Without it, the first call compiles.
    """
    b = backend_name()
    if b == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def run_jax(tv, ntv, x):
            return model.stateless_call(tv, ntv, x, training=False)[0]

        if batch_size is None:
            return lambda x: run_jax(trainable, frozen, x)
        shape = (int(batch_size), *model.input_shape[1:])
        compiled = run_jax.lower(trainable, frozen, jax.ShapeDtypeStruct(shape, "uint8")).compile()
        return lambda x: (compiled if tuple(x.shape) == shape else run_jax)(trainable, frozen, x)
    if b == "tensorflow":
        import tensorflow as tf  # the TensorFlow fast path; only reached under that backend

        run_tf = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        if batch_size is not None:  # one graph for every batch size: a short batch needs no padding
            run_tf = run_tf.get_concrete_function(tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8))
        return lambda x: run_tf(tf.convert_to_tensor(x))
    if b == "torch":
        import torch

        def run_torch(x):
            with torch.no_grad():
                return model(x, training=False)

        return run_torch
    return lambda x: model.predict_on_batch(x)


def needs_fixed_batch() -> bool:
    """Whether every batch should have the full batch size (a short last batch padded with zeros):
    only under JAX on an accelerator, where compiling another batch shape costs seconds and a padded
    batch milliseconds. On a CPU the opposite holds (ResNet50 under JAX here: compiling for a short
    batch took 3.5 s, a padded batch of 32 ran 8.6 s, both under load), and TensorFlow and PyTorch take any number
    of rows without compiling again: the real rows run, nothing is padded."""
    if backend_name() != "jax":
        return False
    import jax

    return jax.devices()[0].platform != "cpu"


def pad_batch(images: np.ndarray, batch_size: int) -> np.ndarray:
    """``images`` padded with zero images to ``batch_size`` rows (a fixed shape never recompiles)."""
    k = len(images)
    if k == batch_size:
        return images
    if not isinstance(images, np.ndarray):  # a device batch (GPU decoding): padded where it is
        from keras import ops

        return ops.pad(images, [(0, batch_size - k)] + [(0, 0)] * (len(images.shape) - 1))
    return np.concatenate([images, np.zeros((batch_size - k, *images.shape[1:]), np.uint8)])


class Forward:
    """A compiled feature extractor: built and compiled on construction (before any batch runs, so
    no batch pays for compiling and none is run just to compile).

    ``forward(images)`` runs and returns features; :meth:`dispatch` and :meth:`fetch` split that
    in two so that a caller can queue several models (and the next batch) before waiting.
    ``fixed_batch`` (see :func:`needs_fixed_batch`): whether a short batch must be padded to
    ``batch_size`` rows before :meth:`dispatch`. On JAX the compiled programs are kept on disk
    (:func:`catfeat.models.compile_cache.enable_compile_cache`), so a rerun's build loads them.
    """

    def __init__(self, spec: BackboneSpec, weights="imagenet", seed: int = 0, precision: str = "float32",
                 batch_size: int = 32, tta: str = "none"):
        from catfeat.models.compile_cache import enable_compile_cache

        enable_compile_cache()  # before the build: on JAX the weight initializers compile too
        self.spec, self.batch_size = spec, int(batch_size)
        self.model = feature_model(spec, weights, seed, precision, tta)
        self.fixed_batch = needs_fixed_batch()
        self._run = compile_forward(self.model, self.batch_size)

    def dispatch(self, device_batch):
        """Queue one batch (from :func:`to_device`; of ``batch_size`` rows, padded by :func:`pad_batch`,
        when ``fixed_batch``, else of at most ``batch_size``); returns a handle."""
        return self._run(device_batch)

    def fetch(self, handle, n: int) -> np.ndarray:
        """Wait for a dispatched batch and return the features of its first ``n`` rows."""
        return to_host(handle)[:n]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        n = len(images)
        if n == 0:
            return np.zeros((0, self.spec.feature_dim), np.float32)
        outs = []
        for i in range(0, n, self.batch_size):
            chunk = images[i:i + self.batch_size]
            x = pad_batch(chunk, self.batch_size) if self.fixed_batch else chunk
            outs.append(self.fetch(self.dispatch(to_device(x)), len(chunk)))
        return np.concatenate(outs)
