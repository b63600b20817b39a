"""Benchmark: `python -m catfeat.fit` on feature caches of growing size, streaming and in memory.

    python benchmarks/bench_scale.py                                  # 25k, 100k, 300k, 600k rows
    python benchmarks/bench_scale.py --sizes 100000 --modes stream,memory
    python benchmarks/bench_scale.py --read-speed                     # HDF5 layouts: read MB/s

Builds, one size at a time, three caches with the real structure (FeatureWriter files named
gap_EfficientNetLite{0,1,2}.h5, 1280 float32 dims each, cats then dogs as extraction sorts them,
1,000 test rows) with class-dependent GAP-like features, runs ``python -m catfeat.fit`` on them
as a separate process under ``/usr/bin/time`` and reports wall time and peak RSS; deletes the
caches after each size. ``--modes`` picks ``stream`` (``--stream``) and/or ``memory``
(``--no-stream``, only up to ``--memory-max`` rows). Writes JSON next to the printed table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("EfficientNetLite0", "EfficientNetLite1", "EfficientNetLite2")


def _features(rng, y: np.ndarray, centers: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """GAP-like rows: non-negative, class signal in a few latent directions, noise elsewhere."""
    latent = rng.standard_normal((len(y), mix.shape[0]), dtype=np.float32)
    latent[:, :centers.shape[1]] += centers[y]
    f = latent @ mix
    f += rng.standard_normal(f.shape, dtype=np.float32)
    return np.maximum(f, 0, out=f)


def build(folder: Path, rows: int, dim: int = 1280, n_test: int = 1000, dtype: str = "float32",
          block: int = 20000, seed: int = 0, compression: str | None = None) -> float:
    """Three caches of ``rows`` labelled + ``n_test`` test rows; returns seconds."""
    from catfeat.cache.store import FeatureWriter, cache_path

    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    y = np.repeat([0, 1], [rows // 2, rows - rows // 2])
    names = ([f"train/cat.{i}.jpg" for i in range(rows // 2)] + [f"train/dog.{i}.jpg" for i in range(rows - rows // 2)]
             + [f"test/{i + 1}.jpg" for i in range(n_test)])
    labels = np.concatenate([y, -np.ones(n_test, np.int64)])
    split = ["train"] * rows + ["test"] * n_test
    truth = np.concatenate([y, np.arange(n_test) % 2])
    for m, model in enumerate(MODELS):
        rng = np.random.default_rng([seed, m])
        centers = np.array([[-0.6, 0.3, 0.0, 0.2], [0.6, -0.3, 0.4, 0.0]], np.float32)
        mix = (rng.standard_normal((16, dim), dtype=np.float32) / 4).astype(np.float32)
        attrs = {"backbone": model, "weights": "synthetic", "input_size": 0, "preprocessing": "none",
                 "precision": "float32", "tta": "none", "images_fingerprint": f"bench{rows}", "dtype": dtype,
                 "feature_dim": dim, "classes": json.dumps(["cat", "dog"])}
        path = cache_path(folder, model)
        w = FeatureWriter(path, attrs, names, labels, split, dim)
        if compression:
            _recreate_compressed(w, compression)
        for a in range(0, len(names), block):
            b = min(a + block, len(names))
            w.write(a, np.ones(b - a, bool), _features(rng, truth[a:b], centers, mix), {})
        w.finish()
    return time.perf_counter() - t


def _recreate_compressed(w, compression: str) -> None:
    """Swap the writer's empty train/test datasets for compressed ones (read-speed measurement only)."""
    f = w._f
    for ds in ("train", "test"):
        old = f[ds]
        chunks, dt = old.chunks, old.dtype
        del f[ds]
        kw = {"compression": "gzip", "compression_opts": 1} if compression == "gzip" else {"compression": compression}
        f.create_dataset(ds, shape=(0, w.dim), maxshape=(None, w.dim), dtype=dt, chunks=chunks, shuffle=True, **kw)


