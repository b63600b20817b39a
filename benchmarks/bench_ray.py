"""Local engine vs Ray engine on the same images: wall-clock images per second, same cache contents.

    python benchmarks/bench_ray.py   # 200 photos (100 per class), lite0 with ImageNet weights

Three runs into fresh folders, one after the other:
  local      the in-process engine (decode thread pool + compiled model);
  ray cold   --engine ray starting its own local Ray, as `python -m catfeat.extract --engine ray` does;
  ray warm   --engine ray on a Ray instance started beforehand (Ray's start-up not counted; the actors
             are still created and the models built, as in every run).
Each figure is images / whole run_extraction() wall time, model build and file writes included.
The caches are compared at the end: the Ray engine must produce the local engine's features.
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
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import ray

    from catfeat.extraction.run import run_extraction
    from catfeat.cache.store import open_cache

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
          f"ray {ray.__version__}, Keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}", flush=True)
    try:
        timed("local")
        timed("ray cold", engine="ray", engine_options=ray_opts)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
        try:
            timed("ray warm", engine="ray", engine_options=ray_opts)
        finally:
            ray.shutdown()
        base = results["local"][0].paths
        worst = 0.0
        for label in ("ray cold", "ray warm"):
            for name, path in results[label][0].paths.items():
                a, b = open_cache(base[name]), open_cache(path)
                assert list(a.names()) == list(b.names()) and a.skipped() == b.skipped(), f"{label}: {name}"
                for split in ("train", "test"):
                    fa, fb = a.features(split), b.features(split)
                    if len(fa):
                        worst = max(worst, float(np.abs(fa - fb).max() / (np.abs(fa).max() + 1e-12)))
        n_local = results["local"][0].processed / results["local"][1]
        for label in ("ray cold", "ray warm"):
            r, wall = results[label]
            print(f"{label}: {r.processed / wall / n_local:.2f}x the local engine's throughput")
        print(f"same names, labels and skipped files; largest feature difference {worst:.1e} of the feature "
              "range")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"outputs kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
