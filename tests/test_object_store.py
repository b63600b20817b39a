"""Images in object storage and in manifests, against a real SeaweedFS S3 store started on 127.0.0.1.

Extraction from ``s3://bucket/prefix/``, from a CSV and from a Parquet manifest in the bucket gives
the cache extraction from the same files on disk gives (features, names, labels, skipped); a
missing bucket or wrong credentials is one error before anything is written; transient read errors
are retried, then the file is skipped with its reason; a manifest's bad column is named.
"""
from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest

from store_cases import BROKEN, BUCKET, FAST, MODEL, assert_same, content, upload_set


@pytest.fixture(scope="module")
def s3(seaweedfs):
    """The standard AWS variables pointing at the test store, for this module; cached clients dropped."""
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for k, v in seaweedfs.env().items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        yield seaweedfs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket(s3, store_photos, store_reference):
    """The photos uploaded to s3://catfeat-photos/set/, with a CSV and a Parquet manifest of them."""
    fs = s3.fs()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    upload_set(fs, f"{BUCKET}/set", store_photos, store_reference)
    return f"s3://{BUCKET}/set/"


def test_a_folder_url_gives_the_cache_of_the_same_files_on_disk(bucket, store_reference, tmp_path, capsys):
    from catfeat.cache.store import open_cache
    from catfeat.cli.info import main as info
    from catfeat.extraction.run import run_extraction

    local = content(store_reference)
    assert len(local["train_names"]) == 8 and len(local["test_names"]) == 2
    assert local["skipped"] and local["skipped"][0][0] == BROKEN
    # worker processes read by URL too (they get the credentials from the environment)
    got = run_extraction(bucket, MODEL, tmp_path, reader="processes", workers=2, **FAST)
    assert_same(local, content(got.paths))
    cache = open_cache(next(iter(got.paths.values())))
    assert cache.attrs["data_root"] == bucket and cache.attrs["layout"] == "kaggle"
    capsys.readouterr()
    assert info([str(tmp_path)]) == 0
    assert f"data: {bucket}" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", ["manifest.csv", "manifest.parquet"])
def test_a_manifest_in_the_bucket_gives_the_cache_of_the_same_files_on_disk(bucket, store_reference, tmp_path,
                                                                            manifest):
    from catfeat.cache.store import open_cache
    from catfeat.extraction.run import run_extraction

    url = bucket + manifest
    got = run_extraction(url, MODEL, tmp_path, **FAST)
    assert_same(content(store_reference), content(got.paths))
    cache = open_cache(next(iter(got.paths.values())))
    assert cache.attrs["data_root"] == url and cache.attrs["layout"] == "manifest"


def test_stamps_come_from_the_listing_and_follow_a_changed_object(bucket, s3):
    from catfeat.images.listing import list_images

    fs = s3.fs()
    images = list_images(bucket)
    infos = {i["name"]: i for i in fs.find(f"{BUCKET}/set", detail=True).values()}
    info = infos[f"{BUCKET}/set/train/dog.1.jpg"]
    stamps = images.stamps()
    assert stamps[images.names.index("train/dog.1.jpg")] == f"{info['size']}:{info['ETag'].strip(chr(34))}"
    before = images.fingerprint()
    key = f"{BUCKET}/set/train/dog.1.jpg"
    original = fs.cat_file(key)
    try:
        fs.pipe(key, original + b"\0")  # same name, new bytes: a new ETag
        assert list_images(bucket).fingerprint() != before
    finally:
        fs.pipe(key, original)


