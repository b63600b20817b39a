"""What the object-store tests share (SeaweedFS's S3 in test_object_store, the GCS emulator in
test_gcs_store): a Kaggle-layout folder of real photos with one broken file, the same files with a CSV
and a Parquet manifest of them in a bucket, and what two caches of them must share."""
from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np

from conftest import real_data

MODEL = "lite0" if importlib.util.find_spec("catfeat.models.lite") else "r50"
FAST = dict(weights=None, batch_size=4, progress=False)
BUCKET = "catfeat-photos"
BROKEN = "train/cat.999.jpg"  # not an image: skipped with the same reason wherever it is read from


def make_photos(root: Path) -> Path:
    """A Kaggle-layout folder of real photos (4 cats, 4 dogs, 2 test) and one broken file, at ``root``."""
    src = real_data("small200")
    for sub, names in (("train", [f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(4)]),
                       ("test", ["1.jpg", "2.jpg"])):
        (root / sub).mkdir(parents=True)
        for name in names:
            shutil.copyfile(src / sub / name, root / sub / name)
    (root / BROKEN).write_bytes(b"not an image at all")
    return root


def upload_set(fs, prefix: str, photos: Path, reference: dict) -> None:
    """The photos put under ``prefix`` (``bucket/folder``) of the fsspec filesystem ``fs``, with
    ``manifest.csv`` and ``manifest.parquet`` listing them (labels, splits) in the order the folder
    lists them; ``reference``: the paths of the cache extracted from the local folder."""
    import pandas as pd

    from catfeat.cache.store import open_cache

    for path in sorted(photos.rglob("*.jpg")):
        fs.pipe(f"{prefix}/{path.relative_to(photos).as_posix()}", path.read_bytes())
    cache = open_cache(next(iter(reference.values())))
    names = [str(n) for n in cache.names("train")] + [s["path"] for s in cache.skipped()] + \
        [str(n) for n in cache.names("test")]
    # the folder's order: train (cats, then dogs; the broken cat among them), then test
    train = sorted((n for n in names if n.startswith("train/")), key=lambda n: (n.split("/")[1].split(".")[0],
                                                                              int(n.split(".")[1])))
    rows = [{"image": n, "label": n.split("/")[1].split(".")[0], "split": "train"} for n in train] + \
           [{"image": n, "label": "", "split": "test"} for n in names if n.startswith("test/")]
    assert cache.known_classes() == ["cat", "dog"]
    df = pd.DataFrame(rows)
    fs.pipe(f"{prefix}/manifest.csv", df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.assign(label=df["label"].replace("", None)).to_parquet(buf, index=False)
    fs.pipe(f"{prefix}/manifest.parquet", buf.getvalue())


def content(paths: dict) -> dict:
    """What must match between two caches: features, names and labels per split, the skipped list."""
    from catfeat.cache.store import open_cache

    cache = open_cache(next(iter(paths.values())))
    return {"train": cache.features("train"), "test": cache.features("test"),
            "train_names": [str(n) for n in cache.names("train")], "test_names": [str(n) for n in cache.names("test")],
            "labels": cache.labels().tolist(), "classes": cache.known_classes(),
            "skipped": [(s["path"], s["reason"]) for s in cache.skipped()]}


def assert_same(a: dict, b: dict) -> None:
    """``b`` holds what ``a`` holds (features equal up to float rounding)."""
    for key in a:
        if isinstance(a[key], np.ndarray):
            # relative: random-weight features of these photos are ~1e-11, under any absolute tolerance
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=0, err_msg=key)
        else:
            assert b[key] == a[key], key
