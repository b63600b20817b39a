"""The nvimgcodec decoder on nvImageCodec's CPU backend (the GPU one needs a device): pixels against the
OpenCV decoder on real photos, every odd file routed to the OpenCV path with its reasons, row order,
the cache identity, and an extraction end to end."""
from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from catfeat.images.decoders import DECODERS, available, get_decoder

from conftest import make_kaggle, real_data, save_image

pytestmark = pytest.mark.skipif(not available("nvimgcodec"), reason='nvImageCodec not installed (catfeat[test])')

SIZES = (224, 299)
nv, cv = DECODERS["nvimgcodec"].decode, DECODERS["opencv"].decode


def batches(paths, decode, reader, batch_size=4, sizes=SIZES):
    from catfeat.images.reader import iter_batches

    return list(iter_batches(paths, sizes, batch_size, workers=2, decode=decode, reader=reader))


def rows(bs) -> dict:
    """{size: all decoded rows, in order} of a list of batches, as numpy."""
    return {s: np.concatenate([np.asarray(b.images[s]) for b in bs]) for s in bs[0].images}


def assert_close(a: dict, b: dict, exact_rows=()):
    for s in a:
        d = np.abs(np.asarray(a[s]).astype(np.int16) - b[s])
        assert d.max() <= 1 and (d > 0).mean() < 0.2, (s, d.max(), (d > 0).mean())  # OpenCV's fixed point
        for r in exact_rows:  # files that took the OpenCV path in both
            np.testing.assert_array_equal(np.asarray(a[s])[r], b[s][r])


def test_real_photos_match_the_opencv_decoder_in_batches_and_one_by_one():
    paths = sorted(real_data().glob("*.jpg"))[:12]
    got, ref = batches(paths, nv, "batches", batch_size=5), batches(paths, cv, "threads", batch_size=5)
    assert [len(b) for b in got] == [5, 5, 2] and all(b.ok.all() and not b.errors for b in got)
    assert_close(rows(got), rows(ref))
    assert_close(nv(paths[0], SIZES), cv(paths[0], SIZES))


def test_the_jitted_device_resize_gives_the_host_pixels():
    from catfeat.images.jpeg import plain_jpeg
    from catfeat.images.nvimgcodec_decoder import decode_jpegs, merge_rows

    paths = sorted(real_data().glob("*.jpg"))[12:18]
    heads = [plain_jpeg(p) for p in paths]
    args = ([p.read_bytes() for p in paths], heads, SIZES, 4)
    dev, kept = decode_jpegs(*args, on_device=True)  # jax.jit on JAX's CPU device, two chunks of 4
    host, kept_host = decode_jpegs(*args, on_device=False)
    assert kept == kept_host == list(range(6)) and not isinstance(dev[224], np.ndarray)
    for s in SIZES:
        assert np.abs(np.asarray(dev[s]).astype(np.int16) - host[s]).max() <= 1
    # rows the CPU path decoded join the device rows in position order, still on the device
    extra = {s: np.full((s, s, 3), 7, np.uint8) for s in SIZES}
    merged = merge_rows({s: dev[s][:2] for s in SIZES}, [0, 3], {1: extra}, SIZES)
    assert not isinstance(merged[224], np.ndarray) and merged[224].shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(np.asarray(merged[299])[[0, 2]], np.asarray(dev[299])[:2])
    assert (np.asarray(merged[299])[1] == 7).all()


