"""Extraction on Ray Data: the same ``gap_<Model>.h5`` caches as the local engine, computed on a cluster.

One Ray Data job serves every requested backbone::

    (position, path) rows [--map_batches(read_batch)--> I/O tasks on the driver's node: the files' bytes]
    --map_batches(decode_batch)--> CPU tasks: catfeat.images.unit.decode_timed, once per image for every
        input size, under a byte budget per task; a file that fails becomes a row with its reason
    --map_batches(FeatureActor)--> actor pool (GPU or CPU): each backbone built once per actor
        in a catfeat.extraction.stages.ModelRunner
    --> driver: one HDF5 part per (backbone, shard), written in position order with FeatureWriter
    parts --merge_parts, in order--> gap_<Model>.h5 (via <path>.partial and os.replace)

Who opens the files (``reads``): on a one-node Ray the decode tasks read by path; on a cluster of
several nodes the driver's node reads them (I/O tasks pinned there) and the decode tasks anywhere get
the bytes, so no node needs the data folder mounted; ``reads="workers"`` spreads the reading when it
is mounted at the same path everywhere.

Shards are contiguous position ranges and the unit of work kept across runs: a part that is complete and
matches the request is never recomputed, so a rerun after a crash redoes only the unfinished shards.
Within a run, Ray retries a failed task, restarts a killed model actor and rebuilds lost blocks from
their lineage; when it gives up on lost work (a node gone: :func:`lost_work`), the engine submits the
images of the unfinished shards it has not received again, in a new job (``retries`` times). Rows are
keyed by position, so a batch delivered twice is written once and a missing one is never papered over.
A store that stops answering (images read by URL, ``CATFEAT_STORE_DOWN_AFTER`` in a row of a shard
unreachable: :class:`~catfeat.images.sources.OutageWatch`) stops the run with one error, none of those
images recorded as skipped; the shards' rows written so far are kept for the rerun.
Parts live in ``OUT/.parts/<backbone>/<request key>/shard-00003.h5`` and are deleted once the final cache
is in place. Features stream back to the driver, which alone writes files, so OUT only needs to exist
where the command runs; catfeat (same Keras backend) must be installed on every node.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import stat
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from catfeat.models import compile_cache
from catfeat.models.registry import BackboneSpec
from catfeat.models.weights import Weights
from catfeat.images.listing import ByteBudget, ImageSet
from catfeat.images.sources import OutageWatch
from catfeat.images.unit import decode_timed, unit_decode
from catfeat.extraction.stages import ModelRunner, progress_bar, report_damaged, report_skip
from catfeat.cache.store import (
    KEY_FIELDS, MERGE_ROWS, CacheError, FeatureWriter, check_unfinished, decode_strings, differences, open_cache,
    remove_planted_link)


class EngineUnavailableError(RuntimeError):
    """An engine's optional dependency is missing; the message says what to install."""


INSTALL_HINT = 'pip install "catfeat[ray]"'
SHARD_IMAGES = 1000  # default shard: seconds of one GPU, small enough to redo, few enough files
PARTS_DIR = ".parts"
PART_NAME = re.compile(r"shard-\d{5}\.h5(\.partial)?")  # the only files catfeat writes under .parts
# Full-size pixels one decode task may hold (its byte budget), part of the memory it declares to Ray.
DECODE_TASK_BYTES = 64 << 20
# What the byte reader of URLs needs (catfeat.images.sources): passed on to the Ray workers when images
# are read by URL, so they reach the store the driver reaches, as the driver does. They travel in the
# job's runtime environment: on a shared cluster, give the nodes their own credentials instead.
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
             "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
             "CATFEAT_READ_TRIES", "CATFEAT_READ_WAIT")
RETRIES = 2  # times, within one run, the images Ray lost past its own retries are submitted again
READS = ("auto", "workers", "driver")  # who opens the image files (see _reads_on)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow and friends)
    except ImportError as e:
        raise EngineUnavailableError(f"--engine ray needs Ray Data, which is not installed ({e}); "
                                     f"install it with: {INSTALL_HINT}") from None
    return ray


