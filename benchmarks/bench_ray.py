"""Local engine vs Ray engine vs the compute ceiling on the same images; the driver's own limits.

    python benchmarks/bench_ray.py   # 200 photos (100 per class), lite0 with ImageNet weights

Runs into fresh folders, one after the other, in this one process:
  local      the in-process engine (decode thread pool + compiled model);
  ray cold   --engine ray starting its own local Ray, as `python -m catfeat.extract --engine ray` does;
  ray warm   --engine ray on a Ray instance started beforehand (Ray's start-up not counted; the actors
             are still created and the models built, as in every run);
  ray retry  as ray warm, but once all but the last shard's images have arrived, the next rows are
             dropped with the error Ray raises for a dead node: the engine submits the images still
             missing (at most one shard) again. Its extra wall time over ray warm is what retrying
             one shard costs within a run (a new Ray Data job: actors built again, the lost rows redone);
  ceiling    the same compiled models over uint8 tensors decoded beforehand (bench_extract.run_ceiling).
Each run's figure is images / whole run_extraction() wall time, model build and file writes included;
"after start-up" divides by the wall time less the run's ``startup`` (Ray up, Ray Data started, the
first model actor spawned, built and compiled): the criterion on this machine is Ray warm after
start-up >= 0.85 x the ceiling. The caches are compared at the end: every Ray run must produce the
local engine's features.

driver     rows per second the Ray driver can take in and write as parts (PartSink.add, rows arriving
           in shuffled blocks as from many actors) and then merge into the caches (merge_parts), for
           --driver-rows synthetic rows of the --models' real feature widths, no Ray, no model: the one
           part of a Ray run that does not grow with the cluster.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "original"
DEFAULT_MODEL = "lite0" if importlib.util.find_spec("catfeat.models.lite") else "r50"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 3)[3],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=200, help="images per split, class-balanced "
                   "(default: %(default)s)")
    p.add_argument("--models", default=DEFAULT_MODEL, help="backbones (default: %(default)s)")
    p.add_argument("--weights", default="imagenet" if DEFAULT_MODEL == "lite0" else "none",
                   help="imagenet | none (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--shards", type=int, default=4, help="shards of the Ray runs (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the Ray started for the warm run (default: all)")
    p.add_argument("--driver-rows", type=int, default=20000, help="rows of the driver measurement, 0 to skip "
                   "(default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    return p.parse_args(argv)


def measure_driver(models: str, n_rows: int, batch_size: int, shards: int, work: Path) -> tuple[float, float]:
    """(rows/s taken in and written as parts, rows/s merged into the caches) by the Ray engine's driver
    code for ``n_rows`` synthetic rows of every backbone in ``models`` (their real feature widths)."""
    import numpy as np

    from catfeat.extraction import ray_engine
    from catfeat.extraction.run import ExtractionReport, cache_attrs
    from catfeat.extraction.stages import progress_bar
    from catfeat.images.listing import ImageSet
    from catfeat.models.registry import Weights, parse_models

    specs = parse_models(models)
    half = n_rows // 2
    names = [f"train/cat.{i}.jpg" for i in range(half)] + [f"train/dog.{i}.jpg" for i in range(n_rows - half)]
    images = ImageSet(work, names, np.array([0] * half + [1] * (n_rows - half)), ["train"] * n_rows,
                      ["cat", "dog"], "kaggle")
    attrs = {sp.name: cache_attrs(sp, Weights.parse("none"), 0, "float32", images, "synthetic") for sp in specs}
    paths = {sp.name: work / f"gap_{sp.name}.h5" for sp in specs}
    plan = ray_engine.plan_shards(n_rows, shards)
    folders = {sp.name: ray_engine.parts_dir(paths[sp.name], attrs[sp.name], n_rows, len(plan)) for sp in specs}
    for folder in folders.values():
        folder.mkdir(parents=True)
    part_attrs = {(sp.name, sh.index): {**attrs[sp.name], "shard_index": sh.index, "shard_start": sh.start,
                                        "shard_end": sh.end, "n_shards": len(plan)} for sp in specs for sh in plan}
    report = ExtractionReport(paths={})
    sink = ray_engine.PartSink(images, specs, plan, {sh.index: specs for sh in plan}, part_attrs, folders, report,
                               progress_bar(None, False, "driver", "img", total=n_rows), time.time())
    rng = np.random.default_rng(0)
    feats = {sp.name: rng.normal(size=(batch_size, sp.feature_dim)).astype(np.float32) for sp in specs}
    starts = np.arange(0, n_rows, batch_size)
    # batches arrive out of order within a window, as from several actors at once
    order = np.concatenate([rng.permutation(starts[i:i + 8]) for i in range(0, len(starts), 8)])
    t = time.perf_counter()
    for a in order:
        pos = np.arange(a, min(a + batch_size, n_rows), dtype=np.int64)
        n, zero = len(pos), np.zeros(len(pos))
        sink.add({"pos": pos, "ok": np.ones(n, bool), "reason": np.array([""] * n, dtype=object), "decode_s": zero,
                  "build_s": zero, "ready_at": zero, **{f"feat_{k}": f[:n] for k, f in feats.items()},
                  **{f"model_s_{k}": zero for k in feats}})
    sink.close()
    write = time.perf_counter() - t
    assert sink.missing() == 0 and report.processed == n_rows
    t = time.perf_counter()
    for sp in specs:
        ray_engine.merge_parts(paths[sp.name], attrs[sp.name], images, sp.feature_dim,
                               [(sh, ray_engine.part_file(folders[sp.name], sh)) for sh in plan])
    merge = time.perf_counter() - t
    return n_rows / write, n_rows / merge


def lose_last_shard_once(hit: list):
    """A PartSink.add that, once all but the last shard's images have arrived, drops the next rows with
    the error Ray raises for a dead node (so the engine submits the missing images again)."""
    import ray

    from catfeat.extraction import ray_engine

    add = ray_engine.PartSink.add

    def lossy(sink, batch):
        if not hit and len(sink.pending()) <= len(sink.shards[-1]):
            hit.append(len(sink.pending()))
            raise ray.exceptions.NodeDiedError("a node died (simulated by bench_ray)")
        add(sink, batch)

    return lossy


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_extract

    from catfeat.cache.store import open_cache
    from catfeat.extraction import ray_engine
    from catfeat.extraction.run import run_extraction
    from catfeat.images.listing import list_images
    from catfeat.models.registry import parse_models

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    common = dict(models=args.models, weights=args.weights, batch_size=args.batch_size, limit=args.limit,
                  progress=False)
    ray_opts = {"shards": args.shards}
    results = {}

    def timed(label, **kw):
        t = time.perf_counter()
        report = run_extraction(args.data, out=work / label.replace(" ", "-"), **common, **kw)
        wall = time.perf_counter() - t
        results[label] = (report, wall)
        print(f"{label:9s} {report.processed} images in {wall:6.1f} s = {report.processed / wall:6.1f} img/s   "
              f"[{report.summary()}]", flush=True)

    print(f"catfeat bench_ray: {args.models} weights={args.weights} batch={args.batch_size} "
          f"limit={args.limit}/split; {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"ray {ray.__version__}, Keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        timed("local")
        timed("ray cold", engine="ray", engine_options=ray_opts)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
        lost: list[int] = []
        try:
            timed("ray warm", engine="ray", engine_options=ray_opts)
            add = ray_engine.PartSink.add
            ray_engine.PartSink.add = lose_last_shard_once(lost)
            try:
                timed("ray retry", engine="ray", engine_options=ray_opts)
            finally:
                ray_engine.PartSink.add = add
        finally:
            ray.shutdown()
        images = list_images(args.data, args.limit)
        ceiling = bench_extract.run_ceiling(argparse.Namespace(weights=args.weights, precision="float32",
                                                               batch_size=args.batch_size, work=work),
                                            images, parse_models(args.models))
        ceil = len(images) / ceiling["seconds"]
        print(f"ceiling   {len(images)} images in {ceiling['seconds']:6.1f} s = {ceil:6.1f} img/s (model only, "
              f"uint8 decoded beforehand)", flush=True)
        ray_labels = ("ray cold", "ray warm", "ray retry")
        base = results["local"][0].paths
        worst = 0.0
        for label in ray_labels:
            for name, path in results[label][0].paths.items():
                a, b = open_cache(base[name]), open_cache(path)
                assert list(a.names()) == list(b.names()) and a.skipped() == b.skipped(), f"{label}: {name}"
                for split in ("train", "test"):
                    fa, fb = a.features(split), b.features(split)
                    if len(fa):
                        worst = max(worst, float(np.abs(fa - fb).max() / (np.abs(fa).max() + 1e-12)))
        n_local = results["local"][0].processed / results["local"][1]
        print(f"local: {n_local / ceil:.3f}x the ceiling")
        for label in ray_labels:
            r, wall = results[label]
            up = r.seconds.get("startup", 0.0)
            after = r.processed / (wall - up)
            print(f"{label}: {r.processed / wall / n_local:.2f}x the local engine's throughput; after its start-up "
                  f"({up:.1f} s) {after:.1f} img/s = {after / ceil:.3f}x the ceiling")
        extra = results["ray retry"][1] - results["ray warm"][1]
        print(f"retrying one shard within a run: {lost[0] if lost else 0} images submitted again, "
              f"{extra:+.1f} s over ray warm ({results['ray warm'][0].seconds.get('startup', 0.0):.1f} s of it "
              "is a new job's actors built again)")
        print(f"same names, labels and skipped files; largest feature difference {worst:.1e} of the feature "
              "range")
        if args.driver_rows:
            shards = max(1, args.driver_rows // 1000)  # the engine's default: about 1,000 images a shard
            write, merge = measure_driver(args.models, args.driver_rows, args.batch_size, shards, work / "driver")
            print(f"driver: {args.driver_rows} rows of {args.models}: {write:,.0f} rows/s taken in and written as "
                  f"parts, {merge:,.0f} rows/s merged into the caches")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"outputs kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
