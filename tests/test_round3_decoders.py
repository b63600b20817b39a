"""Hostile input, round three, the decoders: orientation from XMP, JPEGs decoded with corrupt data,
files far larger than their pixels, and progressive JPEGs with thousands of scans. Real files,
both decoders, and the extract CLI in subprocesses."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from catfeat.images.decoders import DECODERS
from catfeat.images.listing import DAMAGED_JPEG, MAX_JPEG_SCANS, DecodeError, jpeg_scans
from catfeat.images.reader import iter_batches
from catfeat.cache.store import FeatureWriter, open_cache

from conftest import REPO, make_kaggle, real_data

MODEL = "lite0" if importlib.util.find_spec("catfeat.models.lite") else "r50"
CACHE = "gap_EfficientNetLite0.h5" if MODEL == "lite0" else "gap_ResNet50.h5"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SIZES = (64,)
cv, pil = DECODERS["opencv"].decode, DECODERS["pillow"].decode


def extract(data, out, *extra, timeout=240):
    """The extract CLI in a subprocess; a hang fails the test (TimeoutExpired) instead of blocking it."""
    return subprocess.run([sys.executable, "-m", "catfeat.extract", str(data), "--models", MODEL, "--weights", "none",
                           "--out", str(out), "--batch-size", "4", "--no-progress", *map(str, extra)],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def mean_abs(a, b) -> float:
    return float(np.mean([np.abs(a[s].astype(np.int16) - b[s]).mean() for s in a]))


def photo() -> bytes:
    return sorted(real_data().glob("*.jpg"))[0].read_bytes()


def damaged_copy(path) -> "os.PathLike":
    """A real photo cut in half with an end marker appended: libjpeg decodes it, the rest gray."""
    data = photo()
    path.write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    return path


# -- 1. orientation from EXIF and XMP ------------------------------------------------------------
def _xmp(value: int, element: bool) -> bytes:
    tag = (f"<tiff:Orientation>{value}</tiff:Orientation></rdf:Description>" if element
           else f'tiff:Orientation="{value}"/>')
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
            + ("> " if element else "") + tag + "</rdf:RDF></x:xmpmeta>").encode()


def _asymmetric() -> Image.Image:
    arr = np.zeros((120, 200, 3), np.uint8)
    arr[:60] = (255, 0, 0)
    arr[:, :30] = (0, 255, 0)
    arr[100:, 150:] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("source", ["exif", "xmp-attribute", "xmp-element"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_source_turns_both_decoders_alike(tmp_path, source, orientation):
    im, path = _asymmetric(), tmp_path / "o.jpg"
    if source == "exif":
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(path, exif=exif.tobytes(), quality=95)
    else:
        im.save(path, xmp=_xmp(orientation, source == "xmp-element"), quality=95)
    assert b"tiff:Orientation" in path.read_bytes() or source == "exif"
    upright = tmp_path / "plain.jpg"
    im.save(upright, quality=95)
    assert mean_abs(cv(path, SIZES), pil(path, SIZES)) < 2.0  # was 73 for XMP before
    turned = mean_abs(pil(path, SIZES), pil(upright, SIZES))
    assert (turned > 20) == (orientation != 1)  # the orientation was applied, not ignored by both


def test_exif_wins_over_a_disagreeing_xmp_in_both_decoders(tmp_path):
    im, path = _asymmetric(), tmp_path / "both.jpg"
    exif = im.getexif()
    exif[0x0112] = 3
    im.save(path, exif=exif.tobytes(), xmp=_xmp(6, False), quality=95)
    exif_only = tmp_path / "exif3.jpg"
    im.save(exif_only, exif=exif.tobytes(), quality=95)
    assert mean_abs(cv(path, SIZES), pil(path, SIZES)) < 2.0
    assert mean_abs(cv(path, SIZES), cv(exif_only, SIZES)) < 1.0  # Pillow's precedence: EXIF first


# -- 2. decoded with corrupt data ----------------------------------------------------------------
def test_truncated_jpeg_with_end_marker_is_flagged_by_both_decoders(tmp_path):
    bad = damaged_copy(tmp_path / "bad.jpg")
    good = tmp_path / "good.jpg"
    good.write_bytes(photo())
    for decode in (cv, pil):
        out = decode(bad, SIZES)
        assert out.damaged == DAMAGED_JPEG and out[64].shape == (64, 64, 3)
        assert decode(good, SIZES).damaged is None
        with pytest.raises(DecodeError, match="corrupt JPEG data.*--skip-damaged"):
            decode(bad, SIZES, skip_damaged=True)
    # a genuinely gray corner is not damage: the probe confirms before anything is flagged
    gray = tmp_path / "gray.jpg"
    Image.new("RGB", (64, 48), (128, 128, 128)).save(gray)
    assert cv(gray, SIZES).damaged is None and pil(gray, SIZES).damaged is None


def test_damaged_rows_travel_through_the_process_reader(tmp_path):
    bad = damaged_copy(tmp_path / "bad.jpg")
    good = tmp_path / "good.jpg"
    good.write_bytes(photo())
    batches = list(iter_batches([good, bad, good], SIZES, 4, workers=1, decode=cv, reader="processes"))
    assert len(batches) == 1 and batches[0].ok.tolist() == [True, True, True]
    assert batches[0].damaged == {1: DAMAGED_JPEG} and batches[0].errors == {}


def test_damaged_list_survives_a_resume_with_rows_past_the_marker(tmp_path):
    names = [f"cat.{i}.jpg" for i in range(6)]
    labels, split = np.zeros(6, np.int64), ["train"] * 6
    attrs = {"backbone": "X", "dtype": "float32", "on_damaged": "keep"}
    path = tmp_path / "gap_X.h5"
    w = FeatureWriter(path, attrs, names, labels, split, 2)
    w.write(0, np.ones(3, bool), np.ones((3, 2)), {}, {1: "corrupt A"})
    w.write(3, np.ones(3, bool), np.ones((3, 2)), {}, {4: "corrupt B"})
    w.close()
    with h5py.File(w.partial, "r+") as f:  # as if killed after the second batch's rows, before its marker
        f.attrs["rows_written"] = 3
    w = FeatureWriter(path, attrs, names, labels, split, 2)
    assert w.resumed_from == 3
    w.write(3, np.ones(3, bool), np.ones((3, 2)), {}, {4: "corrupt B"})
    w.finish()
    cache = open_cache(path)
    assert cache.damaged() == [{"path": "cat.1.jpg", "reason": "corrupt A"}, {"path": "cat.4.jpg", "reason": "corrupt B"}]
    assert len(cache.names()) == 6


def _hostile_scans(data: bytes, copies: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``copies`` times (each a full pass for libjpeg)."""
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * copies + b"\xff\xd9"


