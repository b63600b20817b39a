"""`python -m catfeat.extract DATA_DIR`: cache GAP features of pretrained backbones in HDF5."""
from __future__ import annotations

import argparse

from catfeat.models.registry import REGISTRY
from catfeat.cli.common import add_alias, add_output_flags, echo, int_in, run_cli
from catfeat.extraction.run import DEFAULT_MODELS, MAX_BATCH, SEED_RANGE, run_extraction
from catfeat.images.reader import READERS
from catfeat.extraction.stages import damaged_line, skip_line


def build_parser() -> argparse.ArgumentParser:
    """The parser of `catfeat extract` (prog `python -m catfeat.extract`; the dispatcher renames it)."""
    names = ", ".join(f"{s.name} ({s.aliases[0]})" for s in REGISTRY.values())
    p = argparse.ArgumentParser(
        prog="python -m catfeat.extract",
        description="Extract global-average-pooled features of pretrained backbones for a folder of images "
                    "(local or in object storage) or a manifest into FEATURES/gap_<Model>.h5 (reused when unchanged, "
                    "resumed when interrupted, grown when images were added, changed or removed: only those are "
                    "computed).",
        epilog=f"Backbones: {names}. DATA at a URL is read with fsspec: credentials and endpoint from the usual "
               "places (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE/AWS_ENDPOINT_URL for s3://, "
               "GOOGLE_APPLICATION_CREDENTIALS for gs://); transient read errors are retried "
               "(CATFEAT_READ_TRIES, default 4; CATFEAT_READ_WAIT, first wait in seconds, default 0.25), then the "
               "file is skipped with its reason.")
    p.add_argument("data_dir", metavar="DATA",
                   help="image folder: DIR/train + DIR/test (Kaggle), DIR/cat.1.jpg, or DIR/<class>/; the same at a "
                   "folder URL (s3://bucket/prefix/, gs://..., file://...); or a CSV/Parquet manifest (path or URL) "
                   "with a column 'image' (path relative to the manifest, absolute path, or URL) and optional "
                   "'label' and 'split' (train/test)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated names or aliases "
                   "(default: %(default)s)")
    p.add_argument("--features", default="features", help="folder of the gap_<Model>.h5 caches to write "
                   "(default: %(default)s)")
    add_alias(p, "--out", "features")
    p.add_argument("--weights", default="imagenet", help="imagenet | none (random, for tests) | PATH to a "
                   "weights file for one backbone (default: %(default)s)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=None,
                   help=f"images per model call, 1 to {MAX_BATCH:,}; never more than the images (default: 32 on a "
                   "CPU, 128 on a GPU)")
    p.add_argument("--limit", type=int_in(1), default=None, help="use at most N images per split (class-balanced)")
    p.add_argument("--force", action="store_true", help="rebuild caches that were built differently (another "
                   "recipe: weights, precision, TTA, decoder, dtype...); also rebuilds from scratch a cache whose "
                   "images changed, which otherwise grows")
    p.add_argument("--precision", default="float32", choices=["float32", "mixed", "mixed_float16",
                   "mixed_bfloat16"], help="mixed: float16 on GPU, bfloat16 elsewhere (default: %(default)s)")
    p.add_argument("--workers", type=int_in(1), default=None, help="image decoders running at once; never more "
                   "than the cores or the images (default: every core)")
    p.add_argument("--reader", default="auto", choices=READERS,
                   help="decode on threads or on worker processes (free of Python's interpreter lock: many-core "
                   "GPU hosts); auto: processes from 8 cores and 2,048 images on (default: %(default)s)")
    p.add_argument("--decoder", default="auto", choices=["auto", "nvimgcodec", "opencv", "pillow"],
                   help="auto: OpenCV (fast) where installed, else Pillow; nvimgcodec: JPEGs decoded in batches by "
                   "nvImageCodec (catfeat[gpu]; on the GPU where there is one, else its CPU backend: not faster "
                   "yet, see README); recorded in the cache (default: %(default)s)")
    p.add_argument("--skip-damaged", action="store_true",
                   help="skip JPEGs that decode with corrupt data (truncated, the rest gray) instead of keeping "
                   "them and listing them as damaged; recorded in the cache")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype of the "
                   "cached features; float16 halves disk and memory, loads as float32 (default: %(default)s)")
    p.add_argument("--tta", default="none", choices=["none", "flip"], help="flip: store the mean of the "
                   "features of each image and its mirror (default: %(default)s)")
    p.add_argument("--weights-seed", type=int_in(*SEED_RANGE), default=0, help="seed of random weights "
                   "(--weights none), 0 to 2**32-1; not a split or training seed (default: %(default)s)")
    add_alias(p, "--seed", "weights_seed", type=int_in(*SEED_RANGE))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_flags(p, "also list every cache in --features (as `catfeat info`)")
    ray = p.add_argument_group("Ray engine (pip install \"catfeat[ray]\")")
    ray.add_argument("--engine", default="local", choices=["local", "ray"],
                     help="local: this process (default); ray: a Ray Data job, one HDF5 part per shard")
    ray.add_argument("--address", default=None, help="Ray cluster address: auto, ray://HOST:10001 "
                     "(default: start a local Ray)")
    ray.add_argument("--num-gpus-per-worker", type=float, default=0, help="GPUs per model actor (default: 0)")
    ray.add_argument("--shards", type=int_in(1), default=None, help="number of shards, the unit of retry "
                     "(default: about 1,000 images each)")
    ray.add_argument("--read-on", default="auto", choices=["auto", "workers", "driver"],
                     help="who opens the image files: workers (the folder mounted at the same path on every "
                     "node), driver (its node reads, the bytes go to the workers: no shared filesystem); auto: "
                     "workers on one node, driver on a cluster (default: auto)")
    ray.add_argument("--shard-retries", type=int_in(0), default=2, help="times the images of unfinished shards "
                     "that Ray lost (a node gone) are submitted again within the run (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `catfeat extract` with parsed ``args``; returns the exit code."""
    say = echo(args)
    report = run_extraction(args.data_dir, args.models, args.features, args.weights, args.batch_size, args.limit,
                            args.force, args.precision, args.workers, args.weights_seed,
                            progress=not (args.no_progress or args.quiet),
                            engine=args.engine, engine_options=_engine_options(args), tta=args.tta,
                            decoder=args.decoder, dtype=args.dtype, reader=args.reader,
                            skip_damaged=args.skip_damaged)
    for name, path in report.paths.items():
        say(f"{name}: {path}")
    for s in report.skipped:  # those printed during the run are not repeated
        if s["path"] not in report.shown:
            say(skip_line(s["path"], s["reason"]))
    for d in report.damaged:
        if d["path"] not in report.shown:
            say(damaged_line(d["path"], d["reason"]))
    if args.verbose:
        from catfeat.cache.describe import describe_caches, format_caches

        print(format_caches(describe_caches(args.features)))
    print("catfeat.extract: " + report.summary())
    return 0


def _engine_options(args: argparse.Namespace) -> dict | None:
    if args.engine == "local":
        return None
    return {"address": args.address, "num_gpus_per_worker": args.num_gpus_per_worker, "shards": args.shards,
            "reads": args.read_on, "retries": args.shard_retries}


def main(argv=None) -> int:
    """`python -m catfeat.extract ARGS`: parse ``argv`` and run; returns the exit code."""
    return run_cli(run, build_parser(), argv)

