"""The GPU ladder: where a whole extraction loses speed against the compute ceiling, stage by stage.

One build (the compiled forwards are reused by every rung), then each rung adds one part of a real
run to the rung it is compared with; each is printed in img/s and as a ratio to that rung, and the
first ratio under 0.9 on the main line names the limiting stage:

 1 ceiling          every backbone on uint8 batches already on the device, 3 batches in flight
 2 + copy           the same with a host-to-device copy of each batch (``ModelRunner.dispatch``)
   copy probe       (not a rung) one host-to-device copy per input size: ms and GB/s
 3 driver           ``run_stages`` from in-memory batches, writes dropped (dispatch, read-back thread);
                    also the writer thread's mean wait for each batch's features
 4 + writer         the same with the real HDF5 writers (``FeatureWriter``, the engine's flush schedule)
 5 + contention     rung 3 while the reader decodes real photos in the background, its output
                    dropped (what the decoders' CPU use alone costs the driver)
 6 reader           ``run_stages`` over the real reader's batches (the engine's reader, workers and
                    shared-memory lending), writes dropped
 7 reader + writer  the same with the real HDF5 writers
 8 whole, steady    ``run_extraction`` itself (JPEG files to finished caches), the steady-state pace
                    from its trace
 9 whole            the same run's images / its seconds, fixed costs included (listed apart)
10 fewer workers    (side rung, vs 6) the reader with the other worker count: every core less the
                    driver's 3 threads where the engine uses every core, else every core

Rung rates are steady-state rates (``catfeat.extraction.stages.steady_state``: the first batch of
each rung is the fill and is not counted). Each rung runs ``--rung-seconds`` (at least
``--min-batches`` batches), shortened so the whole ladder ends by ``--time-cap`` seconds.

On the GPU machine (JAX, no TensorFlow), prepared here with ``bash ../shared/tools/prepare-device.sh
1000`` and run with the device tool, carry [".device"]::

    bash benchmarks/gpu_ladder.sh keras      # then: bash benchmarks/gpu_ladder.sh lite

On a CPU, tiny (what tests/test_gpu_ladder.py runs in CI)::

    KERAS_BACKEND=jax python benchmarks/gpu_ladder.py --models lite0 --data DIR --batch-size 2 \\
        --rung-seconds 0.2 --min-batches 3 --precision float32
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = {"keras": "r50,incv3,xcep,irv2", "lite": "lite0,lite1,lite2"}
LIMITING = 0.9  # the first main-line ratio under this names the limiting stage


@dataclass
class Rung:
    key: str
    title: str
    parent: str | None  # the rung it is compared with
    stage: str  # what a drop at this rung points to
    img_s: float | None = None
    ratio: float | None = None
    note: str = ""
    main: bool = True  # on the main line (a candidate for the limiting stage)


class Ladder:
    """Holds the compiled forwards and runs the rungs; ``rungs`` fill in as they run."""

    def __init__(self, args):
        from catfeat.extraction.stages import ModelRunner
        from catfeat.images.listing import list_images
        from catfeat.images.reader import choose_reader
        from catfeat.models.forward import Forward, copies_off_host, on_accelerator
        from catfeat.models.registry import parse_models

        self.args, self.bs = args, args.batch_size
        self.specs = parse_models(args.models)
        self.sizes = sorted({s.input_size for s in self.specs})
        self.paths = list_images(args.data).paths()
        self.accelerator = on_accelerator()
        self.reader_kind = choose_reader(args.reader, args.workers, len(self.paths), self.sizes, self.bs,
                                         lend=copies_off_host())
        t = time.perf_counter()
        self.forwards = {s.name: Forward(s, None, 0, args.precision, self.bs) for s in self.specs}
        self.runner = ModelRunner({s.name: (s.input_size, self.forwards[s.name]) for s in self.specs})
        self.runner(self.host_batches(1)[0])  # compiles every backbone (one batch, timed by no rung)
        self.build_s = time.perf_counter() - t
        self.deadline = time.perf_counter() + args.time_cap  # for the rungs, after the build
        self.rungs: list[Rung] = []
        self.probe: dict = {}
        self.left = 9  # rungs still to run, for the time plan

    # -- plan ---------------------------------------------------------------------------------------
    def seconds(self) -> float:
        """This rung's length: ``--rung-seconds``, less where the time cap is near (each rung still
        runs ``--min-batches``)."""
        spare = (self.deadline - time.perf_counter()) / max(1, self.left) - self.args.overhead
        self.left -= 1
        return max(0.0, min(self.args.rung_seconds, spare))

    def host_batches(self, k: int = 4) -> list[dict]:
        import numpy as np

        rng = np.random.RandomState(0)
        return [{s: rng.randint(0, 256, (self.bs, s, s, 3), dtype=np.uint8) for s in self.sizes} for _ in range(k)]

    def add(self, rung: Rung, img_s: float | None, note: str = "") -> Rung:
        rung.img_s, rung.note = img_s, note
        parent = next((r for r in self.rungs if r.key == rung.parent), None)
        if parent is not None and parent.img_s and img_s:
            rung.ratio = img_s / parent.img_s
        self.rungs.append(rung)
        print(line(rung, self.rungs), flush=True)
        return rung

    # -- rungs 1-2: the device alone ----------------------------------------------------------------
    def device_loop(self, copy: bool) -> dict:
        """Every backbone per batch, 3 batches in flight; ``copy``: each batch crosses from the host."""
        from catfeat.extraction.stages import Pending, steady_state
        from catfeat.models.forward import to_device

        runner, hosts = self.runner, self.host_batches()
        on_device = {s: to_device(hosts[0][s]) for s in self.sizes}
        secs, trace, flight, k = self.seconds(), [], deque(), 0
        t0 = time.perf_counter()

        def fetch_oldest():
            j, pending = flight.popleft()
            runner.fetch(pending)
            trace.append((j, 0.0, 0.0, 0.0, time.perf_counter(), self.bs))

        while k < self.args.min_batches or time.perf_counter() - t0 < secs:
            if copy:
                pending = runner.dispatch(hosts[k % len(hosts)])
            else:
                pending = Pending(self.bs, {name: [(f.dispatch(on_device[f.spec.input_size]), self.bs)]
                                            for name, f in self.forwards.items()}, time.perf_counter())
            flight.append((k, pending))
            k += 1
            if len(flight) > 3:
                fetch_oldest()
        while flight:
            fetch_oldest()
        return steady_state(trace)

    def copy_probe(self, repeats: int = 5) -> dict:
        """Milliseconds and GB/s of one host-to-device copy of a batch, per input size."""
        from catfeat.models.forward import copy_done, to_device

        out = {}
        for s, x in self.host_batches(1)[0].items():
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                copy_done([to_device(x)])
                times.append(time.perf_counter() - t)
            best = sorted(times)[len(times) // 2]
            out[s] = {"ms": round(best * 1000, 2), "GB_s": round(x.nbytes / best / 1e9, 2), "MB": round(x.nbytes / 1e6, 1)}
        return out

    # -- rungs 3-7: the driver, the writer, the reader ----------------------------------------------
    def timed(self, batches, secs: float):
        """``batches`` until ``secs`` have passed (and at least ``--min-batches``)."""
        t0 = time.perf_counter()
        for k, b in enumerate(batches):
            if k >= self.args.min_batches and time.perf_counter() - t0 >= secs:
                release = getattr(b, "release", None)
                if release is not None:
                    release()
                return
            yield b

    def memory_batches(self, secs: float):
        import numpy as np

        from catfeat.images.listing import Batch

        hosts = self.host_batches()
        k = 0
        while True:
            yield Batch(k * self.bs, hosts[k % len(hosts)], np.ones(self.bs, bool), {}, 0.0, 0.0)
            k += 1

    @contextmanager
    def writers(self, n: int):
        """A ``write(batch, features)`` into real HDF5 caches of ``n`` positions, one per backbone."""
        import numpy as np

        from catfeat.cache.store import FeatureWriter
        from catfeat.extraction.run import FLUSH_SECONDS

        out = Path(tempfile.mkdtemp(prefix="catfeat-ladder-"))
        names = [f"train/cat.{i}.jpg" for i in range(n)]
        ws = {s.name: FeatureWriter(out / f"gap_{s.name}.h5", {"backbone": s.name}, names, np.zeros(n, np.int64),
                                    ["train"] * n, s.feature_dim, flush_seconds=FLUSH_SECONDS) for s in self.specs}

        def write(batch, feats):
            for name, f in feats.items():
                ws[name].write(batch.start, batch.ok, f, batch.errors, batch.damaged)
        try:
            yield write
        finally:
            for w in ws.values():
                w.close(discard_empty=True)
            shutil.rmtree(out, ignore_errors=True)

    def stages(self, batches, write=None) -> tuple[dict | None, str]:
        """``run_stages`` over ``batches``: the steady state, and the writer thread's mean wait for
        each batch's features (its per-batch fetch wait)."""
        from catfeat.extraction.stages import run_stages, steady_state

        trace: list = []
        run_stages(batches, self.runner, write or (lambda b, f: None), seconds={}, trace=trace)
        rows = sorted(trace)
        waits = [r[3] - max(r[2], prev[4]) for prev, r in zip(rows, rows[1:])]
        note = f"fetch wait {1000 * sum(waits) / len(waits):.1f} ms/batch" if waits else ""
        return steady_state(trace), note

    def capacity(self, secs: float) -> int:
        """Positions enough for a rung of ``secs`` at the ceiling's pace (twice over)."""
        ceiling = self.rungs[0].img_s or 1000.0
        return int(max(self.args.min_batches + 2, 2 * ceiling * secs / self.bs + 4)) * self.bs

    def reader(self, n: int, workers: int | None = None):
        """The engine's reader over ``n`` photos (the folder's, repeated), on a thread of its own."""
        from catfeat.extraction.stages import InBackground
        from catfeat.images.decoders import get_decoder
        from catfeat.images.reader import iter_batches
        from catfeat.models.forward import copies_off_host

        paths = (self.paths * (n // len(self.paths) + 1))[:n]
        return InBackground(iter_batches(paths, self.sizes, self.bs, workers=workers or self.workers,
                                         decode=get_decoder(self.args.decoder).decode, reader=self.reader_kind,
                                         lend=copies_off_host()))

    @property
    def workers(self) -> int:
        from catfeat.images.reader import reader_workers

        return self.args.workers or reader_workers(self.accelerator)

    def driver(self, write: bool) -> tuple[dict | None, str]:
        secs = self.seconds()
        if not write:
            return self.stages(self.timed(self.memory_batches(secs), secs))
        with self.writers(self.capacity(secs)) as w:
            return self.stages(self.timed(self.memory_batches(secs), secs), w)

    def contention(self) -> tuple[dict | None, str]:
        """Rung 3 while the reader decodes in the background (output dropped)."""
        secs = self.seconds()
        background = self.reader(int(50_000 * (secs + 10)))  # more than it can decode meanwhile
        stop, got = threading.Event(), [0]

        def drain():
            for b in background:
                if b.release is not None:
                    b.release()
                got[0] += len(b)
                if stop.is_set():
                    return

        first = next(background)  # workers started and decoding
        if first.release is not None:
            first.release()
        th = threading.Thread(target=drain, daemon=True)
        th.start()
        t = time.perf_counter()
        try:
            steady, note = self.stages(self.timed(self.memory_batches(secs), secs))
        finally:
            stop.set()
            th.join()
            rate = got[0] / (time.perf_counter() - t)
            background.close()
        return steady, f"{note}; the reader decoded {rate:,.0f} img/s meanwhile"

    def real_reader(self, write: bool, workers: int | None = None) -> tuple[dict | None, str]:
        secs = self.seconds()
        n = self.capacity(secs)
        batches = self.reader(n, workers)
        try:
            if not write:
                steady, note = self.stages(self.timed(batches, secs))
            else:
                with self.writers(n) as w:
                    steady, note = self.stages(self.timed(batches, secs), w)
        finally:
            batches.close()
        return steady, f"{note}; {workers or self.workers} workers, {self.reader_kind}"

    # -- rungs 8-9: the whole run -------------------------------------------------------------------
    def whole(self) -> tuple[dict, object]:
        """``run_extraction`` on as many photos as rung 7's pace covers in a rung, the built forwards
        reused (``Forward`` is swapped for a lookup during the call)."""
        import catfeat.models.forward as forward_module
        from catfeat import run_extraction

        secs = self.seconds()
        pace = next((r.img_s for r in reversed(self.rungs) if r.key == "reader_writer" and r.img_s), 100.0)
        n = min(len(self.paths), max(self.args.min_batches * self.bs, int(pace * secs)))
        out = Path(tempfile.mkdtemp(prefix="catfeat-ladder-whole-"))
        built, plain = self.forwards, forward_module.Forward
        forward_module.Forward = lambda spec, *a, **k: built[spec.name]
        try:
            rep = run_extraction(self.args.data, ",".join(s.name for s in self.specs), out, weights=None,
                                 batch_size=self.bs, limit=n, precision=self.args.precision, progress=False,
                                 decoder=self.args.decoder, reader=self.reader_kind, workers=self.args.workers)
        finally:
            forward_module.Forward = plain
            shutil.rmtree(out, ignore_errors=True)
        return rep


def line(r: Rung, rungs: list[Rung]) -> str:
    rate = f"{r.img_s:>10,.1f} img/s" if r.img_s else f"{'-':>10} img/s"
    ratio = f"{r.ratio:>5.2f} x {r.parent}" if r.ratio is not None else ""
    k = next(i for i, x in enumerate(rungs, 1) if x is r)
    return f"rung {k:>2} {r.title:<22} {rate}  {ratio:<22} {r.note}"


def limiting(rungs: list[Rung]) -> str:
    for r in rungs:
        if r.main and r.ratio is not None and r.ratio < LIMITING:
            return f"limiting stage: {r.stage} (rung '{r.key}' at {r.ratio:.2f} x '{r.parent}')"
    return f"limiting stage: none (no rung under {LIMITING} x the one it adds to)"


def replicate(data: Path, times: int) -> Path:
    """A flat folder of ``times`` links to every photo of ``data`` (distinct names), so that a run
    lasts long enough to time on a fast GPU without carrying more photos to the machine."""
    if times <= 1:
        return data
    out = Path(tempfile.mkdtemp(prefix="catfeat-ladder-photos-"))
    photos = sorted(p for p in data.iterdir() if p.suffix.lower() == ".jpg")
    for k in range(times):
        for p in photos:
            cls, num = p.name.split(".")[:2]
            (out / f"{cls}.{k}{int(num):05d}.jpg").symlink_to(p.resolve())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", choices=sorted(SETS), default="keras", help="keras: r50,incv3,xcep,irv2; lite: lite0,1,2")
    p.add_argument("--models", help="backbones instead of a --set (e.g. lite0)")
    p.add_argument("--data", type=Path, default=Path(".device/img"), help="a folder of photos")
    p.add_argument("--replicate", type=int, default=1, help="link every photo N times (distinct names)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: catfeat's, 128 on a GPU)")
    p.add_argument("--precision", default="mixed_bfloat16")
    p.add_argument("--decoder", default="auto")
    p.add_argument("--reader", default="auto", choices=["auto", "threads", "processes"],
                   help="(default: the engine's choice for the photos, with the shared memory there is)")
    p.add_argument("--workers", type=int, default=None, help="(default: the engine's choice)")
    p.add_argument("--rung-seconds", type=float, default=8.0)
    p.add_argument("--min-batches", type=int, default=3)
    p.add_argument("--time-cap", type=float, default=240.0, help="seconds for the rungs after the build")
    p.add_argument("--overhead", type=float, default=2.0, help="seconds a rung spends outside its timed part")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.models = args.models or SETS[args.set]
    args.data = replicate(args.data, args.replicate)
    from catfeat.models.forward import backend_name, default_batch_size, device_description

    args.batch_size = args.batch_size or default_batch_size()
    head = {"backend": backend_name(), "device": device_description(), "models": args.models,
            "precision": args.precision, "batch_size": args.batch_size, "cores": os.cpu_count()}
    print(json.dumps(head), flush=True)
    lad = Ladder(args)
    print(f"build {lad.build_s:.1f} s (once; every rung reuses the compiled forwards); {len(lad.paths)} photos; "
          f"reader {lad.reader_kind}, {lad.workers} workers", flush=True)
    ceiling = lad.add(Rung("ceiling", "ceiling (on device)", None, "-"), lad.device_loop(copy=False)["img_s"])
    lad.add(Rung("copy", "+ host-to-device copy", "ceiling", "the host-to-device copy"),
            lad.device_loop(copy=True)["img_s"])
    lad.probe = lad.copy_probe()
    print("copy probe: " + "; ".join(f"{s} px {v['MB']} MB {v['ms']} ms {v['GB_s']} GB/s" for s, v in lad.probe.items()),
          flush=True)
    for key, title, parent, stage, run in (
            ("driver", "driver (in memory)", "copy", "the driver (dispatch, read-back thread)", lambda: lad.driver(False)),
            ("writer", "+ HDF5 writer", "driver", "the HDF5 writer", lambda: lad.driver(True)),
            ("contention", "+ decoding beside", "driver", "CPU contention from the decoders", lad.contention),
            ("reader", "real reader", "contention", "the reader's feed (decoding)", lambda: lad.real_reader(False)),
            ("reader_writer", "real reader + writer", "reader", "the writer beside the real reader",
             lambda: lad.real_reader(True))):
        steady, note = run()
        lad.add(Rung(key, title, parent, stage), steady["img_s"] if steady else None, note)
    rep = lad.whole()
    fixed = {k: round(v, 2) for k, v in rep.seconds.items() if k in ("list", "open", "build", "fill", "shutdown", "finish")}
    lad.add(Rung("whole_steady", "whole run, steady", "reader_writer", "the engine's own per-batch work"),
            rep.steady_img_s, f"{rep.processed} images")
    total = rep.seconds["total"]
    fixed_s = rep.fixed_seconds
    lad.add(Rung("whole", "whole run", "whole_steady", "fixed costs (listing, files, fill, shutdown, fsync)"),
            rep.processed / total if total else None,
            f"{total:.2f} s = {rep.processed} images at the steady pace + {fixed_s:.2f} s fixed "
            f"({', '.join(f'{k} {v}' for k, v in fixed.items())})" if fixed_s is not None else f"{total:.2f} s")
    other = os.cpu_count() if lad.workers < (os.cpu_count() or 1) else max(1, (os.cpu_count() or 1) - 3)
    steady, note = lad.real_reader(False, workers=other)
    side = Rung("fewer_workers" if other < lad.workers else "more_workers", f"reader, {other} workers", "reader",
                "the reader's worker count", main=False)
    lad.add(side, steady["img_s"] if steady else None, note)
    whole = lad.rungs[-2]
    print(f"whole / ceiling: {whole.img_s / ceiling.img_s:.3f}" if whole.img_s and ceiling.img_s else "whole / ceiling: -")
    print(limiting(lad.rungs), flush=True)
    result = {**head, "build_s": round(lad.build_s, 1), "rungs": [asdict(r) for r in lad.rungs], "copy_probe": lad.probe,
              "fixed_seconds": fixed, "summary": rep.summary(), "limiting": limiting(lad.rungs)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
