"""Images in Google Cloud Storage (``gs://``), against a real GCS-compatible server started on 127.0.0.1
(gcp-storage-emulator, the GCS JSON API; see gcs_server), reached as any emulator is: by
``STORAGE_EMULATOR_HOST``, without credentials.

``catfeat extract gs://bucket/prefix/``, a Parquet manifest in the bucket and a local CSV manifest of
gs:// URLs give the cache the same files on disk give (every dataset, names, labels, features); the
stamps come from the store's own metadata (size, md5, generation) and a rewritten object grows the
cache (kept rows kept bit for bit, the changed one recomputed); a missing bucket, an endpoint that
takes no connection or a credentials file that is not there is one error line before any work.
"""
from __future__ import annotations

import io

import pytest

from servers import free_ports
from store_cases import BROKEN, BUCKET, FAST, MODEL, assert_same, content, upload_set
from test_grow import NAME, assert_equals_rebuild, assert_kept_bitwise, contents

SET = f"gs://{BUCKET}/set/"


@pytest.fixture(scope="module")
def gs(gcs_emulator):
    """``STORAGE_EMULATOR_HOST`` pointing at the test server, no Google credentials, for this module;
    cached gcsfs clients dropped before and after."""
    from gcsfs.core import GCSFileSystem

    with pytest.MonkeyPatch.context() as mp:
        for k, v in gcs_emulator.env().items():
            mp.setenv(k, v)
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        GCSFileSystem.clear_instance_cache()
        yield gcs_emulator
    GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket(gs, store_photos, store_reference):
    """The photos uploaded to gs://catfeat-photos/set/, with a CSV and a Parquet manifest of them."""
    fs = gs.fs()
    fs.mkdir(BUCKET)
    upload_set(fs, f"{BUCKET}/set", store_photos, store_reference)
    return SET


def datasets(path) -> dict:
    """Every dataset of a cache but the per-image stamps (where the bytes came from differs: a file's
    mtime, an object's generation)."""
    return {k: v for k, v in contents(path).items() if k != "attrs" and not k.endswith("_stamps")}


