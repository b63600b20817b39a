"""Where image bytes come from: local files, or URLs read with fsspec (``s3://``, ``gs://``, ``file://``, ...).

:func:`fetch` is the one function that reads an image by its location; the decode unit
(:func:`catfeat.images.unit.decode_timed`) calls it for every image, on threads, worker processes and
Ray tasks alike. A local path is handed back as is (the decoders read it themselves, header first);
a URL's object is read once into a :class:`Blob` that the decoders open like a file, so the byte
budget and the header checks work as for local files. Transient errors (timeouts, 5xx answers,
connection resets) are retried with backoff (:class:`Retry`, set by ``CATFEAT_READ_TRIES`` and
``CATFEAT_READ_WAIT``), then the file is skipped with its reason (:class:`FetchError`). This is the
only retry layer: the S3 client's own retries (botocore's, s3fs's) are turned off in
:func:`filesystem`, so ``CATFEAT_READ_TRIES`` is the number of requests a failing read makes.
gcsfs retries 5xx answers itself (six tries, fixed when its class is defined: no option turns it
down), so on ``gs://`` each of catfeat's tries may be up to six requests.

A URL listed with its size (:class:`ListedURL`, what :meth:`catfeat.images.listing.ImageSet.paths`
gives for a listed folder or manifest) costs one GET: the size check needs no request of its own.
When a whole run of images in a row cannot be read (:class:`OutageWatch`), the store is down, not
the images: the run stops with one :class:`StoreDownError` instead of skipping every file left.

:func:`list_folder` lists a folder URL once, with a change stamp per object from the listing itself
(size + ETag/version, else modification time): no request per file. A store that cannot be used at
all (missing bucket, bad credentials, unreachable endpoint) is one :class:`SourceError` before any work.
Credentials and endpoints come from where each fsspec backend looks (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ~/.aws; for GCS: see
:func:`backend_options`), and from fsspec's own configuration (``FSSPEC_<SCHEME>_<OPTION>``).
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import posixpath
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Read before the rest of an object: enough for the header of any photo format (dimensions, EXIF).
HEADER_BYTES = 64 << 10
# Errors that no retry can mend: the object or bucket is not there, or access is refused.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# Libraries whose own exception classes (not OSError) mean a network or server failure.
_NETWORK_MODULES = ("botocore", "aiohttp", "urllib3", "requests", "google", "http", "s3fs", "gcsfs", "fsspec")
_GCS = ("gs", "gcs")
# Seconds to wait for the GCS endpoint to take a connection before any work (see check_endpoint).
CONNECT_TIMEOUT = 10.0


class SourceError(ValueError):
    """A data location that cannot be used at all: missing bucket, bad credentials, unreachable store."""


class FetchError(Exception):
    """One image could not be read from its store; the message is the reason it is skipped."""


class StoreDownError(SourceError):
    """The store stopped answering during a run: many images in a row could not be read (see
    :class:`OutageWatch`). The rows written so far are kept; the same command resumes."""


# How a reason given for an image whose store could not be reached (retries spent) begins.
UNREACHABLE = "cannot read it after "
# Objects up to this size are read with one GET (no header check can refuse one: any image may
# carry this much metadata, see catfeat.images.listing.FILE_SLACK_BYTES); larger ones have their
# header read and checked first.
ONE_GET_BYTES = 64 << 20


class ListedURL(str):
    """A URL with the size its store's listing gave (``size``), so that reading it asks no size first."""

    size: int

    def __new__(cls, url: str, size: int):
        self = super().__new__(cls, url)
        self.size = size
        return self

    def __reduce__(self):  # worker processes get the size too
        return ListedURL, (str(self), self.size)


def listed_url(url: str, stamp: str | None):
    """``url`` with the size of its change ``stamp`` (``"size:..."``, see :func:`stamp`) where that
    holds one, else ``url`` as is."""
    size = (stamp or "").split(":", 1)[0]
    return ListedURL(url, int(size)) if size.isdigit() else url


def is_url(location: object) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and bool(_URL.match(location))


def join_url(base: str, name: str) -> str:
    """``name`` (relative, '/' separators) under the folder URL ``base``; '..' and '.' resolved."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest.rstrip('/') or '/', name))}"


def parent_url(url: str) -> str:
    """The folder URL holding ``url``."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