def test_a_missing_bucket_or_wrong_credentials_is_one_error_before_any_work(bucket, s3, tmp_path, monkeypatch,
                                                                            capsys):
    import s3fs

    from catfeat.cli.extract import main as extract

    out = tmp_path / "features"
    for data in ("s3://no-such-bucket/photos/", "s3://no-such-bucket/list.csv"):
        assert extract([data, "--models", MODEL, "--weights", "none", "--features", str(out), "-q"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no-such-bucket" in err[0] and "bucket" in err[0].split("no-such-bucket", 1)[1]
        assert not out.exists()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        for data in (bucket, bucket + "manifest.csv"):
            assert extract([data, "--models", MODEL, "--weights", "none", "--features", str(out), "-q"]) != 0
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and data in err[0] and "AWS_SECRET_ACCESS_KEY" in err[0], err
            assert not out.exists()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def flaky(s3, monkeypatch):
    """``flaky://`` URLs: the real store through s3fs, except that the first read (open or GET) of every
    object fails with a connection reset (as a dropped connection does), and objects named in ``always``
    fail every time."""
    import fsspec
    import s3fs

    class FlakyS3(s3fs.S3FileSystem):
        protocol = ("flaky",)
        opened: collections.Counter = collections.Counter()
        always: set = set()

        @staticmethod
        def _read(key):
            FlakyS3.opened[key] += 1
            if FlakyS3.opened[key] == 1 or key.rsplit("/", 1)[-1] in FlakyS3.always:
                raise ConnectionResetError(104, "Connection reset by peer")

        def _open(self, path, mode="rb", **kwargs):  # a URL read without its size
            self._read(self._strip_protocol(path))
            return super()._open(path, mode, **kwargs)

        async def _cat_file(self, path, *args, **kwargs):  # a listed URL: one GET
            self._read(self._strip_protocol(path))
            return await super()._cat_file(path, *args, **kwargs)

    fsspec.register_implementation("flaky", FlakyS3, clobber=True)
    monkeypatch.setenv("CATFEAT_READ_TRIES", "3")
    monkeypatch.setenv("CATFEAT_READ_WAIT", "0.01")
    yield FlakyS3
    # (left registered: a later registration replaces it, clobber=True)


def test_transient_read_errors_are_retried_then_the_file_is_skipped_with_its_reason(bucket, store_reference, flaky,
                                                                                   tmp_path):
    from catfeat.extraction.run import run_extraction
    from catfeat.images.unit import decode_timed

    # one image: the first read fails, the second gives the same arrays as the file on disk
    url = bucket.replace("s3://", "flaky://") + "train/cat.1.jpg"
    arrays, reason, _, _ = decode_timed(url, [32])
    assert reason is None and flaky.opened[f"{BUCKET}/set/train/cat.1.jpg"] == 2
    # a missing object is not retried: after the reset, one more try says so, and it is skipped with the reason
    arrays, reason, _, _ = decode_timed(bucket.replace("s3://", "flaky://") + "train/gone.1.jpg", [32])
    assert arrays is None and "not found" in reason and flaky.opened[f"{BUCKET}/set/train/gone.1.jpg"] == 2

    flaky.opened.clear()
    flaky.always.add("dog.2.jpg")
    got = run_extraction(bucket.replace("s3://", "flaky://"), MODEL, tmp_path, reader="threads", **FAST)
    local, remote = content(store_reference), content(got.paths)
    skipped = dict(remote["skipped"])
    assert set(skipped) == {BROKEN, "train/dog.2.jpg"} and skipped[BROKEN] == dict(local["skipped"])[BROKEN]
    assert "after 3 tries" in skipped["train/dog.2.jpg"] and "ConnectionResetError" in skipped["train/dog.2.jpg"]
    assert flaky.opened[f"{BUCKET}/set/train/dog.2.jpg"] == 3
    assert all(n == 2 for k, n in flaky.opened.items() if not k.endswith(("dog.2.jpg", ".999.jpg"))), flaky.opened
    keep = [i for i, n in enumerate(local["train_names"]) if n != "train/dog.2.jpg"]
    assert remote["train_names"] == [local["train_names"][i] for i in keep]
    np.testing.assert_allclose(remote["train"], local["train"][keep], rtol=0, atol=1e-6)
    np.testing.assert_allclose(remote["test"], local["test"], rtol=0, atol=1e-6)


def test_a_manifest_with_a_missing_or_bad_column_is_refused_naming_the_column(tmp_path, bucket, s3):
    from catfeat.images.listing import list_images
    from catfeat.images.manifest import ManifestError

    cases = {
        "path,label\ntrain/cat.1.jpg,cat\n": ("'image'", "path, label"),
        "image,label,split\ntrain/cat.1.jpg,cat,validation\n": ("'split'", "'validation'"),
        "image,split\ntrain/cat.1.jpg,train\n": ("'label'", "train/cat.1.jpg"),
        "image,label\ntrain/cat.1.jpg,cat\ntrain/cat.1.jpg,cat\n": ("'image'", "twice"),
        "image,label\n,cat\n": ("'image'", "row 1 is empty"),
    }
    for i, (text, words) in enumerate(cases.items()):
        path = tmp_path / f"m{i}.csv"
        path.write_text(text)
        with pytest.raises(ManifestError) as e:
            list_images(path)
        assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    s3.fs().pipe(f"{BUCKET}/lists/nocolumn.csv", b"file\nset/train/cat.1.jpg\n")
    with pytest.raises(ManifestError, match=r"s3://catfeat-photos/lists/nocolumn.csv has no column 'image'"):
        list_images(f"s3://{BUCKET}/lists/nocolumn.csv")


def test_a_file_url_and_a_local_manifest_list_what_the_folder_lists(tmp_path):
    """No server needed: ``file://`` goes through fsspec too, a local manifest resolves its relative paths."""
    from conftest import make_kaggle

    from catfeat.images.listing import image_location, list_images

    data = make_kaggle(tmp_path / "data", n_per_class=3, n_test=2)
    folder = list_images(data)
    url = list_images(f"file://{data}/")
    assert (url.names, url.labels.tolist(), url.split, url.classes, url.layout) == \
        (folder.names, folder.labels.tolist(), folder.split, folder.classes, folder.layout)
    assert url.data_root() == f"file://{data}/" and url.paths()[0] == f"file://{data}/{folder.names[0]}"
    sizes = [int(s.split(":")[0]) for s in url.stamps()]
    assert sizes == [(data / n).stat().st_size for n in folder.names]
    manifest = data / "list.csv"
    manifest.write_text("image,label\n" + "".join(f"{n},{n.split('/')[1].split('.')[0]}\n" for n in folder.names
                                                  if n.startswith("train/"))
                        + "".join(f"{n},\n" for n in folder.names if n.startswith("test/")))
    listed = list_images(manifest)
    assert (listed.names, listed.labels.tolist(), listed.split, listed.classes) == \
        (folder.names, folder.labels.tolist(), folder.split, folder.classes)
    assert listed.paths() == [data / n for n in folder.names] and listed.layout == "manifest"
    assert listed.stamps() == folder.stamps() and image_location(str(manifest), "test/1.jpg") == data / "test/1.jpg"
    assert list_images(manifest, limit=2).names == ["train/cat.0.jpg", "train/dog.0.jpg", "test/1.jpg", "test/2.jpg"]


def test_an_object_too_large_for_its_header_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """The header check a local file gets from its stat, made on the first bytes of an object."""
    from conftest import save_image

    import catfeat.images.sources as sources
    from catfeat.images.listing import file_size_limit
    from catfeat.images.unit import decode_timed

    path = save_image(tmp_path / "cat.1.jpg", 1, size=(40, 30))
    with open(path, "ab") as f:  # a 40 x 30 JPEG with more trailing bytes than such an image can need
        f.truncate(file_size_limit(40, 30) + 1)
    local = decode_timed(path, [32])
    import fsspec.implementations.local as fl

    read, original = [], fl.LocalFileOpener.read

    def counted(self, *args):
        data = original(self, *args)
        read.append(len(data))
        return data

    monkeypatch.setattr(fl.LocalFileOpener, "read", counted)
    remote = decode_timed(f"file://{path}", [32])
    assert local[0] is None and remote[0] is None and remote[1] == local[1] and "more than a 40x30 image" in local[1]
    assert sum(read) <= sources.HEADER_BYTES  # only the header was read


@pytest.fixture
def proxy(s3, monkeypatch):
    """A :class:`~seaweedfs_server.CountingProxy` in front of the test store, as the store's endpoint."""
    import s3fs

    from seaweedfs_server import CountingProxy

    counting = CountingProxy(s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", counting.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    yield counting
    counting.close()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_listed_object_costs_one_get_and_no_size_request(bucket, store_reference, proxy, tmp_path):
    from catfeat.extraction.run import run_extraction
    from catfeat.images.unit import decode_timed

    got = run_extraction(bucket, MODEL, tmp_path, reader="threads", **FAST)
    assert_same(content(store_reference), content(got.paths))
    objects = [p for _, p in proxy.requests if p.endswith(".jpg")]
    assert len(objects) == 11 and len(set(objects)) == 11  # 10 photos and the broken file: one request each
    assert proxy.count("GET", ".jpg") == 11 and proxy.count("HEAD") == 0
    # a URL given without its listing (predict's single image) asks its size first: HEAD + GET
    from catfeat.images.sources import filesystem

    filesystem(bucket)[0].invalidate_cache()  # (s3fs answers a size from a listing it holds)
    proxy.requests.clear()
    assert decode_timed(bucket + "train/cat.1.jpg", [32])[0] is not None
    assert (proxy.count("HEAD", "cat.1.jpg"), proxy.count("GET", "cat.1.jpg")) == (1, 1)


def test_a_transient_error_is_retried_by_one_layer_as_catfeat_read_tries_says(bucket, proxy, monkeypatch):
    from catfeat.images.listing import list_images
    from catfeat.images.sources import ListedURL
    from catfeat.images.unit import decode_timed

    monkeypatch.setenv("CATFEAT_READ_TRIES", "3")
    monkeypatch.setenv("CATFEAT_READ_WAIT", "0.01")
    images = list_images(bucket)
    url = images.paths()[images.names.index("train/dog.1.jpg")]
    assert isinstance(url, ListedURL) and url.size > 0
    proxy.requests.clear()  # (the listing)
    proxy.fail.add("train/dog.1.jpg")  # every request for it: 503 SlowDown (botocore and s3fs would retry it)
    arrays, reason, _, _ = decode_timed(url, [32])
    assert arrays is None and "after 3 tries" in reason, reason
    assert proxy.count("GET", "dog.1.jpg") == 3 and len(proxy.requests) == 3
    proxy.requests.clear()
    arrays, reason, _, _ = decode_timed(str(url), [32])  # without its size: the HEAD fails, retried the same
    assert arrays is None and "after 3 tries" in reason and len(proxy.requests) == 3, proxy.requests
    proxy.fail.clear()
    assert decode_timed(url, [32])[0] is not None


@contextlib.contextmanager
def _fresh_clients():
    """s3fs clients made inside are dropped on the way out (they hold the endpoint they were made with)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_store_that_dies_mid_run_stops_it_with_one_error_and_the_rerun_resumes(store_photos, store_reference,
                                                                                 tmp_path, monkeypatch, capsys):
    """A separate SeaweedFS, killed after the first batch was read; restarted on the same data and ports."""
    import s3fs

    import catfeat.images.unit as unit
    from catfeat.cache.store import cache_path, partial_path
    from catfeat.cli.extract import main as extract
    from catfeat.models.registry import parse_models
    from seaweedfs_server import run_seaweedfs

    server: list = []
    with run_seaweedfs(tmp_path / "store", server=server) as store, _fresh_clients():
        weed = server[0]
        for k, v in store.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("CATFEAT_READ_TRIES", "2")
        monkeypatch.setenv("CATFEAT_READ_WAIT", "0.01")
        monkeypatch.setenv("CATFEAT_STORE_DOWN_AFTER", "3")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = store.fs()
        fs.mkdir(BUCKET)
        for path in sorted(store_photos.rglob("*.jpg")):
            fs.pipe(f"{BUCKET}/set/{path.relative_to(store_photos).as_posix()}", path.read_bytes())
        fetch, calls = unit.fetch, []

        def dying(*args, **kwargs):  # the store dies as the 5th image is asked for (the first batch is read)
            calls.append(args[0])
            if len(calls) == 5:
                weed.kill()
            return fetch(*args, **kwargs)

        monkeypatch.setattr(unit, "fetch", dying)
        out = tmp_path / "features"
        args = [f"s3://{BUCKET}/set/", "--models", MODEL, "--weights", "none", "--batch-size", "4", "--reader",
                "threads", "--workers", "1", "--features", str(out), "--no-progress"]
        assert extract(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "stopped answering" in err[0] and store.endpoint in err[0], err
        assert "rerun the same command to resume" in err[0] and "skipped" not in err[0]
        cache = cache_path(out, parse_models(MODEL)[0].name)
        assert partial_path(cache).exists() and not cache.exists(), sorted(out.rglob("*"))

        weed.start()
        s3fs.S3FileSystem.clear_instance_cache()  # a new command: a new client
        monkeypatch.setattr(unit, "fetch", fetch)
        assert extract(args) == 0
        text = capsys.readouterr()
        assert "resuming" in text.out + text.err and "at image 4 of 11" in text.out + text.err
        # equal to the run from the files on disk: nothing was recorded as skipped while the store was down
        assert_same(content(store_reference), content({MODEL: cache}))


def test_predictions_for_images_in_the_bucket_equal_those_for_the_same_files_on_disk(bucket, store_reference,
                                                                                      store_photos, tmp_path):
    import pandas as pd

    import catfeat
    from catfeat.cli.predict import main as predict
    from catfeat.predict import expand_images, predict_images

    features = next(iter(store_reference.values())).parent
    X, y, _ = catfeat.load_features(MODEL, features)
    catfeat.FusedHead(epochs=2, early_stopping=False, random_state=0).fit(X, y).save(tmp_path / "head",
                                                                                       features=features)

    def by_name(df: pd.DataFrame, root: str) -> dict:
        """{name under the folder: (probabilities, error)}."""
        probs = df.filter(like="p_").to_numpy(float)
        return {f[len(root):].lstrip("/"): (p, e or "") for f, p, e in zip(df["file"], probs, df["error"].fillna(""))}

    def assert_equal(a: dict, b: dict) -> None:
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name][1] == b[name][1], name
            np.testing.assert_allclose(a[name][0], b[name][0], rtol=0, atol=1e-6, err_msg=name)

    kw = dict(features_dir=features, allow_random=True, batch_size=4)
    local = by_name(predict_images(tmp_path / "head", expand_images([str(store_photos)]), **kw), str(store_photos))
    remote = predict_images(tmp_path / "head", expand_images([bucket]), **kw)
    assert len(local) == 11 and sum(1 for _, e in local.values() if e) == 1
    assert_equal(by_name(remote, bucket), local)
    out = tmp_path / "p.csv"
    assert predict(["--head", str(tmp_path / "head"), "--features", str(features), bucket + "manifest.parquet",
                    "--out", str(out), "--allow-random-weights", "--batch-size", "4"]) == 0
    assert_equal(by_name(pd.read_csv(out), bucket), local)


def test_the_nvimgcodec_batch_reader_reads_a_folder_url_as_the_opencv_path_does(bucket, store_reference, tmp_path,
                                                                               monkeypatch):
    from catfeat.images.decoders import available

    if not available("nvimgcodec"):
        pytest.skip("nvImageCodec not installed (catfeat[test])")
    import catfeat.images.nvimgcodec_decoder as nvd
    from catfeat.extraction.run import run_extraction

    batched, decode_jpegs = [], nvd.decode_jpegs
    monkeypatch.setattr(nvd, "decode_jpegs", lambda data, *a, **k: batched.append(len(data)) or
                        decode_jpegs(data, *a, **k))
    got = run_extraction(bucket, MODEL, tmp_path, decoder="nvimgcodec", **FAST)
    assert got.reader == "batches" and sum(batched) == 10 and len(batched) == 3  # the store_photos, a batch at once
    local, remote = content(store_reference), content(got.paths)
    for key in ("train_names", "test_names", "labels", "skipped"):
        assert remote[key] == local[key], key
    for split in ("train", "test"):  # the tolerance of tests/test_nvimgcodec.py
        x, y = remote[split], local[split]
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() > 0.999, cos
