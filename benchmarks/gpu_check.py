"""The GPU check: whole-process extraction speed against the compute ceiling, in one call.

Prepared here, run on the lent GPU machine (it has JAX but no TensorFlow)::

    bash ../shared/tools/prepare-device.sh 1000      # keras wheels + 1,000 photos into .device/
    # device tool, carry [".device"], timeout_s 540:
    bash benchmarks/gpu_check.sh

Also runs on a CPU with small numbers (``--limit 16 --batch-size 8``) to check the script itself.
Prints one JSON object: for each model set (the four Keras backbones; lite0+lite1+lite2), both
``--weights none`` (same speed as real weights), at ``--precision``:

* ``whole_img_s``: images / seconds of ``catfeat.run_extraction`` from JPEG files to finished
  HDF5 caches, model build and compilation excluded (``build`` stage), everything else in;
* ``ceiling_img_s``: the same compiled models over uint8 batches already on the device (no decode,
  no copy, no write), timed after a warm-up call;
* ``feeder_img_s``: the host reader alone (decode + resize to the set's input sizes, every core),
  on threads and on processes (``reader``: the one the whole run used, "auto" by default);
* ``driver_img_s``: the model stage alone, as the whole run drives it: ``catfeat.extraction.stages.run_stages``
  over uint8 batches already in host memory (no decode), copied to the device and dispatched by
  ``ModelRunner``, features read back by the writer thread and dropped (no HDF5). Whole ~ driver <
  ceiling puts the gap in the driver's per-batch path; driver ~ ceiling puts it in the reader or
  writer;
* ``trace``: per-batch stamps of the whole run and of the driver run, summarised: milliseconds
  between consecutive read-backs (p50, p90: the device's pace as the host sees it), the share of
  batches dispatched before the previous one was read back, and seconds lost waiting per stage;
* ``ratio`` = whole / ceiling, ``seconds`` per stage, ``gpu_util_mean`` / ``gpu_util_samples`` from
  ``nvidia-smi`` sampled every 200 ms during the extraction, and the summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = {"keras4": "r50,incv3,xcep,irv2", "lite012": "lite0,lite1,lite2"}


class GpuSampler:
    """``nvidia-smi`` utilisation samples on a background thread (nothing where there is no nvidia-smi)."""

    def __init__(self, period_ms: int = 200):
        self.samples: list[float] = []
        self._proc = None
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           f"-lms={period_ms}"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> dict:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
        s = self.samples
        return {"gpu_util_mean": round(sum(s) / len(s), 1) if s else None, "gpu_util_samples": len(s)}


def build_forwards(models: str, precision: str, batch_size: int) -> dict:
    """{name: (spec, compiled Forward)}, built once per set for the ceiling and the driver runs."""
    from catfeat.models.registry import parse_models
    from catfeat.models.forward import Forward

    return {s.name: (s, Forward(s, None, 0, precision, batch_size)) for s in parse_models(models)}


def ceiling(forwards: dict, batch_size: int, n_batches: int) -> float:
    """img/s of every backbone on device-resident uint8 batches, each image through every backbone."""
    import numpy as np

    from catfeat.models.forward import to_device, to_host

    specs = [spec for spec, _ in forwards.values()]
    fw = {name: f for name, (_, f) in forwards.items()}
    rng = np.random.RandomState(0)
    x = {s.input_size: to_device(rng.randint(0, 256, (batch_size, s.input_size, s.input_size, 3), dtype=np.uint8))
         for s in specs}
    for s in specs:  # compile
        to_host(fw[s.name].dispatch(x[s.input_size]))
    t = time.perf_counter()
    outs = []
    for _ in range(n_batches):
        outs += [fw[s.name].dispatch(x[s.input_size]) for s in specs]
    for o in outs:
        to_host(o)
    return n_batches * batch_size / (time.perf_counter() - t)


def summarize_trace(trace: list) -> dict:
    """What per-batch stamps (start, got, dispatched, fetched, written) say about the device's pace."""
    import numpy as np

    if len(trace) < 3:
        return {}
    t = np.array([row[1:] for row in sorted(trace)])
    got, dispatched, fetched, written = t.T
    gaps = np.diff(fetched) * 1000
    return {"batches": len(t), "readback_interval_ms_p50": round(float(np.median(gaps)), 1),
            "readback_interval_ms_p90": round(float(np.percentile(gaps, 90)), 1),
            "dispatched_before_previous_readback": round(float(np.mean(dispatched[1:] < fetched[:-1])), 3),
            "dispatch_ms_mean": round(float(np.mean(dispatched - got)) * 1000, 2),
            "write_ms_mean": round(float(np.mean(written - fetched)) * 1000, 2),
            "span_s": round(float(written[-1] - got[0]), 3)}


