"""Extraction: images -> decode once -> every requested backbone -> one cache file per backbone.

Stages (each timed): read+decode+resize on a thread pool, the compiled model per backbone, the
HDF5 write. A cache that already matches the request is reused; a partial one is resumed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from . import __version__
from .backbones import BackboneSpec, normalize_weights, parse_models, weights_identity
from .images import ImageSet, iter_batches, list_images
from .store import (CacheError, FeatureWriter, StaleCacheError, cache_path, differences, open_cache)

DEFAULT_MODELS = ("r50", "incv3", "xcep", "irv2")


@dataclass
class ExtractionReport:
    """What a run did: files, counts, skipped images and seconds per stage."""

    paths: dict[str, Path]
    n_images: int = 0
    processed: int = 0
    reused: list[str] = field(default_factory=list)
    resumed: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        total = self.seconds.get("total", 0.0)
        parts = [f"{self.processed} images processed", f"{len(self.skipped)} skipped",
                 f"{total:.1f} s", f"{self.processed / total:.1f} img/s" if total and self.processed else ""]
        if self.reused:
            parts.append("reused: " + ",".join(self.reused))
        if self.resumed:
            parts.append("resumed: " + ",".join(f"{k}@{v}" for k, v in self.resumed.items()))
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items() if k != "total")
        return "; ".join(p for p in parts if p) + (f" [{stages}]" if stages else "")


class NoUsableImagesError(RuntimeError):
    """Every image failed to decode: nothing to cache."""


def _guard_write(partial: Path, fn, *args):
    """Turn a failed write (disk full, read-only disk, quota) into one line that says what to do."""
    try:
        return fn(*args)
    except OSError as e:
        raise OSError(f"writing {partial} failed ({e}); the rows already written are kept: free disk "
                      "space or fix the folder's permissions, then rerun the same command to resume") from None


class LockedError(RuntimeError):
    """Another extraction is writing the same cache."""


def _lock(stack: ExitStack, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still protects complete files
        return
    lock_file = path.with_name(path.name + ".lock")
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LockedError(f"another catfeat extraction is writing {path} (lock {lock_file}); "
                          "wait for it to finish or use another --out folder") from None
    stack.callback(os.close, fd)


def cache_attrs(spec: BackboneSpec, weights, seed: int, precision: str, images: ImageSet,
                fingerprint: str, tta: str = "none", dtype: str = "float32") -> dict:
    """The attributes that identify a cache (see store.KEY_FIELDS) plus provenance."""
    from .runtime import backend_name, resolve_precision

    return {
        "backbone": spec.name, "weights": weights_identity(weights, seed), "input_size": spec.input_size,
        "preprocessing": spec.preprocessing, "precision": resolve_precision(precision), "tta": tta,
        "images_fingerprint": fingerprint, "dtype": dtype, "feature_dim": spec.feature_dim, "backend": backend_name(),
        "catfeat_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "classes": json.dumps(images.classes), "layout": images.layout, "data_root": str(images.root.resolve()),
    }


def run_extraction(data_dir: str | os.PathLike, models: str | Sequence[str] = DEFAULT_MODELS,
                   out: str | os.PathLike = "features", weights="imagenet", batch_size: int | None = None,
                   limit: int | None = None, force: bool = False, precision: str = "float32",
                   workers: int | None = None, seed: int = 0, progress: bool = True,
                   log=None, engine: str = "local", engine_options: dict | None = None,
                   tta: str = "none", dtype: str = "float32") -> ExtractionReport:
    """Like :func:`extract`, returning an :class:`ExtractionReport`.

    ``engine="ray"`` runs the model stage on a Ray cluster (``engine_options``: ``address``,
    ``num_gpus_per_worker``, ``shards``); the caches are the same files either way.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    specs = parse_models(models)
    if batch_size is None:
        from .runtime import default_batch_size

        # Ray workers given GPUs run the model there, whatever this driver has.
        gpu_workers = engine == "ray" and bool((engine_options or {}).get("num_gpus_per_worker"))
        batch_size = default_batch_size(True if gpu_workers else None)
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    w = normalize_weights(weights)
    if isinstance(w, Path) and len(specs) > 1:
        raise ValueError(f"a weights file ({w}) fits one backbone; extract one model at a time with it")
    images = list_images(data_dir, limit)
    fingerprint = images.fingerprint()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable; pass --out to a writable folder")

    report = ExtractionReport(paths={}, n_images=len(images))
    with ExitStack() as stack:
        writers: dict[str, FeatureWriter] = {}
        pending: dict[str, dict] = {}  # backbone -> attrs of the cache to build
        for spec in specs:
            path = cache_path(out, spec.name)
            _lock(stack, path)
            attrs = cache_attrs(spec, w, seed, precision, images, fingerprint, tta, dtype)
            report.paths[spec.name] = path
            if path.exists():
                try:
                    cached = open_cache(path)
                    diff = differences(cached.attrs, attrs)
                except CacheError:
                    if not force:
                        raise
                    diff = {"file": ("unreadable", "rebuild")}
                if not diff:
                    report.reused.append(spec.name)
                    continue
                if not force:
                    raise StaleCacheError(path, diff)
                log(f"catfeat: rebuilding {path} (--force): {', '.join(diff)} changed")
            pending[spec.name] = attrs
            if engine != "local":
                continue
            writer = FeatureWriter(path, attrs, images.names, images.labels, images.split, spec.feature_dim)
            stack.callback(writer.close)
            if writer.resumed_from:
                report.resumed[spec.name] = writer.resumed_from
                log(f"catfeat: resuming {path.name} at image {writer.resumed_from} of {len(images)}")
            writers[spec.name] = writer
        if pending and engine == "ray":
            from .engines.ray_engine import extract_with_ray

            extract_with_ray(images, [s for s in specs if s.name in pending], pending,
                             {k: report.paths[k] for k in pending}, weights=w, seed=seed, precision=precision,
                             batch_size=batch_size, report=report, progress=progress, **(engine_options or {}))
            report.skipped = open_cache(report.paths[next(iter(pending))]).skipped()
        if writers:
            _extract_into(images, [s for s in specs if s.name in writers], writers, w, seed, precision,
                          batch_size, workers, progress, report, tta)
            if not any(w.rows for w in writers.values()):
                raise NoUsableImagesError(
                    f"none of the {len(images)} images under {images.root} could be decoded "
                    f"(e.g. {images.names[0]}); see the skipped list above")
            for name, writer in writers.items():
                _guard_write(writer.partial, writer.finish)
            report.skipped = open_cache(report.paths[next(iter(writers))]).skipped()
    report.seconds["total"] = time.perf_counter() - t0
    return report