def test_a_large_photo_is_box_reduced_where_opencv_decodes_at_a_quarter(tmp_path):
    from PIL import Image

    y, x = np.mgrid[0:900, 0:1100]
    arr = np.stack([x * 255 // 1100, y * 255 // 900, (x + y) * 255 // 2000], -1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    a, b = nv(tmp_path / "big.jpg", (224,)), cv(tmp_path / "big.jpg", (224,))  # 900 >= 4 x 224: 1/4 scale
    assert np.abs(a[224].astype(np.int16) - b[224]).mean() < 1.0


def odd_folder(root: Path) -> list[Path]:
    """Plain JPEGs between every kind of file nvImageCodec must not take."""
    photos = sorted(real_data().glob("*.jpg"))
    root.mkdir()
    files = [root / f"{i:02d}.jpg" for i in range(9)]
    shutil.copy(photos[0], files[0])
    save_image(files[1].with_suffix(".png"), 1, size=(64, 48), fmt="PNG").rename(files[1])  # a PNG named .jpg
    save_image(files[2], 2, size=(64, 48), mode="CMYK")
    data = photos[1].read_bytes()
    files[3].write_bytes(data[:len(data) // 2])  # truncated: refused
    files[4].write_bytes(data[:len(data) // 2] + b"\xff\xd9")  # truncated with an end marker: damaged
    files[5].write_text("not an image")
    files[6].write_bytes(b"")
    shutil.copy(photos[2], files[7])
    save_image(files[8], 8, size=(64, 48), mode="L")  # grayscale JPEG: nvImageCodec takes it
    return files


@pytest.mark.parametrize("skip_damaged", [False, True])
def test_odd_files_take_the_opencv_path_with_the_same_reasons_and_order(tmp_path, skip_damaged):
    files = odd_folder(tmp_path / "odd")
    got = batches(files, partial(nv, skip_damaged=skip_damaged), "batches")
    ref = batches(files, partial(cv, skip_damaged=skip_damaged), "threads")
    for g, r in zip(got, ref, strict=True):
        assert (g.start, g.ok.tolist(), g.errors, g.damaged) == (r.start, r.ok.tolist(), r.errors, r.damaged)
    errors = {k: v for b in ref for k, v in b.errors.items()}
    assert set(errors) >= {3, 5, 6} and (4 in errors) == skip_damaged and all(e for e in errors.values())
    assert {k for b in ref for k in b.damaged} == (set() if skip_damaged else {4})
    ok = [i for i in range(len(files)) if np.concatenate([b.ok for b in ref])[i]]
    exact = [ok.index(i) for i in (1, 2, 4) if i in ok]  # PNG, CMYK, damaged: decoded by the same code
    a, b = rows(got), rows(ref)
    assert_close(a, b, exact_rows=exact)
    assert (a[299][ok.index(0)] != b[299][ok.index(0)]).any()  # the photos themselves: nvImageCodec's pixels


def test_the_cache_records_the_decoder_and_never_mixes_it(tmp_path):
    from catfeat import StaleCacheError, open_cache, run_extraction

    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=1)
    out = tmp_path / "features"
    rep = run_extraction(data, "lite0", out, weights=None, progress=False, decoder="nvimgcodec")
    assert rep.reader == "batches" and "nvimgcodec decoder on batches" in rep.where()
    attrs = open_cache(out / "gap_EfficientNetLite0.h5").attrs
    assert attrs["decoder"] == "nvimgcodec" and attrs["decoder_version"] not in ("", "?")
    with pytest.raises(StaleCacheError, match="decoder"):
        run_extraction(data, "lite0", out, weights=None, progress=False, decoder="opencv")
    assert get_decoder("auto").name == "opencv"  # no GPU here: auto stays on the CPU decoder


def test_extract_cli_with_nvimgcodec_end_to_end(tmp_path, capsys):
    from catfeat import load_features
    from catfeat.cli.extract import main

    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for i, p in enumerate(sorted(real_data().glob("*.jpg"))[:4]):
        shutil.copy(p, train / f"{'cat' if i % 2 else 'dog'}.{i}.jpg")
    (train / "cat.9.jpg").write_text("not an image")
    save_image(train / "dog.8.png", 3, size=(64, 48))
    args = [str(tmp_path / "data"), "--models", "lite0", "--weights", "none", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--features", str(tmp_path / "nv"), "--decoder", "nvimgcodec"]) == 0
    assert main([*args, "--features", str(tmp_path / "cv"), "--decoder", "opencv"]) == 0
    text = capsys.readouterr()
    assert (text.out + text.err).count("not an image Pillow can read") == 2
    (xa, ya, na), (xb, yb, nb) = load_features("lite0", tmp_path / "nv"), load_features("lite0", tmp_path / "cv")
    assert list(na) == list(nb) and len(na) == 5 and list(ya) == list(yb)
    x, y = next(iter(xa.values())), next(iter(xb.values()))
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.999, cos


def test_an_explicit_request_without_the_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("nvidia.nvimgcodec") else real(name, *a))
    with pytest.raises(ValueError, match=r"'nvimgcodec' needs the nvidia.nvimgcodec module.*"
                                         r"pip install \"catfeat\[gpu\]\""):
        get_decoder("nvimgcodec")
    assert get_decoder("auto").name == "opencv"


def test_every_exif_orientation_is_turned_as_the_opencv_decoder_turns_it(tmp_path):
    from PIL import Image

    photo = Image.open(sorted(real_data().glob("*.jpg"))[0]).resize((120, 80))
    files = []
    for o in range(1, 9):
        exif = photo.getexif()
        exif[0x0112] = o
        photo.save(tmp_path / f"o{o}.jpg", exif=exif.tobytes(), quality=95)
        files.append(tmp_path / f"o{o}.jpg")
    got, ref = batches(files, nv, "batches", 8, (64, 96)), batches(files, cv, "threads", 8, (64, 96))
    assert_close(rows(got), rows(ref))
    a = rows(got)[96]
    assert not np.array_equal(a[0], a[5]) and (np.abs(a[0].astype(int) - a[2][::-1, ::-1]) <= 1).all()