def driver(forwards: dict, batch_size: int, n_batches: int) -> dict:
    """img/s of run_stages over host-memory uint8 batches (no decode, no HDF5): the driver's own ceiling."""
    import numpy as np

    from catfeat.images.listing import Batch
    from catfeat.extraction.stages import ModelRunner, run_stages

    specs = [spec for spec, _ in forwards.values()]
    runner = ModelRunner({name: (spec.input_size, f) for name, (spec, f) in forwards.items()})  # compiled already
    rng = np.random.RandomState(0)
    sizes = sorted({s.input_size for s in specs})
    pool = [{s: rng.randint(0, 256, (batch_size, s, s, 3), dtype=np.uint8) for s in sizes} for _ in range(4)]
    batches = (Batch(k * batch_size, pool[k % len(pool)], np.ones(batch_size, bool), {}, 0.0, 0.0)
               for k in range(n_batches))
    trace, secs = [], {}
    t = time.perf_counter()
    run_stages(batches, runner, lambda b, f: None, seconds=secs, trace=trace)
    return {"driver_img_s": round(n_batches * batch_size / (time.perf_counter() - t), 1),
            "driver_seconds": {k: round(v, 2) for k, v in secs.items()}, "driver_trace": summarize_trace(trace)}


def feeder(data: Path, models: str, batch_size: int, limit: int | None, workers: int | None, decoder: str,
           reader: str = "threads") -> float:
    """img/s of the host reader alone (decode + resize to every input size of ``models``, batches
    stacked), the same reader ``run_extraction`` uses: the feeder's own ceiling on this host."""
    from catfeat.models.registry import parse_models
    from catfeat.images.decoders import get_decoder
    from catfeat.images.listing import list_images
    from catfeat.images.reader import iter_batches

    sizes = sorted({s.input_size for s in parse_models(models)})
    paths = list_images(data, limit).paths()
    t, n = time.perf_counter(), 0
    for batch in iter_batches(paths, sizes, batch_size, workers=workers, decode=get_decoder(decoder).decode,
                              reader=reader):
        n += len(batch)
    return n / (time.perf_counter() - t)


def replicate(data: Path, times: int) -> Path:
    """A flat folder of ``times`` links to every photo of ``data`` (distinct names), so that a run
    lasts long enough to time on a fast GPU without carrying more photos to the machine."""
    if times <= 1:
        return data
    out = Path(tempfile.mkdtemp(prefix="catfeat-gpu-photos-"))
    photos = sorted(p for p in data.iterdir() if p.suffix.lower() == ".jpg")
    for k in range(times):
        for p in photos:
            cls, num = p.name.split(".")[:2]
            (out / f"{cls}.{k}{int(num):05d}.jpg").symlink_to(p.resolve())
    return out


def whole(data: Path, models: str, precision: str, batch_size: int | None, limit: int | None,
          workers: int | None, decoder: str, reader: str = "auto") -> dict:
    import catfeat.extraction.stages as pipeline
    from catfeat import run_extraction

    out = Path(tempfile.mkdtemp(prefix="catfeat-gpu-check-"))
    sampler = GpuSampler()
    trace: list = []
    plain = pipeline.run_stages
    pipeline.run_stages = lambda *a, **k: plain(*a, **k, trace=trace)  # the engine imports it at call time
    try:
        rep = run_extraction(data, models, out, weights=None, batch_size=batch_size, limit=limit, precision=precision,
                             workers=workers, progress=False, decoder=decoder, reader=reader)
    finally:
        pipeline.run_stages = plain
        util = sampler.stop()
        shutil.rmtree(out, ignore_errors=True)
    timed = rep.seconds["total"] - rep.seconds.get("build", 0.0)
    return {"images": rep.processed, "reader": rep.reader, "whole_img_s": round(rep.processed / timed, 1), "total_s": round(rep.seconds["total"], 2),
            "seconds": {k: round(v, 2) for k, v in rep.seconds.items()}, "summary": rep.summary(),
            "trace": summarize_trace(trace), **util}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(".device/img"))
    p.add_argument("--sets", default="keras4,lite012")
    p.add_argument("--precision", default="mixed_bfloat16")
    p.add_argument("--batch-size", type=int, default=None, help="(default: catfeat's, 128 on a GPU)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--decoder", default="auto")
    p.add_argument("--reader", default="auto", help="whole run's reader: auto, threads, processes")
    p.add_argument("--ceiling-batches", type=int, default=20)
    p.add_argument("--driver-batches", type=int, default=40)
    p.add_argument("--replicate", type=int, default=1, help="link every photo N times (distinct names)")
    args = p.parse_args(argv)
    args.data = replicate(args.data, args.replicate)
    from catfeat.models.forward import backend_name, default_batch_size, device_description

    bs = args.batch_size or default_batch_size()
    result = {"backend": backend_name(), "device": device_description(), "precision": args.precision,
              "batch_size": bs, "cores": os.cpu_count(), "photos": len(list(args.data.iterdir()))}
    for name in args.sets.split(","):
        models = SETS[name]
        w = whole(args.data, models, args.precision, bs, args.limit, args.workers, args.decoder, args.reader)
        forwards = build_forwards(models, args.precision, bs)
        c = ceiling(forwards, bs, args.ceiling_batches)
        d = driver(forwards, bs, args.driver_batches)
        del forwards
        f = {r: round(feeder(args.data, models, bs, args.limit, args.workers, args.decoder, r), 1)
             for r in ("threads", "processes")}
        result[name] = {"models": models, **w, "ceiling_img_s": round(c, 1), "ratio": round(w["whole_img_s"] / c, 3),
                        **d, "feeder_img_s": f}
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
