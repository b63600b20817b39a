"""The feeder: decode + resize speed per core of each decoder, side by side, and what the choice does to features.

    python benchmarks/bench_feeder.py                        # 400 photos of original/, 224 and 299
    python benchmarks/bench_feeder.py --features 1600        # also: lite0 features and 5-fold CV per decoder

Speed: each decoder (``catfeat.images.decoders``; ``pillow`` is the path catfeat used before, unchanged)
decodes every photo once and resizes it to every size, on one thread (img/s per core) and on a
thread pool of every core, ``--repeat`` times interleaved; the best run of each is reported and
the ratio to Pillow is computed within the same run. Pixels: mean and max absolute difference
from Pillow's output, in 0..255 units.

With ``--features N``: EfficientNet-Lite0 features (real ImageNet weights) of N labelled photos
through each decoder, their relative difference and cosine similarity, and the 5-fold CV log loss
and accuracy of the default FusedHead on each decoder's features (same folds, same seed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "original"


def speed(decode, paths, sizes, threads: int) -> float:
    t = time.perf_counter()
    if threads == 1:
        for p in paths:
            decode(p, sizes)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: decode(p, sizes), paths))
    return len(paths) / (time.perf_counter() - t)


def features(data: Path, n: int, decoder: str, out: Path):
    from catfeat import load_features, run_extraction

    run_extraction(data, "lite0", out, weights="imagenet", limit=n, progress=False, decoder=decoder)
    return load_features("lite0", out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--sizes", default="224,299")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--features", type=int, default=0, metavar="N", help="also compare lite0 features of N photos")
    args = p.parse_args(argv)
    from catfeat.images.decoders import DECODERS as ALL

    # one file at a time on threads; the GPU decoder decodes batches: benchmarks/bench_gpu_decode.py
    DECODERS = {d: v for d, v in ALL.items() if not v.batched}
    from catfeat.images.listing import list_images

    images = list_images(args.data, args.limit)
    paths = images.paths()[:args.limit]
    sizes = [int(s) for s in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    runs = {(d, t): [] for d in DECODERS for t in (1, cores)}
    for _ in range(args.repeat):
        for (d, t) in runs:
            runs[(d, t)].append(speed(DECODERS[d].decode, paths, sizes, t))
    best = {k: max(v) for k, v in runs.items()}
    diffs = {}
    ref = [DECODERS["pillow"].decode(x, sizes) for x in paths]
    for d in DECODERS:
        outs = [DECODERS[d].decode(x, sizes) for x in paths]
        per = [np.abs(a[s].astype(np.int16) - b[s]).mean() for a, b in zip(ref, outs) for s in sizes]
        diffs[d] = {"mean_abs": round(float(np.mean(per)), 3), "max_image_mean_abs": round(float(np.max(per)), 3)}
    result = {"photos": len(paths), "sizes": sizes, "cores": cores, "repeat": args.repeat,
              "img_s": {f"{d}@{t}": round(v, 1) for (d, t), v in best.items()},
              "per_core_vs_pillow": {d: round(best[(d, 1)] / best[("pillow", 1)], 2) for d in DECODERS},
              "all_cores_vs_pillow": {d: round(best[(d, cores)] / best[("pillow", cores)], 2) for d in DECODERS},
              "pixel_diff_vs_pillow": diffs}
    print(f"{len(paths)} photos, sizes {sizes}, best of {args.repeat}")
    print(f"{'decoder':8s} {'1 thread img/s':>15s} {'x pillow':>9s} {f'{cores} threads img/s':>17s} {'x pillow':>9s} "
          f"{'pixel diff':>10s}")
    for d in DECODERS:
        print(f"{d:8s} {best[(d, 1)]:15.1f} {result['per_core_vs_pillow'][d]:9.2f} {best[(d, cores)]:17.1f} "
              f"{result['all_cores_vs_pillow'][d]:9.2f} {diffs[d]['mean_abs']:10.3f}")
    if args.features:
        import tempfile

        from catfeat.head.scoring import cross_validate
        from catfeat.head.estimator import FusedHead

        feats = {}
        with tempfile.TemporaryDirectory() as tmp:
            for d in DECODERS:
                X, y, names = features(args.data, args.features, d, Path(tmp) / d)
                feats[d] = (X["EfficientNetLite0"], y, names)
        (a, y, na), (b, _, nb) = feats["pillow"], feats["opencv"]
        assert list(na) == list(nb)
        rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
        cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        result["features"] = {"rows": len(y), "relative_diff_mean": round(float(rel.mean()), 4),
                              "relative_diff_max": round(float(rel.max()), 4), "cosine_min": round(float(cos.min()), 4)}
        for d, (X, yy, _) in feats.items():
            s = cross_validate(FusedHead(), {"EfficientNetLite0": X}, yy, 5, 0)
            result["features"][f"cv5_{d}"] = {"log_loss": round(s.log_loss, 4), "accuracy": round(s.accuracy, 4)}
        print(json.dumps(result["features"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
