"""Listing, labelling, ordering and decoding images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catfeat.images.decoders import decode_image
from catfeat.images.listing import DecodeError, ImageSetError, list_images
from catfeat.images.reader import iter_batches

from conftest import make_kaggle, real_data, save_image


def test_kaggle_layout_labels_and_natural_order(tmp_path):
    root = tmp_path / "d"
    for k in (10, 2, 1):
        save_image(root / "train" / f"dog.{k}.jpg", k)
        save_image(root / "train" / f"cat.{k}.jpg", k)
    for k in (11, 3):
        save_image(root / "test" / f"{k}.jpg", k)
    s = list_images(root)
    assert s.layout == "kaggle"
    assert s.names == ["train/cat.1.jpg", "train/cat.2.jpg", "train/cat.10.jpg",
                       "train/dog.1.jpg", "train/dog.2.jpg", "train/dog.10.jpg", "test/3.jpg", "test/11.jpg"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, -1, -1]
    assert s.classes == ["cat", "dog"]
    assert s.split == ["train"] * 6 + ["test"] * 2


def test_flat_and_class_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    save_image(flat / "dog.3.jpg", 1)
    save_image(flat / "cat.4.jpg", 2)
    s = list_images(flat)
    assert (s.layout, s.names, s.labels.tolist()) == ("flat", ["cat.4.jpg", "dog.3.jpg"], [0, 1])

    folders = tmp_path / "folders"
    for cls, n in (("zebra", 2), ("ant", 1), ("bee", 1)):
        for k in range(n):
            save_image(folders / cls / f"img{k}.png", k)
    s = list_images(folders)
    assert s.layout == "folders"
    assert s.classes == ["ant", "bee", "zebra"]
    assert s.names == ["ant/img0.png", "bee/img0.png", "zebra/img0.png", "zebra/img1.png"]
    assert s.labels.tolist() == [0, 1, 2, 2]


def test_limit_keeps_both_classes(tmp_path):
    root = make_kaggle(tmp_path / "d", n_per_class=5, n_test=4)
    s = list_images(root, limit=4)
    train = [n for n, sp in zip(s.names, s.split) if sp == "train"]
    assert train == ["train/cat.0.jpg", "train/cat.1.jpg", "train/dog.0.jpg", "train/dog.1.jpg"]
    assert s.count("test") == 4


def test_missing_empty_and_unlabelled_folders_are_clear_errors(tmp_path):
    with pytest.raises(ImageSetError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSetError, match="no images found"):
        list_images(tmp_path / "empty")
    save_image(tmp_path / "unl" / "holiday.jpg", 0)
    with pytest.raises(ImageSetError, match="carry no class"):
        list_images(tmp_path / "unl")


def test_fingerprint_changes_with_the_image_list(tmp_path):
    root = make_kaggle(tmp_path / "d")
    a = list_images(root).fingerprint()
    assert list_images(root).fingerprint() == a
    save_image(root / "train" / "cat.99.jpg", 9)
    assert list_images(root).fingerprint() != a


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_decode_any_mode_to_rgb(tmp_path, mode):
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    img = Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray((np.full((20, 30), 120 * 256, np.uint16)))
    img.save(path if mode != "CMYK" else path.with_suffix(".jpg"))
    out = decode_image(path if mode != "CMYK" else path.with_suffix(".jpg"), [16, 8])
    assert out[16].shape == (16, 16, 3) and out[8].shape == (8, 8, 3) and out[16].dtype == np.uint8
    assert abs(float(out[16].mean()) - 120) < 25


def test_png_named_jpg_and_exif_rotation(tmp_path):
    p = save_image(tmp_path / "cat.1.jpg", 0, fmt="PNG")
    assert decode_image(p, [10])[10].shape == (10, 10, 3)
    # a 40x20 image tagged "rotate 90" decodes as 20 wide, 40 tall: left half dark -> top dark
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif)
    out = decode_image(tmp_path / "rot.jpg", [40])[40].astype(float)
    assert out[:15].mean() < 60 and out[-15:].mean() > 190


def test_bad_files_raise_decode_error_with_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = save_image(tmp_path / "good.jpg", 0, size=(64, 64))
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:200])
    (tmp_path / "dir.jpg").mkdir()
    for name, reason in (("empty.jpg", "empty"), ("text.jpg", "not an image"), ("dir.jpg", "folder"),
                         ("missing.jpg", "not found"), ("trunc.jpg", "(?i)truncated")):
        with pytest.raises(DecodeError, match=reason):
            decode_image(tmp_path / name, [8])


def test_iter_batches_keeps_order_and_reports_failures(tmp_path):
    paths = [save_image(tmp_path / f"cat.{k}.jpg", k) for k in range(7)]
    paths[3].write_bytes(b"junk")
    seen, errors = [], {}
    for b in iter_batches(paths, [8, 12], batch_size=3, start=1, workers=3):
        seen.append((b.start, len(b)))
        errors.update(b.errors)
        assert b.images[8].shape[0] == b.images[12].shape[0] == int(b.ok.sum())
    assert seen == [(1, 3), (4, 3)]
    assert list(errors) == [3]
    single = decode_image(paths[5], [12])[12]
    batch = next(iter_batches(paths, [12], batch_size=2, start=4))
    np.testing.assert_array_equal(batch.images[12][1], single)


def test_real_photos_decode():
    root = real_data("original")
    s = list_images(root, limit=6)
    assert s.layout == "flat" and sorted(set(s.labels.tolist())) == [0, 1]
    batch = next(iter_batches(s.paths(), [224, 299], batch_size=6))
    assert batch.ok.all() and batch.images[299].shape == (6, 299, 299, 3)