def run_fit(folder: Path, stream: bool, extra: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-f", "TIME_RSS_KB=%M WALL=%e", sys.executable, "-m", "catfeat.fit",
           "--features", str(folder), "--models", "lite0,lite1,lite2", "--stream" if stream else "--no-stream", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    m = re.search(r"TIME_RSS_KB=(\d+)", p.stderr)
    last = [line for line in p.stdout.splitlines() if line.startswith("catfeat.fit:")]
    ll = re.search(r"log loss ([0-9.]+) accuracy ([0-9.]+)", last[-1]) if last else None
    if p.returncode:
        print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
    return {"mode": "stream" if stream else "memory", "rc": p.returncode, "wall_s": round(wall, 1),
            "peak_rss_gb": round(int(m.group(1)) / 2**20, 2) if m else None,
            "log_loss": float(ll.group(1)) if ll else None, "accuracy": float(ll.group(2)) if ll else None}


def read_speed(root: Path, rows: int = 30000, dim: int = 1280, block: int = 8192) -> list[dict]:
    """MB/s of contiguous block reads [a:a+block] of one backbone's train set, per storage layout."""
    import h5py

    out = []
    for label, dtype, comp in (("float32, chunked, uncompressed (default)", "float32", None),
                               ("float32, gzip-1 + shuffle", "float32", "gzip"),
                               ("float32, lzf + shuffle", "float32", "lzf"),
                               ("float16, chunked, uncompressed", "float16", None)):
        folder = root / f"speed_{dtype}_{comp}"
        build(folder, rows, dim, n_test=10, dtype=dtype, compression=comp)
        path = folder / f"gap_{MODELS[0]}.h5"
        size = path.stat().st_size
        with h5py.File(path, "r") as f:
            ds = f["train"]
            for _ in range(2):  # second pass: from the page cache, as repeated epochs read
                t = time.perf_counter()
                for a in range(0, rows, block):
                    x = ds[a:a + block].astype(np.float32, copy=False)
                secs = time.perf_counter() - t
        del x
        out.append({"layout": label, "file_mb": round(size / 1e6), "read_s": round(secs, 2),
                    "rows_per_s": round(rows / secs), "float32_mb_per_s": round(rows * dim * 4 / 1e6 / secs)})
        shutil.rmtree(folder)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="25000,100000,300000,600000", help="labelled rows per backbone")
    p.add_argument("--modes", default="stream,memory", help="stream and/or memory (default: %(default)s)")
    p.add_argument("--memory-max", type=int, default=100000, help="largest size run in memory (default: %(default)s)")
    p.add_argument("--out", default="/tmp/catfeat_bench_scale", help="scratch folder (deleted per size)")
    p.add_argument("--fit-args", default="", help="extra arguments for catfeat.fit, e.g. '--cv 5'")
    p.add_argument("--read-speed", action="store_true", help="measure HDF5 read speed per layout instead")
    p.add_argument("--json", default=None, help="write results here (default: OUT/../bench_scale.json)")
    args = p.parse_args(argv)
    root = Path(args.out)
    if args.read_speed:
        res = read_speed(root)
        print("| layout | file MB | rows/s | float32 MB/s |\n|---|---|---|---|")
        for r in res:
            print(f"| {r['layout']} | {r['file_mb']} | {r['rows_per_s']:,} | {r['float32_mb_per_s']:,} |")
        return 0
    results = []
    modes = args.modes.split(",")
    print("| rows/backbone | float32 GB on disk | mode | wall s | peak RSS GB | log loss | accuracy |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        folder = root / f"rows{size}"
        free = shutil.disk_usage(root.parent if root.parent.exists() else "/").free
        need = 3 * (size + 1000) * 1280 * 4
        if need > 0.8 * free:
            print(f"skip {size}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free", flush=True)
            continue
        build_s = build(folder, size)
        disk = sum(f.stat().st_size for f in folder.glob("*.h5")) / 1e9
        for mode in modes:
            if mode == "memory" and size > args.memory_max:
                continue
            r = run_fit(folder, mode == "stream", args.fit_args.split())
            r.update(rows=size, disk_gb=round(disk, 2), build_s=round(build_s, 1))
            results.append(r)
            print(f"| {size:,} | {disk:.2f} | {r['mode']} | {r['wall_s']} | {r['peak_rss_gb']} | {r['log_loss']} | "
                  f"{r['accuracy']} |" + ("" if r["rc"] == 0 else f" rc={r['rc']}"), flush=True)
        shutil.rmtree(folder)
    by = {(r["rows"], r["mode"]): r for r in results}
    for size in sorted({r["rows"] for r in results}):
        if (size, "stream") in by and (size, "memory") in by:
            ratio = by[(size, "memory")]["wall_s"] / by[(size, "stream")]["wall_s"]
            print(f"{size:,} rows: streaming runs at {ratio:.2f}x the speed of the in-memory fit")
    out = Path(args.json) if args.json else root.parent / "bench_scale.json"
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