@dataclass(frozen=True)
class Blob:
    """The bytes of one image read from a store, opened by the decoders like a file (:func:`openable`)."""

    url: str
    data: bytes

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return self.url


def openable(location):
    """What ``PIL.Image.open`` takes for ``location``: a :class:`Blob`'s bytes as a file, else the path."""
    return location.open() if isinstance(location, Blob) else location


@dataclass(frozen=True)
class Retry:
    """How transient read errors are retried: ``tries`` in all, waiting ``wait`` seconds after the
    first failure and twice as long after each next one (at most ``longest``)."""

    tries: int = 4
    wait: float = 0.25
    longest: float = 4.0

    @classmethod
    def from_env(cls) -> "Retry":
        """The default, or ``CATFEAT_READ_TRIES`` / ``CATFEAT_READ_WAIT`` (seconds) where set."""
        try:
            tries = int(os.environ.get("CATFEAT_READ_TRIES", cls.tries))
            wait = float(os.environ.get("CATFEAT_READ_WAIT", cls.wait))
        except ValueError as e:
            raise SourceError(f"CATFEAT_READ_TRIES must be a whole number and CATFEAT_READ_WAIT seconds ({e})") \
                from None
        if tries < 1 or wait < 0:
            raise SourceError(f"CATFEAT_READ_TRIES must be >= 1 and CATFEAT_READ_WAIT >= 0, got {tries}, {wait}")
        return cls(tries, wait)

    def pause(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row."""
        return min(self.longest, self.wait * 2 ** (failures - 1))


def transient(error: BaseException) -> bool:
    """Whether ``error`` may go away on a retry: timeouts, connection errors, server errors (an
    OSError s3fs or gcsfs raises for a 5xx answer), not a missing object or a refused access."""
    if isinstance(error, PERMANENT):
        return False
    if isinstance(error, (OSError, TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    return type(error).__module__.split(".")[0] in _NETWORK_MODULES


def retried(fn: Callable, retry: Retry | None = None, what: str = ""):
    """``fn()``, with its transient errors (:func:`transient`) retried as ``retry`` says; the last
    error (or the first lasting one) is raised."""
    retry = retry or Retry.from_env()
    for failures in range(1, retry.tries + 1):
        try:
            return fn()
        except Exception as e:
            if failures == retry.tries or not transient(e):
                raise
            pause = retry.pause(failures)
            logging.getLogger("catfeat").debug("catfeat: %s failed (%s: %s); try %d of %d in %.2f s", what or "read",
                                               e.__class__.__name__, e, failures + 1, retry.tries, pause)
            time.sleep(pause)


def scheme_of(url: str) -> str:
    """The scheme of ``url``, lower case (``gs`` of ``gs://bucket/key``)."""
    return url.split("://", 1)[0].lower()


def emulator_host() -> str | None:
    """The GCS emulator named by ``STORAGE_EMULATOR_HOST``, None where unset (or 'default': Google's)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return None if host in ("", "default") else host


def backend_options(url: str, configured: dict | None = None) -> dict:
    """What catfeat tells the fsspec backend of ``url`` beyond what it finds itself; ``configured``:
    fsspec's configuration for that scheme (``FSSPEC_GS_TOKEN=...``), which always wins.

    For GCS (gcsfs), credentials come from ``GOOGLE_APPLICATION_CREDENTIALS`` when it is set (a key
    file that cannot be used is then an error, where gcsfs alone would go on without credentials);
    else, with ``STORAGE_EMULATOR_HOST`` set (an emulator), none, as Google's own client does;
    else gcsfs's own search (gcloud's application-default login, the metadata server on Google
    Cloud, then none, for public buckets). The endpoint is ``STORAGE_EMULATOR_HOST`` where set.
    """
    if scheme_of(url) not in _GCS or "token" in (configured or {}):
        return {}
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return {"token": "google_default"}
    if emulator_host():
        return {"token": "anon"}
    return {}


def filesystem(url: str):
    """``(fsspec filesystem, path in it)`` for ``url``; :class:`SourceError` when no backend reads it
    or its credentials cannot be loaded."""
    try:
        import fsspec
    except ImportError:
        raise SourceError(f"reading {url} needs fsspec: pip install 'catfeat[remote]'") from None
    schemes = _GCS if scheme_of(url) in _GCS else (scheme_of(url),)  # gcsfs takes the options of both of its names
    configured = {k: v for scheme in schemes for k, v in fsspec.config.conf.get(scheme, {}).items()}
    options = backend_options(url, configured)
    try:
        if scheme_of(url) in _GCS and emulator_host():
            # gcsfs's core filesystem: its default one (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, on since
            # 2026) first asks the Storage Control API (gRPC) for each bucket's layout, which no
            # emulator serves, and retries that for 60 s on every open
            from gcsfs.core import GCSFileSystem

            fs = GCSFileSystem(**options)
            return fs, fs._strip_protocol(url)
        fs, path = fsspec.core.url_to_fs(url, **options, **_one_retry_layer(scheme_of(url), configured))
    except ImportError as e:  # the backend (s3fs, gcsfs, ...) is missing
        raise SourceError(f"reading {url} needs a package that is not installed ({e}); pip install "
                          "'catfeat[remote]' (s3fs, gcsfs) or the fsspec backend of that scheme") from None
    except ValueError as e:
        raise SourceError(f"cannot read {url}: {e}") from None
    except Exception as e:  # google.auth's DefaultCredentialsError: a key file that cannot be used
        if type(e).__module__.split(".")[0] != "google":
            raise
        raise SourceError(f"cannot load the credentials to read {url} ({e.__class__.__name__}: {e}); "
                          f"{access_hint(url)}") from None
    if _is_s3(type(fs)):
        fs.retries = 1  # s3fs's own loop (its class attribute; no option of the constructor sets it)
    return fs, path


def _is_s3(cls) -> bool:
    return any(c.__module__.split(".")[0] == "s3fs" for c in getattr(cls, "__mro__", ()))


def _one_retry_layer(scheme: str, configured: dict) -> dict:
    """The storage options that turn the S3 client's own retries off (botocore's: one attempt), so
    that :class:`Retry` is the only layer; ``configured``: fsspec's configuration of that scheme,
    whose ``config_kwargs`` (a ``retries`` entry included) are kept."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return {}  # filesystem() says what is missing
    if not _is_s3(cls):
        return {}
    conf = dict(configured.get("config_kwargs", {}))
    conf.setdefault("retries", {"total_max_attempts": 1})
    return {"config_kwargs": conf}