def _progressive(path) -> bytes:
    Image.open(sorted(real_data().glob("*.jpg"))[1]).save(path, progressive=True, quality=90)
    return path.read_bytes()


def test_thousands_of_scans_are_refused_by_both_decoders(tmp_path):
    prog = _progressive(tmp_path / "prog.jpg")
    assert 1 < jpeg_scans(prog) <= 20
    hostile = tmp_path / "scans.jpg"
    hostile.write_bytes(_hostile_scans(prog, 1500))
    assert jpeg_scans(hostile.read_bytes()) > MAX_JPEG_SCANS
    for decode in (cv, pil):
        with pytest.raises(DecodeError, match=r"more than 1,000 scans"):
            decode(hostile, SIZES)
        out = decode(tmp_path / "prog.jpg", SIZES)
        assert out.damaged is None
    # marker bytes inside metadata are not scans: a comment full of FF DA still decodes
    commented = tmp_path / "comment.jpg"
    Image.open(tmp_path / "prog.jpg").save(commented, comment=b"\xff\xda" * 3000, progressive=True, quality=90)
    assert jpeg_scans(commented.read_bytes()) == jpeg_scans(prog)
    assert mean_abs(cv(commented, SIZES), pil(commented, SIZES)) < 2.0


def test_extract_keeps_and_lists_damaged_files_or_skips_them(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=1)
    damaged_copy(data / "train" / "cat.5.jpg")
    _progressive(data / "train" / "dog.5.jpg")
    (data / "train" / "dog.6.jpg").write_bytes(_hostile_scans((data / "train" / "dog.5.jpg").read_bytes(), 1500))
    out = tmp_path / "f"
    r = extract(data, out)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert text.count(f"damaged train/cat.5.jpg: {DAMAGED_JPEG}") == 1, text
    assert text.count("skipped train/dog.6.jpg: JPEG with more than 1,000 scans") == 1, text
    assert "8 images processed; 1 skipped; 1 decoded with corrupt data" in r.stdout, text
    cache = open_cache(out / CACHE)
    assert cache.damaged() == [{"path": "train/cat.5.jpg", "reason": DAMAGED_JPEG}]
    assert {"train/cat.5.jpg", "train/dog.5.jpg"} <= set(cache.names("train")) and cache.attrs["on_damaged"] == "keep"

    r = extract(data, out, "--skip-damaged")  # another set of rows: not the same cache
    assert r.returncode != 0 and "on_damaged" in r.stdout + r.stderr and "Traceback" not in r.stderr
    r = extract(data, out, "--skip-damaged", "--force")
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert text.count(f"skipped train/cat.5.jpg: {DAMAGED_JPEG}; skipped (--skip-damaged)") == 1, text
    cache = open_cache(out / CACHE)
    assert cache.damaged() == [] and "train/cat.5.jpg" not in set(cache.names("train"))
    assert {s["path"] for s in cache.skipped()} == {"train/cat.5.jpg", "train/dog.6.jpg"}
    r = extract(data, out, "--skip-damaged")
    assert r.returncode == 0 and "reused" in r.stdout, r.stdout + r.stderr


# -- 3. bounded reads ----------------------------------------------------------------------------
CHILD = """
import sys
from catfeat.images.decoders import DECODERS
from catfeat.images.listing import DecodeError
for name in ("opencv", "pillow"):
    try:
        DECODERS[name].decode(sys.argv[1], (64,))
        print(name, "decoded")
    except DecodeError as e:
        print(name, "refused:", e)
# VmHWM is this process's own peak; ru_maxrss would include the parent's size at fork on Linux
print("maxrss_kib", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def test_a_sparse_2gb_jpeg_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(photo())
    os.truncate(big, 2 << 30)  # sparse: no disk used
    r = subprocess.run([sys.executable, "-c", CHILD, str(big)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for name in ("opencv", "pillow"):
        assert lines[name].startswith("refused: file is 2,147,483,648 bytes, more than a "), r.stdout
    assert int(lines["maxrss_kib"]) * 1024 < (400 << 20), r.stdout  # the file is 2 GiB

    trailer = tmp_path / "trailer.jpg"  # metadata or a trailer of a few MB is still read
    trailer.write_bytes(photo() + bytes(4 << 20))
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(photo())
    for decode in (cv, pil):
        assert mean_abs(decode(trailer, SIZES), decode(plain, SIZES)) == 0.0
