"""Reading images from an object store vs from local disk: the reader stage, side by side.

    python benchmarks/bench_object_store.py              # 400 photos, SeaweedFS started on 127.0.0.1
    python benchmarks/bench_object_store.py --n 1000 --repeats 3

The photos are uploaded to a SeaweedFS S3 store started here (as the tests start it), then read and
decoded by the extraction's reader (catfeat.images.reader.iter_batches: threads, the same decode unit,
URLs read by catfeat.images.sources.fetch) from the local folder and from s3://, alternately; figures
are images per second of the whole read (listing included) and their ratio. The store runs on this
machine, so this measures catfeat's per-object overhead (requests, copies), not a network.
A third source, "s3-asksize", reads the same URLs without the sizes the listing gave (plain strings:
each object's size is asked first, HEAD + GET, as before one GET per object), side by side.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "small200" / "train"


def read_all(data, workers: int, ask_size: bool = False) -> tuple[float, int, int]:
    """(seconds, images read, images skipped) for listing ``data`` and reading every image once;
    ``ask_size``: URLs without the listing's sizes (each asks its size first)."""
    from catfeat.images.listing import list_images
    from catfeat.images.reader import iter_batches

    t = time.perf_counter()
    images = list_images(data)
    paths = images.paths()
    if ask_size:
        from catfeat.images.sources import filesystem

        filesystem(str(data))[0].invalidate_cache()  # s3fs would answer the sizes from the listing it holds
        paths = [str(p) for p in paths]
    ok = bad = 0
    for batch in iter_batches(paths, [224], 32, workers=workers, reader="threads"):
        ok += int(batch.ok.sum())
        bad += len(batch.errors)
    return time.perf_counter() - t, ok, bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of photos named <class>.<id>.jpg")
    p.add_argument("--n", type=int, default=400, help="photos to use (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reader threads (default: every core)")
    args = p.parse_args(argv)

    from seaweedfs_server import run_seaweedfs

    files = sorted(args.data.glob("*.jpg"))[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "photos"
        local.mkdir()
        for f in files:
            shutil.copyfile(f, local / f.name)
        with run_seaweedfs(Path(tmp) / "store") as store:
            os.environ.update(store.env())
            fs = store.fs()
            fs.mkdir("bench")
            fs.put(str(local) + "/", "bench/photos/", recursive=True)
            url = "s3://bench/photos/"
            rows = {"local": [], "s3": [], "s3-asksize": []}
            for _ in range(args.repeats):
                for name, data in (("local", local), ("s3", url), ("s3-asksize", url)):
                    rows[name].append(read_all(data, args.workers, ask_size=name == "s3-asksize"))
    print(f"{len(files)} photos, {args.workers} reader threads, load {os.getloadavg()[0]:.1f}")
    for name, runs in rows.items():
        best = min(r[0] for r in runs)
        print(f"  {name:10s} best of {len(runs)}: {best:6.2f} s  {runs[0][1] / best:7.1f} img/s  "
              f"(read {runs[0][1]}, skipped {runs[0][2]})")
    ratio = min(r[0] for r in rows["local"]) / min(r[0] for r in rows["s3"])
    print(f"  s3 / local images per second: {ratio:.2f} x")
    gain = min(r[0] for r in rows["s3-asksize"]) / min(r[0] for r in rows["s3"])
    print(f"  s3 (one GET) / s3-asksize (HEAD + GET) images per second: {gain:.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