# -- shards and parts ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Positions ``start .. end`` of the image set; ``index`` names its part file."""

    index: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def plan_shards(n_images: int, shards: int | None = None) -> list[Shard]:
    """Split positions ``0 .. n_images`` into ``shards`` contiguous ranges of near-equal size
    (default: about ``SHARD_IMAGES`` each). Never returns an empty shard."""
    if n_images < 1:
        raise ValueError("no images to shard")
    if shards is None:
        shards = -(-n_images // SHARD_IMAGES)
    if shards < 1:
        raise ValueError(f"--shards must be positive, got {shards}")
    k = min(int(shards), n_images)
    bounds = [i * n_images // k for i in range(k + 1)]
    return [Shard(i, bounds[i], bounds[i + 1]) for i in range(k)]


def request_key(attrs: dict, n_images: int, n_shards: int) -> str:
    """Short hash of what parts must share to be merged: the cache's key fields and the shard layout."""
    ident = {k: str(attrs.get(k)) for k in KEY_FIELDS}
    ident.update(n_images=int(n_images), n_shards=int(n_shards))
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def parts_dir(cache: str | os.PathLike, attrs: dict, n_images: int, n_shards: int) -> Path:
    """``OUT/.parts/<backbone>/<request key>``: where the parts of the cache at ``cache`` go."""
    return Path(cache).parent / PARTS_DIR / str(attrs["backbone"]) / request_key(attrs, n_images, n_shards)


def part_file(folder: Path, shard: Shard) -> Path:
    return folder / f"shard-{shard.index:05d}.h5"


def make_parts_dir(folder: Path, out: Path) -> Path:
    """Create ``folder`` (``OUT/.parts/<backbone>/<key>``) one level below ``out`` at a time.

    A symbolic link on the way (``.parts``, ``.parts/<backbone>``, ``<key>``) is removed, never
    followed, so parts are never written into (nor later deleted from) the folder it points to.
    Raises :class:`CacheError` when one of them is something other than a folder.
    """
    cur = Path(out)
    for name in Path(folder).relative_to(out).parts:
        cur = cur / name
        remove_planted_link(cur)
        try:
            os.mkdir(cur)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                raise CacheError(f"{cur} is not a folder; the Ray engine keeps its parts there: remove it "
                                 "and rerun") from None
    return folder


def remove_parts(backbone_dir: Path) -> None:
    """Delete the parts catfeat wrote under ``OUT/.parts/<backbone>/`` (of every request), then the
    folders left empty, ``OUT/.parts`` included.

    Only regular files named like parts are deleted; links are removed, never followed (every folder
    is opened with ``O_NOFOLLOW``); anything else is left where it is, with its folders.
    """
    parts_root = backbone_dir.parent
    root_fd = _open_dir(parts_root)
    if root_fd is None:
        remove_planted_link(parts_root)
        return
    try:
        bb_fd = _open_dir(backbone_dir.name, root_fd)
        if bb_fd is None:
            remove_planted_link(backbone_dir)
        else:
            try:
                for entry in os.scandir(bb_fd):
                    if entry.is_symlink():
                        remove_planted_link(backbone_dir / entry.name)
                        continue
                    key_fd = _open_dir(entry.name, bb_fd)
                    if key_fd is None:
                        continue  # not a folder: not ours
                    try:
                        for part in os.scandir(key_fd):
                            if not PART_NAME.fullmatch(part.name):
                                continue
                            if part.is_symlink():
                                remove_planted_link(backbone_dir / entry.name / part.name)
                            elif part.is_file(follow_symlinks=False):
                                os.unlink(part.name, dir_fd=key_fd)
                    finally:
                        os.close(key_fd)
                    _rmdir(entry.name, bb_fd)
            finally:
                os.close(bb_fd)
            _rmdir(backbone_dir.name, root_fd)
    finally:
        os.close(root_fd)
    try:
        os.rmdir(parts_root)  # when nothing else is in it; rmdir never follows a link
    except OSError:
        pass


def _open_dir(path, dir_fd: int | None = None) -> int | None:
    """A descriptor of the folder ``path``; None when it is a link, not a folder, or gone."""
    try:
        return os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None


def _rmdir(name: str, dir_fd: int) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:  # not empty: something catfeat did not write is in it
        pass


def check_other_requests(folder: Path, attrs: dict, n_shards: int, force: bool, log) -> None:
    """Refuse, unless ``force``, when ``OUT/.parts/<backbone>/`` holds parts of an unfinished run
    built for another request than the one whose parts go to ``folder``: a successful run deletes
    them, and they may be hours of work (as an unfinished ``.partial`` of the local engine)."""
    others = [p for d in sorted(folder.parent.iterdir()) if d.name != folder.name and not d.is_symlink() and d.is_dir()
              for p in sorted(d.iterdir()) if PART_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    check_unfinished(others, attrs, force, log, expect={"n_shards": n_shards}, parts_of=folder.parent)


def part_is_done(path: Path, attrs: dict, shard: Shard) -> bool:
    """Whether ``path`` is a complete part of ``shard`` built for the request described by ``attrs``
    (a regular file: a link is never read)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    try:
        a = open_cache(path).attrs
    except CacheError:
        return False
    return (not differences(a, attrs) and a.get("shard_start") == shard.start
            and a.get("shard_end") == shard.end and a.get("n_images") == len(shard))


def merge_parts(path: str | os.PathLike, attrs: dict, images: ImageSet, dim: int,
                parts: Sequence[tuple[Shard, Path]], stamps: Sequence[str] | None = None) -> Path:
    """Stream ``parts`` (in position order, covering every image) into the cache at ``path``.

    Written to ``<path>.partial`` and renamed into place when complete, like the local engine; the
    skipped images keep their positions and reasons. ``stamps``: one change stamp per image, stored
    per row (see FeatureWriter).
    """
    writer = FeatureWriter(path, attrs, images.names, images.labels, images.split, dim, stamps=stamps)
    try:
        covered = 0
        for shard, part in parts:
            if shard.start != covered:
                raise ValueError(f"parts are not contiguous: shard {shard.index} starts at {shard.start}, "
                                 f"expected {covered}")
            covered = shard.end
            if shard.end > writer.next_index:  # a resumed .partial may already hold it
                _copy_part(writer, shard, part, images.split)
        return writer.finish()
    finally:
        writer.close()


def _copy_part(writer: FeatureWriter, shard: Shard, part: Path, split: Sequence[str]) -> None:
    import h5py

    if not part.is_file() or part.is_symlink():
        raise CacheError(f"{part} is not a regular file catfeat wrote; remove it and rerun")
    open_cache(part)  # complete and well-formed, or a CacheError naming the file
    with h5py.File(part, "r") as f:
        skipped = f["skipped_index"][()].astype(np.int64)
        reasons = decode_strings(f["skipped_reasons"][()])
        n_train, n_test = f["train"].shape[0], f["test"].shape[0]
        if n_train + n_test + len(skipped) != len(shard):
            raise CacheError(f"{part}: {n_train} + {n_test} rows and {len(skipped)} skipped do not make "
                             f"the {len(shard)} images of its shard; delete it and rerun")
        ok_all = np.ones(len(shard), bool)
        ok_all[skipped] = False
        why = dict(zip(skipped.tolist(), reasons))
        bad = (dict(zip(f["damaged_index"][()].tolist(), decode_strings(f["damaged_reasons"][()])))
               if "damaged_index" in f else {})
        is_train = np.array([split[p] == "train" for p in range(shard.start, shard.end)], bool)
        tr = te = 0
        for a in range(0, len(shard), MERGE_ROWS):
            b = min(a + MERGE_ROWS, len(shard))
            ok = ok_all[a:b]
            # positions run train-then-test, so a chunk's kept rows are its train rows, then its test rows
            k_tr = int((ok & is_train[a:b]).sum())
            k_te = int(ok.sum()) - k_tr
            feats = np.concatenate([f["train"][tr:tr + k_tr], f["test"][te:te + k_te]])
            tr, te = tr + k_tr, te + k_te
            errors = {shard.start + i: why[i] for i in range(a, b) if not ok_all[i]}
            writer.write(shard.start + a, ok, feats, errors,
                         {shard.start + i: bad[i] for i in range(a, b) if i in bad})


# -- the Ray Data stages (run on workers) --------------------------------------------------------
def read_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stage 0, only when the driver's node reads the files (``reads="driver"``: no shared filesystem):
    each local file's bytes (``shipped``), so the decode tasks on other nodes never open a path. A file
    that cannot be read gets its reason (the words of the local engine's readers) and no bytes. A URL
    (any location that is not an absolute path) is left to the decode task, which reads it itself."""
    from catfeat.images.decoders import read_bytes
    from catfeat.images.listing import DecodeError, MAX_PIXELS, file_size_limit

    data, reason, shipped = [], [], []
    for raw in batch["path"]:
        location = os.fsdecode(bytes(raw))
        shipped.append(os.path.isabs(location))
        try:
            data.append(read_bytes(location, file_size_limit(MAX_PIXELS, 1)) if shipped[-1] else b"")
            reason.append("")
        except DecodeError as e:
            data.append(b"")
            reason.append(str(e))
    return {"pos": np.asarray(batch["pos"], np.int64), "path": batch["path"], "shipped": np.array(shipped, bool),
            "data": np.array(data, dtype=object), "read_error": np.array(reason, dtype=object)}


@contextmanager
def _local_copy(path: str, data: bytes) -> Iterator[str]:
    """``data`` (the bytes of ``path``, read on another node) in a temporary file of this worker, named
    like ``path``, so it goes through the same decode unit as a file read in place."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="catfeat-") as tmp:
        copy = os.path.join(tmp, "image" + os.path.splitext(path)[1][:16])
        with open(copy, "wb") as f:
            f.write(data)
        yield copy


def decode_batch(batch: dict[str, np.ndarray], sizes: Sequence[int], decoder: str = "auto",
                 skip_damaged: bool = False, budget: int | ByteBudget = DECODE_TASK_BYTES) -> dict[str, np.ndarray]:
    """Stage 1, the reader (:func:`catfeat.images.unit.decode_timed`, as the local readers): decode each
    row's file once into every input size, under ``budget`` (bytes: a new budget for this task; or a
    :class:`ByteBudget` to share). Rows whose bytes came with them (``shipped`` by :func:`read_batch`)
    are decoded from those bytes, never from their path. Never raises for a bad file: its row gets ``ok=False``,
    the reason, and zero images."""
    from catfeat.images.decoders import get_decoder

    paths = [os.fsdecode(bytes(raw)) for raw in batch["path"]]
    n = len(paths)
    imgs = {s: np.zeros((n, s, s, 3), np.uint8) for s in sizes}
    budget = budget if isinstance(budget, ByteBudget) else ByteBudget(int(budget))
    decode = get_decoder(decoder).decode
    one = (lambda p, s: decode(p, s, skip_damaged=True)) if skip_damaged else unit_decode(decode)

    def row(i: int) -> tuple:
        if "data" not in batch or not batch["shipped"][i]:
            return decode_timed(paths[i], sizes, budget, one)
        if batch["read_error"][i]:
            return None, str(batch["read_error"][i]), 0.0, 0.0
        with _local_copy(paths[i], bytes(batch["data"][i])) as copy:
            return decode_timed(copy, sizes, budget, one)

    rows = [row(i) for i in range(n)]
    for i, (arrays, *_) in enumerate(rows):
        if arrays is not None:
            for s in sizes:
                imgs[s][i] = arrays[s]
    return {"pos": np.asarray(batch["pos"], np.int64), "ok": np.array([r[0] is not None for r in rows], bool),
            "reason": np.array([r[1] or "" for r in rows], dtype=object),
            "decode_s": np.array([r[2] + r[3] for r in rows], np.float64), **{f"img{s}": a for s, a in imgs.items()}}


class FeatureActor:
    """Stage 2, one instance per Ray actor: the model runner (:class:`catfeat.extraction.stages.ModelRunner`) over
    every backbone, built once per actor; zeros on rows that failed to decode."""

    def __init__(self, jobs: Sequence[tuple[BackboneSpec, str, str]], weights, seed: int, batch_size: int,
                 backend: str):
        t = time.perf_counter()
        from catfeat.models.forward import Forward, backend_name

        if backend_name() != backend:
            raise RuntimeError(f"this Ray worker runs Keras on {backend_name()!r} but the caches are for "
                               f"{backend!r}; install that backend on every node")
        self.specs = [spec for spec, _, _ in jobs]
        # each Forward compiles here (no batch run to compile it), as in the local engine
        with compile_cache.CacheCounter() as compiled:  # JAX's persistent compile cache on this worker's node
            self.runner = ModelRunner({spec.name: (spec.input_size, Forward(spec, weights, seed, precision,
                                                                            batch_size, tta))
                                       for spec, precision, tta in jobs})
        # reported once, with this actor's first batch: how long it built, when it was ready, and
        # its compile-cache lookups and hits
        self.build_seconds, self.ready_at = time.perf_counter() - t, time.time()
        self.compiled = (compiled.requests, compiled.hits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        n = len(ok)
        out = {k: batch[k] for k in ("pos", "ok", "reason", "decode_s")}
        out["build_s"], out["ready_at"] = np.zeros(n), np.zeros(n)
        out["compile_requests"], out["compile_hits"] = np.zeros(n, np.int64), np.zeros(n, np.int64)
        if n:
            out["build_s"][0], out["ready_at"][0] = self.build_seconds, self.ready_at
            out["compile_requests"][0], out["compile_hits"][0] = self.compiled
            self.build_seconds = self.ready_at = 0.0
            self.compiled = (0, 0)
        self.runner.seconds = {}
        feats = self.runner({s: np.ascontiguousarray(batch[f"img{s}"][ok]) for s in {sp.input_size for sp in self.specs}})
        for spec in self.specs:
            full = np.zeros((n, spec.feature_dim), np.float32)
            full[ok] = feats[spec.name]
            out[f"feat_{spec.name}"] = full
            out[f"model_s_{spec.name}"] = np.full(n, self.runner.seconds.get(f"model:{spec.name}", 0.0) / max(n, 1))
        return out


# -- the driver ----------------------------------------------------------------------------------
class PartSink:
    """Takes feature rows in any order and writes each (backbone, shard) part in position order,
    finishing (atomically renaming) a part as soon as its shard is whole."""

    def __init__(self, images: ImageSet, specs: list[BackboneSpec], shards: list[Shard],
                 need: dict[int, list[BackboneSpec]], part_attrs: dict[tuple[str, int], dict],
                 folders: dict[str, Path], report, bar, started_at: float):
        self.images, self.shards, self.need, self.part_attrs = images, shards, need, part_attrs
        self.folders, self.report, self.bar = folders, report, bar
        self.starts = [s.start for s in shards]
        self.next = {s.index: s.start for s in shards}
        self.rows: dict[int, dict[int, tuple]] = {s.index: {} for s in shards}
        self.writers: dict[tuple[str, int], FeatureWriter] = {}
        self.specs = specs
        self.started_at = started_at  # time.time() when the run began: actors report readiness in it
        self._paths: list | None = None
        self.compiled = [0, 0]  # JAX compile-cache lookups and hits of every actor's build

    def add(self, batch: dict[str, np.ndarray]) -> None:
        secs = self.report.seconds
        secs["decode"] = secs.get("decode", 0.0) + float(np.sum(batch["decode_s"]))
        # actors build side by side: the slowest build is the run's build stage, as in the local engine
        secs["build"] = max(secs.get("build", 0.0), float(np.max(batch["build_s"], initial=0.0)))
        self.compiled[0] += int(np.sum(batch["compile_requests"]))
        self.compiled[1] += int(np.sum(batch["compile_hits"]))
        self.report.compile_cache = compile_cache.verdict(*self.compiled)  # as the local engine reports its build
        ready = batch["ready_at"][batch["ready_at"] > 0]
        if len(ready) and "startup" not in secs:  # Ray up, first actor built: the run's fixed cost
            secs["startup"] = min(max(0.0, float(ready.min()) - self.started_at), time.time() - self.started_at)
        for sp in self.specs:
            key = f"model:{sp.name}"
            secs[key] = secs.get(key, 0.0) + float(np.sum(batch[f"model_s_{sp.name}"]))
        t = time.perf_counter()
        pos, ok, reason = batch["pos"], batch["ok"], batch["reason"]
        feats = {sp.name: batch[f"feat_{sp.name}"] for sp in self.specs}
        touched = set()
        for i in np.argsort(pos, kind="stable"):
            p = int(pos[i])
            k = bisect.bisect_right(self.starts, p) - 1
            if k < 0 or p >= self.shards[k].end or p < self.next[self.shards[k].index]:
                continue  # not asked for, or already written (a retried block delivered twice)
            shard = self.shards[k]
            self.rows[shard.index][p] = (bool(ok[i]), str(reason[i]), {n: f[i] for n, f in feats.items()})
            touched.add(k)
        for k in sorted(touched):
            self._flush(self.shards[k])
        secs["write"] = secs.get("write", 0.0) + time.perf_counter() - t

    def _flush(self, shard: Shard) -> None:
        rows, start = self.rows[shard.index], self.next[shard.index]
        n = 0
        while start + n in rows:
            n += 1
        # a store that stopped answering (images in a row unreachable) ends the run with one error; a
        # run of such images at the end of what came is held until a later image shows the store answers
        watch = OutageWatch()
        for p in range(start, start + n):
            ok, why, _ = rows[p]
            watch.see(self._location(p), None if ok else why)
        if start + n < shard.end:
            n -= watch.open
        run = [rows.pop(start + j) for j in range(n)]
        if not run:
            return
        ok = np.array([r[0] for r in run], bool)
        local_errors = {start - shard.start + j: r[1] for j, r in enumerate(run) if not r[0]}
        local_damaged = {start - shard.start + j: r[1] for j, r in enumerate(run) if r[0] and r[1]}
        for sp in self.need[shard.index]:
            feats = np.stack([r[2][sp.name] for r in run if r[0]]) if ok.any() else None
            self._writer(sp, shard).write(start - shard.start, ok, feats, local_errors, local_damaged)
        for j, why in local_errors.items():
            report_skip(self.bar, self.report, self.images.names[shard.start + j], why)
        for j, why in local_damaged.items():
            report_damaged(self.bar, self.report, self.images.names[shard.start + j], why)
        self.next[shard.index] = start + len(run)
        self.report.processed += len(run)
        self.bar.update(len(run))
        if self.next[shard.index] == shard.end:
            for sp in self.need[shard.index]:
                self._writer(sp, shard).finish()
                del self.writers[(sp.name, shard.index)]

    def _writer(self, spec: BackboneSpec, shard: Shard) -> FeatureWriter:
        key = (spec.name, shard.index)
        if key not in self.writers:
            s, e, im = shard.start, shard.end, self.images
            # a .partial left by a crash is resumed by FeatureWriter; rows it holds are skipped on write
            self.writers[key] = FeatureWriter(part_file(self.folders[spec.name], shard), self.part_attrs[key],
                                              im.names[s:e], im.labels[s:e], im.split[s:e], spec.feature_dim)
        return self.writers[key]

    def missing(self) -> int:
        return sum(s.end - self.next[s.index] for s in self.shards)

    def _location(self, position: int):
        """What the image at ``position`` is read from (for the message of a store that went down)."""
        if self._paths is None:
            self._paths = self.images.paths()
        return self._paths[position]

    def shard_of(self, position: int) -> Shard:
        return self.shards[bisect.bisect_right(self.starts, position) - 1]

    def pending(self) -> np.ndarray:
        """Positions of the unfinished shards not received yet (neither written nor held), in order."""
        out = []
        for s in self.shards:
            held = self.rows[s.index]
            out.extend(p for p in range(self.next[s.index], s.end) if p not in held)
        return np.array(out, np.int64)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


def _connect(ray, address: str | None, env: dict[str, str]) -> bool:
    """Start or join Ray unless this process already did; True when this call did it."""
    if ray.is_initialized():
        return False
    kwargs = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RuntimeError(f"cannot start or reach {where}: {e.__class__.__name__}: {e}") from e
    return True


def model_actors(ray, num_gpus_per_worker: float) -> tuple[int, float]:
    """(number of model actors, CPUs each): one per GPU group on GPU clusters, one per node on CPU,
    reserving at most one CPU each, less where that could leave no CPU to decode after a node is lost."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if num_gpus_per_worker > 0:
        gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        count = int(gpus // num_gpus_per_worker)
        if count < 1:
            raise ValueError(f"--num-gpus-per-worker {num_gpus_per_worker:g} but the Ray cluster has {gpus:g} "
                             "GPUs; start GPU nodes first, or pass 0 to run the models on CPUs")
        return count, 1.0
    per_node = [n["Resources"].get("CPU", 0) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    cpus = sum(per_node)
    # The backend already uses every core of its node; the CPU it reserves keeps decode off one core.
    # With a single CPU in all, reserving it would starve the decode tasks.
    if len(per_node) <= 1:
        return 1, 1.0 if cpus >= 2 else 0.0
    # Several nodes: should the largest be lost, its actor is restarted on the others; the actors must
    # then still leave a CPU to the decode tasks, or the run would wait forever.
    spare = cpus - max(per_node) - 1
    return len(per_node), float(np.clip(np.floor(100 * spare / len(per_node)) / 100, 0.0, 1.0))


@contextmanager
def _data_context(ray) -> Iterator[None]:
    """catfeat draws its own progress bar; silence Ray Data's, for this run only."""
    with warnings.catch_warnings():  # Ray's first DataContext() warns about its own default fields
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False, "enable_auto_log_stats": False}
    saved = {k: getattr(ctx, k) for k in wanted if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, wanted[k])
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        quiet.setLevel(level)


def _input_blocks(images: ImageSet, positions: np.ndarray, batch_size: int, n_cpus: float) -> list:
    """(position, location) rows as Arrow tables, one Ray block each: a whole number of model batches
    per block (few short batches), at least two blocks per CPU when there are enough rows. A location
    is what :meth:`ImageSet.paths` says to read: an absolute local path, or a URL."""
    import pyarrow as pa

    locations = images.paths()
    per_block = batch_size * int(np.clip(-(-len(positions) // (2 * max(n_cpus, 1) * batch_size)), 1, 4))
    blocks = []
    for a in range(0, len(positions), per_block):
        pos = positions[a:a + per_block]
        # bytes, not str: file names that are not valid UTF-8 survive the trip through Arrow
        paths = [os.fsencode(os.path.abspath(locations[p])) if isinstance(locations[p], os.PathLike)
                 else os.fsencode(locations[p]) for p in pos]
        blocks.append(pa.table({"pos": pa.array(pos, pa.int64()), "path": pa.array(paths, pa.binary())}))
    return blocks


def _reads_on(ray, reads: str, images: ImageSet) -> str:
    """Who opens the image files: ``"workers"`` (by URL, or by path when the folder is mounted at the
    same path on every node) or ``"driver"`` (read tasks on the driver's node, bytes to the decode
    tasks anywhere). ``"auto"``: workers when every image is a URL or Ray has one node, else the driver."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, got {reads!r}")
    if reads != "auto":
        return reads
    if not any(isinstance(p, os.PathLike) for p in images.paths()):
        return "workers"
    return "workers" if sum(1 for n in ray.nodes() if n.get("Alive")) <= 1 else "driver"


def lost_work(ray, error: BaseException) -> bool:
    """Whether ``error`` says Ray lost work it was doing (a node, worker, actor or object gone), which
    running it again can repair, rather than the work itself failing (an exception in catfeat's code,
    a model actor that cannot be built)."""
    x = ray.exceptions
    cause = getattr(error, "cause", None) if isinstance(error, x.RayTaskError) else error
    if isinstance(cause, x.RayActorError):
        return not cause.actor_init_failed
    return isinstance(cause, (x.ObjectLostError, x.WorkerCrashedError, x.NodeDiedError))


def extract_with_ray(plan, report, *, address: str | None = None, num_gpus_per_worker: float = 0,
                     shards: int | None = None, reads: str = "auto", retries: int = RETRIES) -> dict[str, Path]:
    """Compute the caches of ``plan.specs`` (a :class:`catfeat.extraction.run.ExtractionPlan`) on Ray Data;
    each ends complete at ``plan.paths[name]`` with exactly ``plan.attrs[name]`` (plus the writer's
    bookkeeping: format, complete, counts).

    Called by :func:`catfeat.extraction.run.run_extraction` (engine "ray") after its reuse checks and locks.
    ``address``: None starts a local Ray (unless this process already joined one), "auto" or
    "ray://host:10001" joins a cluster. ``num_gpus_per_worker``: GPUs per model actor (0: CPU actors,
    one per node). ``shards``: number of contiguous shards (default about 1,000 images each).
    ``report``: the ExtractionReport that receives the images processed and the seconds per stage;
    its ``resumed`` maps a backbone to the images taken from parts finished by an earlier run.
    ``precision`` is taken from the attrs, already resolved, so "mixed" means the same on every worker.
    """
    images, specs, attrs_by_name, paths_by_name = plan.images, plan.specs, plan.attrs, plan.paths
    weights, seed, batch_size, progress, decoder = plan.weights, plan.seed, plan.batch_size, plan.progress, plan.decoder
    force, log = plan.force, plan.log
    ray = _import_ray()
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if num_gpus_per_worker < 0:
        raise ValueError(f"--num-gpus-per-worker must be 0 or more, got {num_gpus_per_worker}")
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, got {reads!r}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    weights = Weights.parse(weights)
    if weights.kind == "file":
        weights = Weights("file", path=weights.path.resolve())  # workers do not share the driver's folder
    secs = report.seconds
    t = time.perf_counter()
    all_shards = plan_shards(len(images), shards)
    specs = list(specs)
    folders = {sp.name: parts_dir(paths_by_name[sp.name], attrs_by_name[sp.name], len(images), len(all_shards))
               for sp in specs}
    part_attrs = {(sp.name, sh.index): {**attrs_by_name[sp.name], "shard_index": sh.index,
                                        "shard_start": sh.start, "shard_end": sh.end, "n_shards": len(all_shards)}
                  for sp in specs for sh in all_shards}
    need: dict[int, list[BackboneSpec]] = {}
    out = Path(paths_by_name[specs[0].name]).parent
    for sp in specs:
        make_parts_dir(folders[sp.name].parent, out)  # OUT/.parts/<backbone>: planted links removed
        check_other_requests(folders[sp.name], attrs_by_name[sp.name], len(all_shards), force, log)
        make_parts_dir(folders[sp.name], out)
        done = 0
        for sh in all_shards:
            remove_planted_link(part_file(folders[sp.name], sh))
            if part_is_done(part_file(folders[sp.name], sh), part_attrs[(sp.name, sh.index)], sh):
                done += len(sh)
            else:
                need.setdefault(sh.index, []).append(sp)
        if done:
            report.resumed[sp.name] = done
    secs["plan"] = time.perf_counter() - t

    if need:
        todo = [sh for sh in all_shards if sh.index in need]
        busy = [sp for sp in specs if any(sp in v for v in need.values())]
        _run(ray, images, busy, todo, need, part_attrs, folders, weights=weights, seed=seed,
             batch_size=batch_size, report=report, progress=progress, address=address,
             num_gpus_per_worker=num_gpus_per_worker, decoder=decoder, skip_damaged=plan.skip_damaged,
             reads=reads, retries=retries, log=log)

    t = time.perf_counter()
    for sp in specs:
        merge_parts(paths_by_name[sp.name], attrs_by_name[sp.name], images, sp.feature_dim,
                    [(sh, part_file(folders[sp.name], sh)) for sh in all_shards], stamps=plan.stamps)
        # the cache now holds everything; parts of this and of any abandoned request are obsolete
        remove_parts(folders[sp.name].parent)
    secs["merge"] = time.perf_counter() - t
    return {sp.name: Path(paths_by_name[sp.name]) for sp in specs}


def _run(ray, images: ImageSet, specs: list[BackboneSpec], todo: list[Shard], need: dict[int, list],
         part_attrs: dict, folders: dict[str, Path], *, weights, seed: int, batch_size: int, report,
         progress: bool, address: str | None, num_gpus_per_worker: float, decoder: str,
         skip_damaged: bool = False, reads: str = "auto", retries: int = RETRIES, log=None) -> None:
    secs = report.seconds
    log = log or logging.getLogger("catfeat").warning
    backend = str(part_attrs[(specs[0].name, todo[0].index)]["backend"])
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if not all(isinstance(p, os.PathLike) for p in images.paths()):  # some images are read by URL
        env.update({k: os.environ[k] for k in STORE_ENV if k in os.environ})
    t, started_at = time.perf_counter(), time.time()
    started = _connect(ray, address, env)
    sink = bar = None
    try:
        stages = dict(
            reads=_reads_on(ray, reads, images), env=env,
            jobs=[(sp, str(part_attrs[(sp.name, todo[0].index)]["precision"]),
                   str(part_attrs[(sp.name, todo[0].index)]["tta"])) for sp in specs],
            actors=dict(weights=weights, seed=seed, batch_size=batch_size, backend=backend),
            num_gpus=num_gpus_per_worker,
            decode=dict(sizes=sorted({sp.input_size for sp in specs}), decoder=decoder, skip_damaged=skip_damaged,
                        budget=DECODE_TASK_BYTES))
        secs["connect"] = time.perf_counter() - t
        t = time.perf_counter()
        bar = progress_bar(None, progress, "extract", "img", total=sum(len(s) for s in todo))
        sink = PartSink(images, specs, todo, need, part_attrs, folders, report, bar, started_at)
        for attempt in range(retries + 1):
            positions = sink.pending()
            if not len(positions):
                break
            # sized to the nodes alive now: a resubmission after a node loss fits the cluster that is left
            stages.update(zip(("n_actors", "actor_cpus"), model_actors(ray, num_gpus_per_worker)),
                          n_cpus=ray.cluster_resources().get("CPU", 1))
            try:
                with _data_context(ray):
                    for batch in _dataset(ray, images, positions, batch_size, **stages).iter_batches(
                            batch_size=None, batch_format="numpy"):
                        sink.add(batch)
            except ray.exceptions.RayError as e:
                if attempt == retries or not lost_work(ray, e):
                    raise
                unfinished = len({sink.shard_of(p).index for p in sink.pending()})
                log(f"catfeat: Ray lost work ({e.__class__.__name__}: {_last_line(e)}); submitting the "
                    f"{len(sink.pending())} images of {unfinished} unfinished shards again "
                    f"(retry {attempt + 1} of {retries})")
        if sink.missing():
            raise RuntimeError(f"Ray returned no features for {sink.missing()} images; finished shards are "
                               "kept, rerun the same command to compute the rest")
    except ray.exceptions.RayError as e:
        raise RuntimeError(f"the Ray extraction failed ({e.__class__.__name__}: {_last_line(e)}); finished shards "
                           "are kept, rerun the same command to resume") from e
    finally:
        if sink is not None:
            sink.close()
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()
        secs["run"] = time.perf_counter() - t


def _last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[-1]


def _dataset(ray, images: ImageSet, positions: np.ndarray, batch_size: int, *, reads: str, n_cpus: float,
             env: dict, jobs: list, actors: dict, n_actors: int, actor_cpus: float, num_gpus: float, decode: dict):
    """The Ray Data pipeline over the images at ``positions``: [read on the driver's node] -> decode
    tasks -> model actors; rows come out in any order, each once per completed batch."""
    ds = ray.data.from_arrow(_input_blocks(images, positions, batch_size, n_cpus))
    if reads == "driver":
        # I/O only (no CPU reserved, so a head node started with --num-cpus 0 reads too), two at a time
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        ds = ds.map_batches(read_batch, batch_size=batch_size, batch_format="numpy", num_cpus=0,
                            concurrency=2, label_selector=here, runtime_env={"env_vars": env})
    # A decode task holds one full-size photo and its batch in and out. Declaring that memory also
    # keeps Ray Data from fusing decode into the CPU model actor (it fuses stages whose requests
    # are equal), so decoding runs in parallel tasks instead of between the actor's model calls.
    memory = DECODE_TASK_BYTES + 2 * batch_size * sum(3 * s * s for s in decode["sizes"])
    ds = ds.map_batches(decode_batch, fn_kwargs=decode, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        memory=memory, runtime_env={"env_vars": env})
    return ds.map_batches(FeatureActor, fn_constructor_kwargs={"jobs": jobs, **actors}, batch_size=batch_size,
                          batch_format="numpy", concurrency=n_actors, num_cpus=actor_cpus,
                          num_gpus=num_gpus or None, runtime_env={"env_vars": env})