def _extract_into(images: ImageSet, specs: list[BackboneSpec], writers: dict, weights, seed: int,
                  precision: str, batch_size: int, workers: int | None, progress: bool,
                  report: ExtractionReport, tta: str = "none") -> None:
    from .runtime import Forward

    start = min(w.next_index for w in writers.values())
    n_todo = len(images) - start
    secs = report.seconds
    t = time.perf_counter()
    forwards = {s.name: Forward(s, weights, seed, precision, batch_size, tta) for s in specs}
    secs["build"] = time.perf_counter() - t
    if n_todo == 0:
        return
    bar = _progress(n_todo, progress)
    secs.update(decode=0.0, resize=0.0, wait=0.0, write=0.0)
    for s in specs:
        secs[f"model:{s.name}"] = 0.0
    paths = images.paths()
    sizes = sorted({s.input_size for s in specs})
    batches = iter_batches(paths, sizes, batch_size, start=start, workers=workers)
    try:
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            secs["wait"] += time.perf_counter() - t
            if batch is None:
                break
            secs["decode"] += batch.decode_seconds
            secs["resize"] += batch.resize_seconds
            for spec in specs:
                writer = writers[spec.name]
                if batch.start + len(batch) <= writer.next_index:
                    continue
                t = time.perf_counter()
                feats = forwards[spec.name](batch.images[spec.input_size])
                t2 = time.perf_counter()
                _guard_write(writer.partial, writer.write, batch.start, batch.ok, feats, batch.errors)
                secs[f"model:{spec.name}"] += t2 - t
                secs["write"] += time.perf_counter() - t2
            for pos, reason in batch.errors.items():
                bar.write(f"skipped {images.names[pos]}: {reason}")
            report.processed += len(batch)
            bar.update(len(batch))
    finally:
        batches.close()
        bar.close()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr)


def extract(data_dir: str | os.PathLike, models: str | Sequence[str] = DEFAULT_MODELS,
            out: str | os.PathLike = "features", weights="imagenet", batch_size: int | None = None,
            limit: int | None = None, force: bool = False, precision: str = "float32",
            workers: int | None = None, seed: int = 0, progress: bool = True, tta: str = "none",
            dtype: str = "float32") -> dict[str, Path]:
    """Extract GAP features of ``models`` for the images under ``data_dir`` into ``out``.

    Returns {backbone full name: cache path}. A matching cache is reused, an unfinished one is
    resumed, a different one is refused unless ``force``. ``weights``: "imagenet", None (random,
    fixed by ``seed``) or a weights file path (one backbone). ``precision``: "float32" or "mixed".
    ``tta="flip"`` stores the mean of the features of each image and its mirror image.
    ``batch_size=None``: 32 on a CPU, 128 on a GPU. ``dtype="float16"`` stores the features at half
    the size (recorded in the cache; they load as float32).
    """
    return run_extraction(data_dir, models, out, weights, batch_size, limit, force, precision, workers,
                          seed, progress, tta=tta, dtype=dtype).paths