def endpoint_of(fs) -> str | None:
    """The ``scheme://host[:port]`` a gcsfs filesystem sends its requests to (``STORAGE_EMULATOR_HOST``
    or Google's), None for other backends."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    location = getattr(fs, "_location", None) if "gs" in protocols else None  # gcsfs's resolved endpoint
    return location if isinstance(location, str) and "://" in location else None


def check_endpoint(url: str, fs, retry: Retry | None = None) -> None:
    """:class:`SourceError` at once when the GCS endpoint of ``url`` takes no connection (a wrong
    ``STORAGE_EMULATOR_HOST``, no network), where gcsfs would retry for half a minute on every
    request: one TCP connection, retried as ``retry`` says. Other backends: nothing is checked."""
    endpoint = endpoint_of(fs)
    if endpoint is None:
        return
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()

    try:
        retried(connect, retry, f"connecting to {endpoint}")
    except OSError as e:
        named, fix = (" (STORAGE_EMULATOR_HOST)", "STORAGE_EMULATOR_HOST and that the emulator runs") \
            if emulator_host() else ("", "the network")
        raise SourceError(f"cannot reach {url}: its endpoint {endpoint}{named} takes no connection "
                          f"({e.__class__.__name__}: {e}); check {fix}") from None


def access_hint(url: str) -> str:
    """What to check when the store of ``url`` refuses access or cannot be reached."""
    scheme = scheme_of(url)
    if scheme in ("s3", "s3a"):
        return ("check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws), "
                "the endpoint (AWS_ENDPOINT_URL for a store other than AWS) and the bucket name")
    if scheme in _GCS:
        return ("check the credentials (GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
                "login`), the endpoint (STORAGE_EMULATOR_HOST for an emulator) and the bucket name")
    return "check the URL, the credentials and the network"


def store_error(url: str, error: BaseException) -> SourceError:
    """The one error to stop on when ``url`` cannot be listed or read before any work."""
    what = f"{error.__class__.__name__}: {error}"
    if isinstance(error, FileNotFoundError):
        endpoint = {"s3": "AWS_ENDPOINT_URL", "s3a": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST",
                    "gcs": "STORAGE_EMULATOR_HOST"}.get(scheme_of(url))
        return SourceError(f"{url} not found ({what}); check the bucket and folder names"
                           + (f", and the endpoint ({endpoint}) for a store other than "
                              f"{'AWS' if endpoint.startswith('AWS') else 'Google Cloud'}" if endpoint else ""))
    if isinstance(error, PermissionError):
        return SourceError(f"access to {url} refused ({what}); {access_hint(url)}")
    return SourceError(f"cannot reach {url} ({what}); {access_hint(url)}")


def stamp(info: dict) -> str:
    """The change stamp of one listed object: ``size:ETag`` (plus its version), else ``size:mtime``.
    A GCS object: ``size:md5/generation`` (crc32c where it has no md5: a composite object), not its
    etag, which changes with the object's metadata too; a rewrite makes a new generation."""
    size = info.get("size", info.get("Size"))
    gcs = bool(info.get("generation"))
    keys = ("md5Hash" if info.get("md5Hash") else "crc32c", "generation") if gcs else ("ETag", "etag", "VersionId")
    tags = [str(info[k]).strip('"') for k in keys if info.get(k)]
    if tags:
        return f"{size}:{'/'.join(tags)}"
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        when = info.get(key)
        if when is not None:
            return f"{size}:{when.isoformat() if hasattr(when, 'isoformat') else when}"
    return f"{size}:"


