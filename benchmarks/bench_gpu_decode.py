"""GPU decoding: img/s of the nvimgcodec decoder against OpenCV, decode + resize to every input size,
until the pixels are on the device, side by side in one run, at several batch sizes.

    KERAS_BACKEND=jax python benchmarks/bench_gpu_decode.py                       # 1,600 photos, 224+299
    KERAS_BACKEND=jax python benchmarks/bench_gpu_decode.py --sizes 224,240,260 --batch-sizes 128,256

For each batch size, interleaved ``--repeat`` times (best run kept):

* ``opencv``: the OpenCV decoder on the reader catfeat picks for it (``--reader``: threads or
  processes on every core), each batch then copied to the device (``to_device``) and waited for;
* ``nvimgcodec``: :func:`catfeat.images.reader.iter_batches_nvimgcodec` (nvImageCodec on the GPU,
  the resize jitted on the device; its CPU backend where there is no GPU), waited for;
* ``nvimgcodec_decode_only``: nvImageCodec's batch decode of the bytes already in memory (no
  header reads, no resize, no copy): the decoder's own ceiling.

The first pass over the photos compiles the resize and starts the pools; it is not timed. Pixels:
the largest and mean absolute difference from the OpenCV decoder over the first 64 photos, taken
from the device (a wrong device path shows here). Prints one JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "original"


def wait(images: dict) -> None:
    for a in images.values():
        if hasattr(a, "block_until_ready"):
            a.block_until_ready()


def run(paths, sizes, batch_size, decoder: str, reader: str) -> float:
    """img/s of one pass: every batch decoded, resized and on the device."""
    from catfeat.images.decoders import get_decoder
    from catfeat.images.reader import iter_batches
    from catfeat.models.forward import to_device

    dec = get_decoder(decoder)
    t = time.perf_counter()
    n = 0
    for b in iter_batches(paths, sizes, batch_size, decode=dec.decode, reader="batches" if dec.batched else reader):
        wait({s: to_device(a) if isinstance(a, np.ndarray) else a for s, a in b.images.items()})
        n += len(b)
    return n / (time.perf_counter() - t)


def decode_only(datas, batch_size) -> float:
    from catfeat.images.nvimgcodec_decoder import session

    s = session()
    t = time.perf_counter()
    for i in range(0, len(datas), batch_size):
        out = s.decoder.decode(datas[i:i + batch_size], params=s.params)
        if s.on_gpu and out and out[-1] is not None:
            out[-1].cpu()  # waits for the batch
    return len(datas) / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=1600)
    p.add_argument("--sizes", default="224,299")
    p.add_argument("--batch-sizes", default="64,128,256")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--reader", default="auto", choices=["auto", "threads", "processes"],
                   help="the OpenCV side's reader (default: what extraction picks)")
    args = p.parse_args(argv)
    import keras

    from catfeat.images.decoders import DECODERS
    from catfeat.images.listing import list_images
    from catfeat.images.nvimgcodec_decoder import session
    from catfeat.models.forward import device_description

    paths = list_images(args.data, args.limit).paths()[:args.limit]
    sizes = [int(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    on_gpu = session().on_gpu
    datas = [p.read_bytes() for p in paths]
    for bs in batch_sizes:  # warm: compiles (one per batch shape), pools, page cache
        run(paths, sizes, bs, "nvimgcodec", args.reader), run(paths, sizes, bs, "opencv", args.reader)
    best: dict = {}
    for _ in range(args.repeat):
        for bs in batch_sizes:
            for name, fn in (("opencv", lambda: run(paths, sizes, bs, "opencv", args.reader)),
                             ("nvimgcodec", lambda: run(paths, sizes, bs, "nvimgcodec", args.reader)),
                             ("nvimgcodec_decode_only", lambda: decode_only(datas, bs))):
                best[(name, bs)] = max(best.get((name, bs), 0.0), fn())
    nv, cv = DECODERS["nvimgcodec"].decode, DECODERS["opencv"].decode
    from catfeat.images.reader import iter_batches

    got = [np.asarray(a) for b in iter_batches(paths[:64], sizes, 64, decode=nv, reader="batches")
           for a in [b.images[sizes[-1]]]][0]
    ref = np.stack([cv(x, sizes)[sizes[-1]] for x in paths[:64]])
    diff = np.abs(got.astype(np.int16) - ref)
    result = {"photos": len(paths), "sizes": sizes, "cores": os.cpu_count(), "repeat": args.repeat,
              "backend": keras.backend.backend(), "device": device_description(), "nvimgcodec_on_gpu": on_gpu,
              "img_s": {f"{n}@{bs}": round(v, 1) for (n, bs), v in best.items()},
              "nvimgcodec_x_opencv": {bs: round(best[("nvimgcodec", bs)] / best[("opencv", bs)], 2)
                                      for bs in batch_sizes},
              "pixels_vs_opencv": {"max": int(diff.max()), "mean": round(float(diff.mean()), 4)}}
    print(f"{len(paths)} photos, sizes {sizes}, {result['backend']} on {result['device']}, nvImageCodec on "
          f"{'GPU' if on_gpu else 'CPU'}, best of {args.repeat}")
    print(f"{'batch':>6s} {'opencv img/s':>13s} {'nvimgcodec img/s':>17s} {'x opencv':>9s} {'decode only':>12s}")
    for bs in batch_sizes:
        print(f"{bs:6d} {best[('opencv', bs)]:13.1f} {best[('nvimgcodec', bs)]:17.1f} "
              f"{result['nvimgcodec_x_opencv'][bs]:9.2f} {best[('nvimgcodec_decode_only', bs)]:12.1f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