def assert_same_datasets(want: dict, got: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        if k in ("train", "test"):
            assert got[k].shape == want[k].shape and abs(got[k] - want[k]).max() <= 1e-6, k
        else:
            assert list(got[k]) == list(want[k]), k


def test_a_folder_url_gives_the_cache_of_the_same_files_on_disk(bucket, store_reference, tmp_path):
    from catfeat.cache.store import open_cache
    from catfeat.cli.extract import main as extract

    out = tmp_path / "features"
    assert extract([bucket, "--models", MODEL, "--weights", "none", "--features", str(out), "-q"]) == 0
    path = out / f"gap_{NAME}.h5"
    assert_same(content(store_reference), content({NAME: path}))
    assert_same_datasets(datasets(store_reference[NAME]), datasets(path))
    cache = open_cache(path)
    assert cache.attrs["data_root"] == bucket and cache.attrs["layout"] == "kaggle"


@pytest.mark.parametrize("manifest", ["parquet in the bucket", "local csv of urls"])
def test_a_manifest_gives_the_cache_of_the_same_files_on_disk(gs, bucket, store_reference, tmp_path, manifest):
    import pandas as pd

    from catfeat.extraction.run import run_extraction

    local = content(store_reference)
    if manifest == "parquet in the bucket":  # names relative to the manifest: the folder's names
        data, prefix = bucket + "manifest.parquet", ""
    else:  # a local table of gs:// URLs: its names are the URLs, their stamps listed folder by folder
        rows = pd.read_csv(io.BytesIO(gs.fs().cat_file(f"{BUCKET}/set/manifest.csv")), keep_default_na=False)
        data, prefix = tmp_path / "urls.csv", bucket
        rows.assign(image=bucket + rows["image"]).to_csv(data, index=False)
    got = content(run_extraction(data, MODEL, tmp_path / "features", **FAST).paths)
    for key in ("train_names", "test_names"):
        local[key] = [prefix + n for n in local[key]]
    local["skipped"] = [(prefix + n, why) for n, why in local["skipped"]]
    assert_same(local, got)


def test_stamps_come_from_the_store_and_a_rewritten_object_grows_the_cache(gs, bucket, store_photos,
                                                                          store_reference, tmp_path):
    from catfeat.extraction.run import run_extraction
    from catfeat.images.listing import list_images

    fs = gs.fs()
    upload_set(fs, f"{BUCKET}/grow", store_photos, store_reference)  # a set of its own, to change
    url = f"gs://{BUCKET}/grow/"
    images = list_images(url)
    for name, stamp in zip(images.names, images.stamps()):  # the object's own metadata, as the store gives it
        info = fs.info(f"{BUCKET}/grow/{name}")
        assert stamp == f"{info['size']}:{info['md5Hash']}/{info['generation']}"
    out = tmp_path / "features"
    path = run_extraction(url, MODEL, out, **FAST).paths[NAME]
    before = contents(path)

    # one object rewritten (another photo under the same name: a new generation), one added
    fs.pipe(f"{BUCKET}/grow/train/dog.1.jpg", (store_photos / "train" / "dog.3.jpg").read_bytes())
    fs.pipe(f"{BUCKET}/grow/train/cat.7.jpg", (store_photos / "train" / "cat.2.jpg").read_bytes())
    changed = list_images(url)
    assert changed.fingerprint() != images.fingerprint()
    report = run_extraction(url, MODEL, out, **FAST)
    # computed: the two, and the broken file again (a skipped file is retried, as a rebuild would)
    assert report.processed == 3 and [s["path"] for s in report.skipped] == [BROKEN]
    assert report.grown == {NAME: dict(kept=9, added=1, changed=1, removed=0, retried=1)}
    after = assert_equals_rebuild(url, path, tmp_path, "gs")
    assert assert_kept_bitwise(before, after) == 9


def test_a_missing_bucket_an_unreachable_endpoint_or_missing_credentials_is_one_error_before_any_work(
        gs, bucket, tmp_path, monkeypatch, capsys):
    from gcsfs.core import GCSFileSystem

    from catfeat.cli.extract import main as extract

    out = tmp_path / "features"
    monkeypatch.setenv("CATFEAT_READ_WAIT", "0.01")

    def one_error(data: str, *words: str) -> str:
        GCSFileSystem.clear_instance_cache()
        assert extract([data, "--models", MODEL, "--weights", "none", "--features", str(out), "-q"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and data in err[0] and all(w in err[0] for w in words), err
        assert not out.exists()
        return err[0]

    for data in ("gs://no-such-bucket/photos/", "gs://no-such-bucket/list.csv"):
        one_error(data, "not found", "bucket", "STORAGE_EMULATOR_HOST")
    (closed,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed}")
    for data in (bucket, bucket + "manifest.csv"):
        one_error(data, f"http://127.0.0.1:{closed} (STORAGE_EMULATOR_HOST) takes no connection",
                  "ConnectionRefusedError")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gs.endpoint)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    for data in (bucket, bucket + "manifest.csv"):
        one_error(data, "cannot load the credentials", "no-such-key.json", "GOOGLE_APPLICATION_CREDENTIALS")
    GCSFileSystem.clear_instance_cache()


def test_credentials_come_from_the_key_file_else_none_for_an_emulator(tmp_path, monkeypatch):
    """No server needed: which credentials gcsfs is given (loading a key file asks nothing of the network)."""
    import json

    from gcsfs.core import GCSFileSystem

    from catfeat.images.sources import backend_options, filesystem

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    assert backend_options("gs://b/x") == {"token": "anon"} and backend_options("s3://b/x") == {}
    assert backend_options("gs://b/x", {"token": "cache"}) == {}  # fsspec's configuration wins
    key = tmp_path / "key.json"  # a user's application-default login, as gcloud writes it
    key.write_text(json.dumps({"type": "authorized_user", "client_id": "id", "client_secret": "secret",
                               "refresh_token": "token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    GCSFileSystem.clear_instance_cache()
    fs, path = filesystem("gs://b/x/y.jpg")
    assert path == "b/x/y.jpg" and fs.credentials.method == "google_default"
    assert fs.credentials.credentials.refresh_token == "token"
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    fs, _ = filesystem("gs://b/x/y.jpg")
    assert fs.credentials.method == "anon" and fs.credentials.credentials is None
    GCSFileSystem.clear_instance_cache()