def list_folder(url: str, retry: Retry | None = None) -> dict[str, str]:
    """``{name relative to url: change stamp}`` of every object under the folder ``url``, from one
    listing; :class:`SourceError` when the store cannot be listed (nothing else is tried)."""
    fs, path = filesystem(url)
    check_endpoint(url, fs, retry)
    path = path.rstrip("/")
    fs.invalidate_cache(path)  # a listing cached earlier in this process would hide changes
    try:
        found = retried(lambda: fs.find(path, detail=True), retry, f"listing {url}")
    except Exception as e:
        raise store_error(url, e) from None
    prefix = path + "/" if path else ""
    out = {}
    for key, info in found.items():
        if info.get("type") == "directory" or key.endswith("/") or not key.startswith(prefix):
            continue
        out[key[len(prefix):]] = stamp(info)
    return out


def stamps_of(urls: list[str], retry: Retry | None = None) -> list[str]:
    """The change stamp of each URL ("missing" where the store has no such object), listing each
    folder that holds them once (no request per file); :class:`SourceError` when one cannot be listed."""
    by_folder: dict[str, dict[str, str]] = {}
    reached: set[str | None] = set()
    out = []
    for url in urls:
        folder = parent_url(url)
        if folder not in by_folder:
            fs, path = filesystem(folder)
            if endpoint_of(fs) not in reached:
                check_endpoint(folder, fs, retry)
                reached.add(endpoint_of(fs))
            fs.invalidate_cache(path)
            try:
                listed = retried(lambda: fs.ls(path, detail=True), retry, f"listing {folder}")
            except FileNotFoundError:
                listed = []  # an empty or missing folder: its files are missing, each skipped with the reason
            except Exception as e:
                raise store_error(folder, e) from None
            by_folder[folder] = {posixpath.basename(i["name"].rstrip("/")): stamp(i) for i in listed
                                 if i.get("type") != "directory"}
        out.append(by_folder[folder].get(posixpath.basename(url), "missing"))
    return out


def read_url(url: str, retry: Retry | None = None) -> bytes:
    """The whole object at ``url`` (a manifest), transient errors retried; :class:`SourceError` if not."""
    fs, path = filesystem(url)
    check_endpoint(url, fs, retry)
    try:
        return retried(lambda: fs.cat_file(path), retry, f"reading {url}")
    except Exception as e:
        raise store_error(url, e) from None


