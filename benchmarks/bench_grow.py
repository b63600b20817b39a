"""Caches that grow: a full extraction of N photos vs adding 5% more and rerunning, side by side.

    python benchmarks/bench_grow.py                       # 1,520 real photos + 76 more, lite0 ImageNet
    python benchmarks/bench_grow.py --n 760 --repeat 2 --models lite0 --weights none
    python benchmarks/bench_grow.py --merge-rows 100000 --dim 2048  # the growth's own cost, no model

In one process, per repeat (fresh folders each time):
  full     run_extraction of N photos into an empty folder (what a first run, or --force, costs);
  grow     5% more photos linked in, the same command again: the cache grows (only the new photos are
           computed, kept rows copied, the cache rewritten);
  rebuild  the grown image set extracted from scratch into another folder (what issue 25 replaced),
           and the grown cache compared with it row for row.
Times are whole run_extraction calls (model build included: a user pays it on every run). The data
folder holds symbolic links to the photos (never copies), named as the photos. The framework is
imported and a first model built before any timing. Results print as a table and go to --out as JSON.

--merge-rows R times what a growth adds to the model's work, on synthetic features (no images, no
model): planning (names and stamps of R rows against the listing) and the merge that rewrites the
cache with R kept rows plus 5% new rows from a delta cache, as rows per second.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "original"


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n")
    p = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="flat folder of cat.N.jpg / dog.N.jpg")
    p.add_argument("--n", type=int, default=1520, help="photos of the first run (default: %(default)s)")
    p.add_argument("--add", type=float, default=0.05, help="fraction added for the rerun (default: %(default)s)")
    p.add_argument("--models", default="lite0", help="(default: %(default)s)")
    p.add_argument("--weights", default="imagenet", help="imagenet | none (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="repeats; the table shows each one's fastest")
    p.add_argument("--out", type=Path, default=Path("bench_grow_results.json"), help="(default: %(default)s)")
    p.add_argument("--merge-rows", type=int, default=0, help="time planning + merge alone on R synthetic rows")
    p.add_argument("--dim", type=int, default=2048, help="feature width for --merge-rows (default: %(default)s)")
    return p.parse_args(argv)


def photos(folder: Path) -> list[Path]:
    """The photos of ``folder``, cats and dogs interleaved so any prefix is balanced."""
    from catfeat.images.listing import natural_key

    by = {c: sorted(folder.glob(f"{c}.*.jpg"), key=lambda p: natural_key(p.name)) for c in ("cat", "dog")}
    return [p for pair in zip(by["cat"], by["dog"]) for p in pair]


def link(files: list[Path], into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for p in files:
        os.symlink(p.resolve(), into / p.name)


def same(a: Path, b: Path) -> dict:
    """How the grown cache ``a`` compares with the rebuild ``b``: equal non-feature datasets, and the
    largest feature difference."""
    import h5py

    out = {"datasets_equal": True, "max_abs_diff": 0.0}
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        if sorted(fa) != sorted(fb):
            return {"datasets_equal": False, "keys": [sorted(fa), sorted(fb)]}
        for k in fb:
            x, y = fa[k][()], fb[k][()]
            if k in ("train", "test"):
                if x.shape != y.shape:
                    out["datasets_equal"] = False
                elif x.size:
                    out["max_abs_diff"] = max(out["max_abs_diff"], float(np.abs(x - y).max()))
            elif x.shape != y.shape or not (x == y).all():
                out["datasets_equal"] = False
    return out


def merge_only(rows: int, dim: int, add: float) -> dict:
    """Seconds of plan_growth and merge_growth for ``rows`` kept rows plus ``add`` new ones (synthetic)."""
    from catfeat.cache.store import FeatureWriter
    from catfeat.extraction import grow
    from catfeat.images.listing import ImageSet

    extra = max(1, round(rows * add))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        tmp = Path(tmp)
        n = rows + extra
        names = [f"cat.{i}.jpg" for i in range(n)]
        images = ImageSet(tmp, names, np.zeros(n, np.int64), ["train"] * n, ["cat"], "flat")
        stamps = [f"{1000 + i}:{i}" for i in range(n)]
        attrs = {"backbone": "B", "feature_dim": dim, "images_fingerprint": "old", "classes": json.dumps(["cat"])}
        t = time.perf_counter()
        for path, sub, st in ((tmp / "gap_B.h5", images.subset(range(rows)), stamps[:rows]),
                              (tmp / ".grow" / "gap_B.h5", images.subset(range(rows, n)), stamps[rows:])):
            w = FeatureWriter(path, attrs, sub.names, sub.labels, sub.split, dim, stamps=st)
            for a in range(0, len(sub), 8192):
                b = min(a + 8192, len(sub))
                w.write(a, np.ones(b - a, bool), rng.standard_normal((b - a, dim), dtype=np.float32), {})
            w.finish()
        made = time.perf_counter() - t
        t = time.perf_counter()
        g = grow.plan_growth(tmp / "gap_B.h5", images, stamps)
        planned = time.perf_counter() - t
        t = time.perf_counter()
        grow.merge_growth(tmp / "gap_B.h5", {**attrs, "images_fingerprint": "new"}, images, stamps, dim, g,
                          tmp / "gap_B.h5", tmp / ".grow" / "gap_B.h5")
        merged = time.perf_counter() - t
        size = (tmp / "gap_B.h5").stat().st_size
    return {"rows": rows, "added": extra, "dim": dim, "write_s": made, "plan_s": planned, "merge_s": merged,
            "cache_bytes": size, "counts": g.counts}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge_rows:
        r = merge_only(args.merge_rows, args.dim, args.add)
        args.out.write_text(json.dumps({**r, "load": os.getloadavg()}, indent=1))
        n = r["rows"] + r["added"]
        mib = r["cache_bytes"] / 2**20
        print(f"{r['rows']:,} kept + {r['added']:,} new rows of {r['dim']} float32 ({mib:,.0f} MiB; "
              f"load {os.getloadavg()[0]:.1f}): writing them {r['write_s']:.1f} s; plan {r['plan_s']:.2f} s "
              f"({n / r['plan_s']:,.0f} rows/s); merge {r['merge_s']:.1f} s ({n / r['merge_s']:,.0f} rows/s, "
              f"{mib / r['merge_s']:,.0f} MiB/s)")
        return 0
    from catfeat.extraction.run import run_extraction

    kw = dict(models=args.models, weights=args.weights, batch_size=args.batch_size, progress=False)
    pool = photos(args.data)
    extra = max(1, round(args.n * args.add))
    if args.n + extra > len(pool):
        raise SystemExit(f"{args.data} holds {len(pool)} photos; --n {args.n} + {extra} is more")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_grow_") as tmp:
        warm = Path(tmp) / "warm"
        link(pool[:8], warm / "data")
        run_extraction(warm / "data", out=warm / "f", **kw)  # imports and a first build, untimed
        for r in range(args.repeat):
            work = Path(tmp) / f"r{r}"
            data = work / "data"
            link(pool[:args.n], data)
            t = time.perf_counter()
            full = run_extraction(data, out=work / "full", **kw)
            t_full = time.perf_counter() - t
            link(pool[args.n:args.n + extra], data)
            t = time.perf_counter()
            grown = run_extraction(data, out=work / "full", **kw)
            t_grow = time.perf_counter() - t
            t = time.perf_counter()
            rebuilt = run_extraction(data, out=work / "rebuild", **kw)
            t_rebuild = time.perf_counter() - t
            checks = {name: same(grown.paths[name], rebuilt.paths[name]) for name in grown.paths}
            runs.append({"full_s": t_full, "grow_s": t_grow, "rebuild_s": t_rebuild,
                         "full_stages": full.seconds, "grow_stages": grown.seconds, "grown": grown.grown,
                         "grow_processed": grown.processed, "checks": checks})
            shutil.rmtree(work)
    best = {k: min(r[k] for r in runs) for k in ("full_s", "grow_s", "rebuild_s")}
    result = {"n": args.n, "added": extra, "models": args.models, "weights": args.weights,
              "batch_size": args.batch_size, "load_before": os.getloadavg(), "cpus": os.cpu_count(),
              "machine": platform.platform(), "best": best, "runs": runs,
              "grow_over_full": best["grow_s"] / best["full_s"],
              "grow_over_rebuild": best["grow_s"] / best["rebuild_s"]}
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{args.n} photos + {extra} added ({args.models}, weights {args.weights}, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), fastest of {args.repeat}:")
    print(f"  full extraction of {args.n:>6}: {best['full_s']:7.1f} s")
    print(f"  grow by {extra:>4} and rerun : {best['grow_s']:7.1f} s  = {result['grow_over_full']:.1%} of the full run"
          f" (build {runs[-1]['grow_stages'].get('build', 0):.1f} s of it)")
    print(f"  rebuild of {args.n + extra:>6}     : {best['rebuild_s']:7.1f} s  "
          f"(grow = {result['grow_over_rebuild']:.1%} of it)")
    for name, c in runs[-1]["checks"].items():
        print(f"  {name}: grown == rebuild: datasets equal {c['datasets_equal']}, max |feature diff| "
              f"{c.get('max_abs_diff', float('nan')):.3g}; {runs[-1]['grown'].get(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
