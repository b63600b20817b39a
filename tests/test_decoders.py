"""The OpenCV decoder against the Pillow reference: same pixels within a small difference, same verdicts
on odd files (they go to Pillow), recorded in the cache."""
from __future__ import annotations

import re

import numpy as np
import pytest

from catfeat.images.decoders import DECODERS, get_decoder
from catfeat.images.listing import DecodeError

from conftest import make_kaggle, real_data, save_image

SIZES = (224, 299)
cv, pil = DECODERS["opencv"].decode, DECODERS["pillow"].decode


def mean_abs(a, b):
    return float(np.mean([np.abs(a[s].astype(np.int16) - b[s]).mean() for s in a]))


def test_real_photos_match_pillow_closely():
    paths = sorted(real_data().glob("*.jpg"))[:20]
    diffs = [mean_abs(cv(p, SIZES), pil(p, SIZES)) for p in paths]
    for p in paths[:3]:
        out = cv(p, SIZES)
        assert {s: out[s].shape for s in SIZES} == {s: (s, s, 3) for s in SIZES}
        assert all(out[s].dtype == np.uint8 for s in SIZES)
    assert np.mean(diffs) < 2.0 and max(diffs) < 6.0  # of 255; measured ~1.3 mean


def test_large_photo_is_shrunk_while_decoding_and_still_matches(tmp_path):
    # A smooth 2400x1800 picture: the DCT-domain 1/4 decode plus a bilinear resize stays close.
    y, x = np.mgrid[0:1800, 0:2400]
    arr = np.stack([x * 255 // 2400, y * 255 // 1800, (x + y) * 255 // 4200], -1).astype(np.uint8)
    from PIL import Image

    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    assert mean_abs(cv(tmp_path / "big.jpg", SIZES), pil(tmp_path / "big.jpg", SIZES)) < 2.0


def test_exif_rotation_is_applied_like_pillow(tmp_path):
    from PIL import Image

    arr = np.zeros((300, 480, 3), np.uint8)
    arr[:150] = (255, 0, 0)
    arr[:, :60] = (0, 255, 0)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert mean_abs(cv(tmp_path / "rot.jpg", SIZES), pil(tmp_path / "rot.jpg", SIZES)) < 3.0


@pytest.mark.parametrize("mode, fmt, name", [("RGBA", "PNG", "a.png"), ("CMYK", "JPEG", "c.jpg"),
                                             ("P", "GIF", "g.jpg"), ("L", "PNG", "l.png")])
def test_files_that_are_not_plain_jpegs_take_the_pillow_path_exactly(tmp_path, mode, fmt, name):
    path = save_image(tmp_path / name, 3, size=(64, 48), mode=mode, fmt=fmt)
    a, b = cv(path, SIZES), pil(path, SIZES)
    for s in SIZES:
        np.testing.assert_array_equal(a[s], b[s])


def test_truncated_jpeg_is_refused_as_pillow_refuses_it(tmp_path):
    good = save_image(tmp_path / "good.jpg", 1, size=(200, 150))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:600])
    with pytest.raises(DecodeError) as e_cv:
        cv(cut, SIZES)
    with pytest.raises(DecodeError) as e_pil:
        pil(cut, SIZES)
    assert str(e_cv.value) == str(e_pil.value)


def test_get_decoder():
    assert get_decoder("auto").name == "opencv"
    assert get_decoder("pillow").name == "pillow"
    with pytest.raises(ValueError, match="decoder must be"):
        get_decoder("magick")


def test_the_decoder_is_part_of_the_cache_identity(tmp_path):
    from catfeat import StaleCacheError, open_cache, run_extraction

    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=1)
    out = tmp_path / "features"
    run_extraction(data, "lite0", out, weights=None, progress=False, decoder="opencv")
    cache = open_cache(out / "gap_EfficientNetLite0.h5")
    assert cache.attrs["decoder"] == "opencv" and cache.attrs["decoder_version"]
    assert cache.attrs["dct_scaling"] == "per-size"
    with pytest.raises(StaleCacheError, match="decoder"):
        run_extraction(data, "lite0", out, weights=None, progress=False, decoder="pillow")
    rep = run_extraction(data, "lite0", out, weights=None, progress=False, decoder="auto")
    assert rep.reused == ["EfficientNetLite0"]
    import h5py

    with h5py.File(cache.path, "r+") as f:  # as catfeat wrote it before the scale was chosen per size
        del f.attrs["dct_scaling"]
    with pytest.raises(StaleCacheError, match="dct_scaling: cache has 'largest-size', asked 'per-size'"):
        run_extraction(data, "lite0", out, weights=None, progress=False, decoder="opencv")


def test_pixels_at_one_size_do_not_depend_on_the_sizes_decoded_beside_it(tmp_path):
    """The DCT scale is chosen per input size: a 1200x900 photo is decoded at 1/4 for 224 and at 1/2 for
    299, so a backbone's input (and features) are the same whichever backbones run beside it."""
    from PIL import Image

    from catfeat.images.decoders import available

    path = tmp_path / "big.jpg"
    Image.open(real_data() / "cat.0.jpg").convert("RGB").resize((1200, 900), Image.BICUBIC).save(path, quality=90)
    for name in ["opencv"] + (["nvimgcodec"] if available("nvimgcodec") else []):
        decode = DECODERS[name].decode
        both = decode(path, SIZES)
        for s in SIZES:
            np.testing.assert_array_equal(decode(path, (s,))[s], both[s], err_msg=f"{name} at {s}")
    import cv2

    quarter = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_REDUCED_COLOR_4)  # 900 >= 4 x 224
    want = cv2.cvtColor(cv2.resize(quarter, (224, 224), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(cv(path, SIZES)[224], want)


def test_missing_decoders_are_named_with_the_interpreter_and_the_fix(monkeypatch):
    import importlib.util
    import sys

    from catfeat.images.decoders import get_decoder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("cv2", "PIL") else real(name, *a))
    with pytest.raises(ValueError, match="no image decoder .* is installed in " + re.escape(sys.executable)):
        get_decoder("auto")
    with pytest.raises(ValueError, match="'opencv' needs the cv2 module.*--decoder pillow"):
        get_decoder("opencv")
    with pytest.raises(ValueError, match="'pillow' needs the PIL module.*pip install pillow$"):
        get_decoder("pillow")