def fetch(location, max_bytes: int | None = None, check: Callable[[bytes, int], None] | None = None,
          retry: Retry | None = None):
    """The image at ``location`` ready for the decoders: a local path as it is (they read it
    themselves), a URL's object as a :class:`Blob`.

    An object of more than ``max_bytes`` is refused before it is read; ``check(header, size)`` sees
    its first :data:`HEADER_BYTES` and its size, and refuses it by raising (that error passes
    through, it is not retried); an object of more than :data:`ONE_GET_BYTES` is refused before the
    rest is read. A :class:`ListedURL` (its size known from the listing) up to ``ONE_GET_BYTES``
    costs one GET; another URL asks its size first. Transient errors are retried (``retry``, default
    :meth:`Retry.from_env`); then, as for a missing object or refused access, :class:`FetchError`.
    """
    if not is_url(location):
        return location
    retry = retry or Retry.from_env()
    fs, path = filesystem(location)
    known = getattr(location, "size", None)

    def too_large(size: int | None) -> None:
        if max_bytes is not None and size is not None and size > max_bytes:
            raise FetchError(f"object is {size:,} bytes, more than any image catfeat reads ({max_bytes:,}); "
                             "not read")

    def listed() -> bytes:
        if not known:
            return b""
        if known <= ONE_GET_BYTES:
            data = fs.cat_file(path, start=0)  # one GET (a range: no size asked first)
            if check is not None:
                check(data[:HEADER_BYTES], len(data))
            return data
        head = fs.cat_file(path, start=0, end=HEADER_BYTES)
        if check is not None:
            check(head, known)
        return head + fs.cat_file(path, start=len(head))

    def unlisted() -> bytes:
        with fs.open(path, "rb") as f:
            size = f.size
            too_large(size)
            head = f.read(HEADER_BYTES)
            if check is not None:
                check(head, len(head) if size is None else size)
            return head + f.read()

    try:
        too_large(known)
        return Blob(location, retried(unlisted if known is None else listed, retry, f"reading {location}"))
    except FileNotFoundError:
        raise FetchError("not found in the store (removed since it was listed?)") from None
    except PermissionError as e:
        raise FetchError(f"access refused by the store ({e}); {access_hint(location)}") from None
    except Exception as e:
        if not transient(e):
            raise
        tries = f"{retry.tries} tries" if retry.tries > 1 else "1 try"
        raise FetchError(f"{UNREACHABLE}{tries} ({e.__class__.__name__}: {e})") from None


def unreachable(reason: str | None) -> bool:
    """Whether ``reason`` (why an image was not used) is that its store could not be reached."""
    return bool(reason) and reason.startswith(UNREACHABLE)


def store_of(url: str) -> str:
    """The store holding ``url``, for messages: ``scheme://bucket``, with the S3 endpoint where one is set."""
    scheme, rest = str(url).split("://", 1)
    where = f"{scheme}://{rest.split('/', 1)[0]}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"{where} (endpoint {endpoint})" if scheme.lower() in ("s3", "s3a") and endpoint else where


def store_down_after() -> int:
    """Images in a row that may fail to be read before the store counts as down: 8, or ``CATFEAT_STORE_DOWN_AFTER``."""
    try:
        n = int(os.environ.get("CATFEAT_STORE_DOWN_AFTER", 8))
    except ValueError:
        n = 0
    if n < 1:
        raise SourceError(f"CATFEAT_STORE_DOWN_AFTER must be a whole number >= 1, got "
                          f"{os.environ.get('CATFEAT_STORE_DOWN_AFTER')!r}")
    return n


class OutageWatch:
    """Tells a dead store from bad images: fed each image's outcome in row order (:meth:`see`), it
    raises :class:`StoreDownError` once ``after`` images in a row could not be reached
    (:func:`unreachable`, retries spent). Anything else (an image read, a decode error, a missing
    object) shows the store answers, and ends the run. ``open`` is the length of the current run:
    while it is not 0, rows seen since it began must not be recorded as skipped yet."""

    def __init__(self, after: int | None = None):
        self.after = store_down_after() if after is None else after
        self.open = 0

    def see(self, location, reason: str | None) -> None:
        """One image's outcome: ``reason`` None (read) or why it was not used."""
        if not unreachable(reason):
            self.open = 0
            return
        self.open += 1
        if self.open >= self.after:
            raise StoreDownError(
                f"the store {store_of(location)} stopped answering: {self.open} images in a row could not be "
                f"read (last: {location}: {reason}); the rows written so far are kept: once the store is back, "
                "rerun the same command to resume")
