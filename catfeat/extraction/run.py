"""Extraction: images -> decode once -> every requested backbone -> one cache file per backbone.

:func:`run_extraction` plans (a cache that already matches the request is reused, a partial one is
resumed, one of the same recipe but other images grown (:mod:`catfeat.extraction.grow`), a different
one refused), locks, and hands the plan to an engine from :data:`ENGINES`.
Both engines run the same stages (:mod:`catfeat.extraction.stages`): reader, model runner, writer.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence


from catfeat import __version__
from catfeat.models.registry import BackboneSpec, parse_models
from catfeat.models.weights import Weights, weights_identity
from catfeat.images.listing import ImageSet, list_images, shown
from catfeat.images.reader import READERS, choose_reader, hold_through_outages, iter_batches, reader_workers
from catfeat.cache.store import (
    HOW_FIELDS, CacheError, FeatureWriter, StaleCacheError, check_unfinished, remove_planted_link, cache_path,
    differences, growth_text, open_cache, partial_attrs, partial_path, removed_during_run)
from catfeat.extraction import grow

DEFAULT_MODELS = ("r50", "incv3", "xcep", "irv2")
# The largest --batch-size: 4,096 images of 299 x 299 pixels are 4.4 GB as float32 before the model's
# activations, several times more than the largest accelerator batch catfeat has been measured at.
MAX_BATCH = 4096
SEED_RANGE = (0, 2**32 - 1)  # numpy's, and so Keras' set_random_seed
# How often the local engine's caches take the rows written since the last time (one append per
# dataset and one HDF5 flush, instead of one per batch); a kill loses at most that long of work.
FLUSH_SECONDS = 1.0


@dataclass
class ExtractionReport:
    """What a run did: files, counts, skipped images and seconds per stage."""

    paths: dict[str, Path]
    n_images: int = 0
    processed: int = 0
    reused: list[str] = field(default_factory=list)
    resumed: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    damaged: list[dict] = field(default_factory=list)  # decoded with corrupt data, kept: [{path, reason}]
    shown: set = field(default_factory=set)  # skipped or damaged images already printed as they happened
    seconds: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    device: str = ""
    precision: str = ""
    decoder: str = ""
    reader: str = ""  # "threads" or "processes" (local engine)
    workers: int | None = None  # decoders the local engine ran
    steady_img_s: float | None = None  # the pace once the pipeline was full (local engine, 3+ batches)
    compile_cache: str = ""  # JAX's persistent compile cache at build: "hit", "miss", "N of M hit"; "" without one
    grown: dict[str, dict] = field(default_factory=dict)  # backbone -> images kept/added/changed/removed

    @property
    def fixed_seconds(self) -> float | None:
        """Seconds the run took beyond its images at the steady pace: listing and fingerprinting,
        opening the caches, the build, filling the pipeline, shutting the reader down, finishing
        the files (fsync). None without a steady pace."""
        if not self.steady_img_s or "total" not in self.seconds:
            return None
        return max(0.0, self.seconds["total"] - self.processed / self.steady_img_s)

    def where(self) -> str:
        """e.g. ``jax on cuda:0 (NVIDIA H100 80GB HBM3), mixed_bfloat16, opencv decoder on processes``."""
        on = f" on {self.reader}" if self.reader else ""
        return f"{self.backend} on {self.device}, {self.precision}, {self.decoder} decoder{on}"

    def summary(self) -> str:
        """The one line the CLI prints at the end: counts, seconds and pace, what was reused, resumed or
        grown, and the seconds per stage (the build's with its compile-cache verdict)."""
        total = self.seconds.get("total", 0.0)
        parts = [f"{self.processed} images processed", f"{len(self.skipped)} skipped",
                 f"{len(self.damaged)} decoded with corrupt data" if self.damaged else "",
                 f"{total:.1f} s", f"{self.processed / total:.1f} img/s" if total and self.processed else "",
                 f"steady {self.steady_img_s:.1f} img/s + {self.fixed_seconds:.1f} s fixed"
                 if self.steady_img_s and self.fixed_seconds is not None else ""]
        if self.reused:
            parts.append("reused: " + ",".join(self.reused))
        if self.resumed:
            parts.append("resumed: " + ",".join(f"{k}@{v}" for k, v in self.resumed.items()))
        texts = {k: growth_text(v) for k, v in self.grown.items()}
        if len(set(texts.values())) == 1:
            parts.append("grown: " + next(iter(texts.values())))
        else:
            parts += [f"grown {k}: {t}" for k, t in texts.items()]
        stages = ", ".join(f"{k} {v:.1f}s" + (f" (compile cache: {self.compile_cache})"
                                               if k == "build" and self.compile_cache else "")
                           for k, v in self.seconds.items() if k != "total")
        if self.backend:
            parts.append(self.where())
        return "; ".join(p for p in parts if p) + (f" [{stages}]" if stages else "")


class NoUsableImagesError(RuntimeError):
    """Every image failed to decode: nothing to cache."""


def _none_decoded(images: ImageSet) -> NoUsableImagesError:
    return NoUsableImagesError(f"none of the {len(images)} images under {images.root} could be decoded "
                               f"(e.g. {shown(images.names[0])}); see the skipped list above")


def _guard_write(partial: Path, fn, *args):
    """Turn a failed write (disk full, read-only disk, quota) into one line that says what to do."""
    try:
        return fn(*args)
    except OSError as e:
        if not os.path.lexists(partial):  # deleted under the running writer: its rows went with it
            raise CacheError(removed_during_run(partial)) from None
        err = OSError(f"writing {partial} failed ({e}); the rows already written are kept: free disk "
                      "space or fix the folder's permissions, then rerun the same command to resume")
        err.hdf5_unusable = getattr(e, "hdf5_unusable", False)  # see cli.run_cli
        raise err from None


class LockedError(RuntimeError):
    """Another extraction is writing the same cache."""


def _lock(stack: ExitStack, path: Path) -> None:
    """Hold ``<path>.lock`` (flock) until ``stack`` closes, then remove it.

    The lock file is opened without following links (a planted link is removed, not its target).
    A holder unlinks it before releasing, so a lock is only ours if the path still names the file
    we locked; otherwise we lost a race with that unlink and try again.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still protects complete files
        return
    lock_file = path.with_name(path.name + ".lock")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(5):
        try:
            fd = os.open(lock_file, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP and remove_planted_link(lock_file):
                continue
            raise OSError(f"cannot open the lock file {lock_file}: {e.strerror}; remove it and rerun") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockedError(f"another catfeat extraction is writing {path} (lock {lock_file}); "
                              "wait for it to finish or use another --out folder") from None
        st = os.fstat(fd)
        try:
            cur = os.lstat(lock_file)
            same = (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise LockedError(f"could not lock {lock_file}: it keeps being replaced; is another program writing "
                          "into this folder? Use another --out folder")

    def release():
        try:
            os.unlink(lock_file)  # while still holding it: see above
        except OSError:
            pass
        finally:
            os.close(fd)
    stack.callback(release)


def cache_attrs(spec: BackboneSpec, weights, seed: int, precision: str, images: ImageSet,
                fingerprint: str, tta: str = "none", decoder=None, dtype: str = "float32",
                skip_damaged: bool = False) -> dict:
    """The attributes that identify a cache (see store.KEY_FIELDS) plus provenance. ``on_damaged``
    ("keep" or "skip": what happened to images decoded with corrupt data) decides which rows exist,
    and ``dct_scaling`` (decoders that shrink JPEGs in the DCT domain) their pixels, so both are part
    of the identity."""
    from catfeat.models.forward import backend_name, resolve_precision

    return {
        "backbone": spec.name, "weights": weights_identity(weights, seed), "input_size": spec.input_size,
        "preprocessing": spec.preprocessing, "precision": resolve_precision(precision), "tta": tta,
        "images_fingerprint": fingerprint, "dtype": dtype, "on_damaged": "skip" if skip_damaged else "keep",
        "feature_dim": spec.feature_dim, "backend": backend_name(),
        "catfeat_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "classes": json.dumps(images.classes), "layout": images.layout, "data_root": images.data_root(),
        **({"decoder": decoder.name, "decoder_version": decoder.version()} if decoder is not None else {}),
        **({"dct_scaling": decoder.dct_scaling} if decoder is not None and decoder.dct_scaling else {}),
    }


@dataclass
class ExtractionPlan:
    """What an engine is handed: the images, the backbones whose caches must be built (with their
    attributes and paths), and how to run them. Reused caches are already left out."""

    images: ImageSet
    specs: list[BackboneSpec]
    attrs: dict[str, dict]
    paths: dict[str, Path]
    weights: Weights
    seed: int
    precision: str
    tta: str
    decoder: str
    batch_size: int
    workers: int | None
    progress: bool
    log: Callable[[str], None]
    reader: str = "auto"
    force: bool = False  # discard unfinished work of a different request (the Ray engine's parts)
    skip_damaged: bool = False
    stamps: list[str] | None = None  # one change stamp per image, stored per row (caches that grow)
    allow_empty: bool = False  # a cache with no feature row is fine (the computed images of a growth)

    def decode_fn(self) -> Callable:
        """The decoder's function with this plan's damaged-image policy (picklable, for worker processes)."""
        from functools import partial

        from catfeat.images.decoders import get_decoder

        decode = get_decoder(self.decoder).decode
        return partial(decode, skip_damaged=True) if self.skip_damaged else decode


def run_extraction(data_dir: str | os.PathLike, models: str | Sequence[str] = DEFAULT_MODELS,
                   out: str | os.PathLike = "features", weights="imagenet", batch_size: int | None = None,
                   limit: int | None = None, force: bool = False, precision: str = "float32",
                   workers: int | None = None, seed: int = 0, progress: bool = True,
                   log=None, engine: str = "local", engine_options: dict | None = None,
                   tta: str = "none", decoder: str = "auto", dtype: str = "float32",
                   reader: str = "auto", skip_damaged: bool = False) -> ExtractionReport:
    """Like :func:`extract`, returning an :class:`ExtractionReport`.

    Plans (which caches to reuse, resume or build), locks, and hands the plan to an engine from
    :data:`ENGINES`: ``"local"`` (this process) or ``"ray"`` (``engine_options``: ``address``,
    ``num_gpus_per_worker``, ``shards``); the caches are the same files either way.
    """
    from catfeat.images.decoders import get_decoder
    from catfeat.models.forward import backend_name, device_description, resolve_precision, unused_gpu_hint

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    t0 = time.perf_counter()
    log = log or logging.getLogger("catfeat").warning
    specs = parse_models(models)
    dec = get_decoder(decoder)
    asked_batch = batch_size is not None
    if batch_size is None:
        from catfeat.models.forward import default_batch_size

        # Ray workers given GPUs run the model there, whatever this driver has.
        gpu_workers = bool((engine_options or {}).get("num_gpus_per_worker"))
        batch_size = default_batch_size(True if gpu_workers else None)
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch size must be between 1 and {MAX_BATCH:,}, got {batch_size:,}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    w = Weights.parse(weights)
    seed = w.seed_or(seed)  # 'none(seed=N)' names its own seed
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"the seed of random weights must be between {SEED_RANGE[0]} and {SEED_RANGE[1]:,}, "
                         f"got {seed}")
    if w.kind == "file" and len(specs) > 1:
        raise ValueError(f"a weights file ({w}) fits one backbone; extract one model at a time with it")
    t_list = time.perf_counter()
    images = list_images(data_dir, limit)
    batch_size, workers = _fit_to_work(len(images), batch_size, workers, log, asked_batch)
    stamps = images.stamps()
    fingerprint = images.fingerprint(stamps)
    listed = time.perf_counter() - t_list
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable; pass --out to a writable folder")

    report = ExtractionReport(paths={}, n_images=len(images), backend=backend_name(), device=device_description(),
                              precision=resolve_precision(precision), decoder=dec.name, seconds={"list": listed})
    hint = unused_gpu_hint()
    if hint:
        log(f"catfeat: {hint}")
    with ExitStack() as stack:
        pending: dict[str, dict] = {}  # backbone -> attrs of the cache to build
        growing: set[str] = set()  # of those, the caches built by growing the complete one in place
        for spec in specs:
            path = cache_path(out, spec.name)
            _lock(stack, path)
            attrs = cache_attrs(spec, w, seed, precision, images, fingerprint, tta, dec, dtype, skip_damaged)
            report.paths[spec.name] = path
            if path.is_symlink():
                if not force:
                    raise CacheError(f"{path} is a symbolic link (to {os.readlink(path)}), not a cache catfeat "
                                     "wrote; remove the link, or rerun with --force to replace the link by a new "
                                     "cache (its target is left alone)")
                log(f"catfeat: rebuilding {path} (--force): it is a symbolic link; the new cache replaces the "
                    "link, its target is left alone")
            elif path.exists():
                try:
                    cached = open_cache(path)
                    diff = differences(cached.attrs, attrs)
                except CacheError:
                    if not force:
                        raise
                    diff = {"file": ("unreadable", "rebuild")}
                if not diff:
                    report.reused.append(spec.name)
                    grow.remove_delta(path)  # scratch of a growth that ended after its rename
                    continue
                if not force and not set(diff) & set(HOW_FIELDS):  # same recipe, other images: grow it
                    growing.add(spec.name)
                    _drop_growth(partial_path(path), attrs, len(images), log)
                elif not force:
                    raise StaleCacheError(path, diff)
                else:
                    log(f"catfeat: rebuilding {path} (--force): {', '.join(diff)} changed")
                    _drop_growth(partial_path(path), None, len(images), log)
                    grow.remove_delta(path)
            if check_unfinished([partial_path(path)], attrs, force, log, expect={"n_images": len(images)}):
                partial_path(path).unlink()
            pending[spec.name] = attrs
        if pending:
            plan = ExtractionPlan(images, [s for s in specs if s.name in pending], pending,
                                  {k: report.paths[k] for k in pending}, w, seed, precision, tta, dec.name,
                                  batch_size, workers, progress, log, reader, force, skip_damaged, stamps)
            full = [s for s in plan.specs if s.name not in growing]
            if full:
                ENGINES[engine](_only(plan, full), report, stack, **(engine_options or {}))
            if growing:
                _grow(_only(plan, [s for s in plan.specs if s.name in growing]), report, stack, engine,
                      engine_options or {})
            done = open_cache(report.paths[next(iter(pending))])
            report.skipped, report.damaged = done.skipped(), done.damaged()
    report.seconds["total"] = time.perf_counter() - t0
    return report


def _only(plan: ExtractionPlan, specs: list[BackboneSpec]) -> ExtractionPlan:
    """``plan`` narrowed to the caches of ``specs``."""
    return replace(plan, specs=specs, attrs={s.name: plan.attrs[s.name] for s in specs},
                   paths={s.name: plan.paths[s.name] for s in specs})


def _drop_growth(partial: Path, attrs: dict | None, n_images: int, log: Callable[[str], None]) -> None:
    """Remove the unfinished merge of an earlier growth unless it is one of ``attrs`` (None: any, for
    --force, which rebuilds from scratch). Its rows are copies, cheap to redo, and the complete cache
    it was growing is still in place."""
    held = partial_attrs(partial)
    if held is None or "growth" not in held:
        return
    if attrs is None or differences(held, attrs) or held.get("n_images") != n_images:
        log(f"catfeat: removing {partial}: the unfinished merge of an earlier growth"
            + (" (--force)" if attrs is None else ", for images changed since"))
        partial.unlink()


def _grow(plan: ExtractionPlan, report: ExtractionReport, stack: ExitStack, engine: str, options: dict) -> None:
    """Grow the complete caches ``plan.paths`` to ``plan.images`` (see :mod:`catfeat.extraction.grow`):
    the engine computes the new and changed images into ``OUT/.grow``, then each cache is merged."""
    images, stamps = plan.images, plan.stamps
    growths = {s.name: grow.plan_growth(plan.paths[s.name], images, stamps) for s in plan.specs}
    groups: dict[tuple, list[BackboneSpec]] = {}  # caches built together need the same images computed
    for s in plan.specs:
        groups.setdefault(tuple(growths[s.name].compute), []).append(s)
        if growths[s.name].note:
            plan.log(f"catfeat: {growths[s.name].note}")
        was = growths[s.name].old_classes
        if was is not None and was != list(images.classes):
            # Label indices follow the sorted class names: kept rows take the new listing's labels,
            # i.e. they are re-mapped by class name, as a full rebuild would label them.
            plan.log(f"catfeat: {plan.paths[s.name].name}: the classes changed from {was} to {list(images.classes)}; "
                     "label indices follow the new list (kept rows re-mapped by class name): refit heads "
                     "fitted on the old cache")
    for compute, specs in groups.items():
        deltas = {s.name: grow.delta_path(plan.paths[s.name]) for s in specs}
        if compute:
            sub = images.subset(compute)
            fp = sub.fingerprint([stamps[i] for i in compute])
            attrs = {s.name: {**plan.attrs[s.name], "images_fingerprint": fp} for s in specs}
            todo = []
            for s in specs:
                grow.make_grow_dir(plan.paths[s.name])
                grow.drop_stale_delta(deltas[s.name], attrs[s.name], len(sub), plan.log)
                if not grow.delta_is_done(deltas[s.name], attrs[s.name], len(sub)):
                    todo.append(s)
            if todo:
                delta_plan = replace(plan, images=sub, specs=todo, attrs={s.name: attrs[s.name] for s in todo},
                                     paths={s.name: deltas[s.name] for s in todo}, stamps=None, allow_empty=True,
                                     force=True)
                ENGINES[engine](delta_plan, report, stack, **options)
        for s in specs:
            g, path = growths[s.name], plan.paths[s.name]
            if not g.counts["kept"] and not (compute and len(open_cache(deltas[s.name]))):
                raise _none_decoded(images)  # as a full build of these images would; the old cache stays
            attrs = {**plan.attrs[s.name], **grow.growth_attrs(g)}
            _guard_write(partial_path(path), grow.merge_growth, path, attrs, images, stamps, s.feature_dim, g,
                         path, deltas[s.name] if compute else None)
            grow.remove_delta(path)
            report.grown[s.name] = g.counts
            if g.relabelled:
                plan.log(f"catfeat: {path.name}: {g.relabelled} kept image(s) changed label or split; their "
                         "features were kept, their labels are the new listing's")


def _fit_to_work(n_images: int, batch_size: int, workers: int | None, say: Callable[[str], None],
                 asked_batch: bool = True) -> tuple:
    """``(batch_size, workers)`` no larger than the work: a batch of more rows than there are images
    is compiled for (and on an accelerator padded to) rows that never come, and a decoder per core is
    the most that run at once. ``say(line)`` is told of each value that was lowered. A default batch size (not
    ``asked_batch``) is the device's own and is kept; default workers (None) are the reader's."""
    cores = os.cpu_count() or 1
    if asked_batch and 0 < n_images < batch_size:
        say(f"catfeat: --batch-size {batch_size} > {n_images} images: using {n_images}")
        batch_size = n_images
    if workers is not None and n_images and workers > min(n_images, cores):
        fit = min(n_images, cores)
        bound = f"{n_images} images" if n_images < cores else f"{cores} cores"
        say(f"catfeat: --workers {workers} > {bound}: using {fit}")
        workers = fit
    return batch_size, workers


def _local_engine(plan: ExtractionPlan, report: ExtractionReport, stack: ExitStack) -> None:
    """This process: decode threads -> every backbone on this device -> a writer thread."""
    from catfeat.extraction.stages import (
        InBackground, ModelRunner, progress_bar, report_damaged, report_skip, run_stages, steady_state)
    from catfeat.models.compile_cache import CacheCounter
    from catfeat.models.forward import Forward, copies_off_host, on_accelerator

    images, secs = plan.images, report.seconds
    t = time.perf_counter()
    writers: dict[str, FeatureWriter] = {}
    for spec in plan.specs:
        writer = FeatureWriter(plan.paths[spec.name], plan.attrs[spec.name], images.names, images.labels,
                               images.split, spec.feature_dim, flush_seconds=FLUSH_SECONDS, stamps=plan.stamps)
        stack.callback(writer.close)
        if writer.resumed_from:
            report.resumed[spec.name] = writer.resumed_from
            plan.log(f"catfeat: resuming {writer.path.name} at image {writer.resumed_from} of {len(images)}")
        writers[spec.name] = writer
    start = min(w.next_index for w in writers.values())
    secs["open"] = time.perf_counter() - t
    if start < len(images):
        sizes = sorted({s.input_size for s in plan.specs})
        from catfeat.images.decoders import get_decoder

        lend = copies_off_host()  # batches handed over from shared memory, released once on the device
        report.reader = choose_reader(plan.reader, plan.workers, len(images) - start, sizes, plan.batch_size,
                                      lend=lend, batched=get_decoder(plan.decoder).batched)
        report.workers = plan.workers or reader_workers(on_accelerator())
        # on a thread of its own, started before the build: worker start-up and the first decodes
        # overlap the compilation, and the reader's per-batch work stays off the dispatching thread
        paths = images.paths()
        batches = InBackground(hold_through_outages(
            iter_batches(paths, sizes, plan.batch_size, start=start, workers=report.workers,
                         decode=plan.decode_fn(), reader=report.reader, lend=lend), paths))
    t = time.perf_counter()
    try:
        with CacheCounter() as compiled:  # each Forward builds and compiles its backbone, running no batch
            runner = ModelRunner({s.name: (s.input_size, Forward(s, plan.weights, plan.seed, plan.precision,
                                                                 plan.batch_size, plan.tta)) for s in plan.specs})
    except BaseException:
        if start < len(images):
            batches.close()
        raise
    secs["build"] = time.perf_counter() - t
    report.compile_cache = compiled.verdict()
    if start < len(images):
        bar = progress_bar(None, plan.progress, "extract", "img", total=len(images) - start)
        secs.update(decode=0.0, resize=0.0)

        def write(batch, feats: dict) -> None:
            for name, f in feats.items():
                _guard_write(writers[name].partial, writers[name].write, batch.start, batch.ok, f, batch.errors,
                             batch.damaged)
            secs["decode"] += batch.decode_seconds
            secs["resize"] += batch.resize_seconds
            for pos, reason in batch.errors.items():
                report_skip(bar, report, images.names[pos], reason)
            for pos, reason in batch.damaged.items():
                report_damaged(bar, report, images.names[pos], reason)
            report.processed += len(batch)
            bar.update(len(batch))

        def wanted(batch) -> list[str]:
            return [n for n, w in writers.items() if batch.start + len(batch) > w.next_index]

        trace: list = []
        t = time.perf_counter()
        try:
            run_stages(batches, runner, write, wanted, secs, trace=trace)
        finally:
            t_close = time.perf_counter()
            batches.close()
            bar.close()
            secs["shutdown"] = time.perf_counter() - t_close  # the reader's workers stopped
            if not secs["resize"]:  # decoders other than Pillow time decode and resize as one
                del secs["resize"]
        steady = steady_state(trace)
        if steady is not None:
            report.steady_img_s = steady["img_s"]
            secs["fill"] = steady["first_written"] - t  # until the steady state began (stages.steady_state)
    if not plan.allow_empty and not any(w.rows for w in writers.values()):
        raise _none_decoded(images)
    t = time.perf_counter()
    for writer in writers.values():
        _guard_write(writer.partial, writer.finish)
    secs["finish"] = time.perf_counter() - t  # the last rows, the rename, fsync


def _ray_engine(plan: ExtractionPlan, report: ExtractionReport, stack: ExitStack, **options) -> None:
    """A Ray Data job over a cluster (``pip install "catfeat[ray]"``); see :mod:`catfeat.extraction.ray_engine`."""
    from catfeat.extraction.ray_engine import extract_with_ray

    extract_with_ray(plan, report, **options)


# Engines: name -> function(plan, report, exit stack, **engine options). Nothing else branches on the name.
ENGINES: dict[str, Callable] = {"local": _local_engine, "ray": _ray_engine}


def extract(data_dir: str | os.PathLike, models: str | Sequence[str] = DEFAULT_MODELS,
            out: str | os.PathLike = "features", weights="imagenet", batch_size: int | None = None,
            limit: int | None = None, force: bool = False, precision: str = "float32",
            workers: int | None = None, seed: int = 0, progress: bool = True, tta: str = "none",
            decoder: str = "auto", dtype: str = "float32", reader: str = "auto",
            skip_damaged: bool = False) -> dict[str, Path]:
    """Extract GAP features of ``models`` for the images under ``data_dir`` into ``out``.

    Returns {backbone full name: cache path}. A matching cache is reused, an unfinished one is
    resumed, one made the same way from images that were since added, changed or removed grows
    (only those are computed; the result equals a rebuild), a different one is refused unless
    ``force`` (which also rebuilds a cache of other images from scratch). ``weights``: "imagenet", None (random,
    fixed by ``seed``) or a weights file path (one backbone). ``precision``: "float32" or "mixed".
    ``tta="flip"`` stores the mean of the features of each image and its mirror image.
    ``batch_size=None``: 32 on a CPU, 128 on a GPU. ``decoder``: "auto" (OpenCV where installed, else
    Pillow), "nvimgcodec", "opencv" or "pillow" (see :mod:`catfeat.images.decoders`);
    recorded in the cache. ``dtype="float16"``
    stores the features at half the size (recorded in the cache; they load as float32).
    ``reader``: "threads", "processes" (decoding free of the interpreter lock, for many-core GPU
    hosts) or "auto" (processes from 8 cores and 2,048 images on); features are identical.
    A JPEG decoded with corrupt data (truncated, the rest gray) is kept and listed in the cache's
    damaged list; ``skip_damaged=True`` skips it instead (part of the cache's identity).
    """
    return run_extraction(data_dir, models, out, weights, batch_size, limit, force, precision, workers,
                          seed, progress, tta=tta, decoder=decoder, dtype=dtype, reader=reader,
                          skip_damaged=skip_damaged).paths
