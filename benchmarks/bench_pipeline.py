"""Does the extraction pipeline overlap its stages? Stub stages of known cost, real plumbing.

    python benchmarks/bench_pipeline.py                 # balanced and unbalanced stage costs
    python benchmarks/bench_pipeline.py --batches 60 --reader 0.02 --model 0.05 --writer 0.03

Each stage sleeps for its cost per batch (sleeping releases the GIL, as decode, device work and
HDF5 writes do), so the ideal wall time is the slowest stage's total and the no-overlap wall time
is the sum of the stages. The stubs run through the real :func:`catfeat.pipeline.run_stages`
(``ModelRunner`` dispatching to a one-thread "device" queue, ``WriterThread``) and, side by side,
through a serial loop (wait for batch -> run each model -> write), the shape of the engine before
the pipeline. Reports wall / slowest stage (want <= 1.1) and wall / sum of stages.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catfeat.pipeline import ModelRunner, run_stages  # noqa: E402


class StubBatch:
    def __init__(self, start: int, n: int):
        self.start, self.ok, self.errors = start, np.ones(n, bool), {}
        self.images = {8: np.zeros((n, 8, 8, 3), np.uint8)}

    def __len__(self) -> int:
        return len(self.ok)


def stub_reader(n_batches: int, batch: int, cost: float, prefetch: int = 2):
    """Batches made on a background thread ``cost`` seconds each, ``prefetch`` ahead (as iter_batches)."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)

    def produce():
        for k in range(n_batches):
            time.sleep(cost)
            q.put(StubBatch(k * batch, batch))
        q.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (b := q.get()) is not None:
        yield b


class StubDevice:
    """One queue of work, like an accelerator stream: dispatch returns at once, fetch waits."""

    def __init__(self, cost: float, batch: int, pool: ThreadPoolExecutor, dim: int = 4):
        self.cost, self.batch_size, self.dim, self.pool = cost, batch, dim, pool

    def _work(self, n):
        time.sleep(self.cost)
        return np.zeros((n, self.dim), np.float32)

    def dispatch(self, x):
        return self.pool.submit(self._work, len(x))

    def fetch(self, handle, n):
        return handle.result()[:n]


def run_case(n_batches: int, batch: int, reader: float, models: list[float], writer: float) -> dict:
    def write(b, feats):
        time.sleep(writer)

    # pipeline
    device = ThreadPoolExecutor(max_workers=1)  # one device: the models' work queues up in one stream
    devices = {f"m{i}": (8, StubDevice(c, batch, device)) for i, c in enumerate(models)}
    runner = ModelRunner(devices, to_device=lambda x: x)
    t = time.perf_counter()
    secs: dict = {}
    run_stages(stub_reader(n_batches, batch, reader), runner, write, seconds=secs)
    wall = time.perf_counter() - t
    # serial: the old loop
    devices = {f"m{i}": StubDevice(c, batch, device) for i, c in enumerate(models)}
    t = time.perf_counter()
    for b in stub_reader(n_batches, batch, reader):
        for d in devices.values():
            d.fetch(d.dispatch(b.images[8]), len(b))
        write(b, None)
    serial = time.perf_counter() - t
    stages = {"reader": reader * n_batches, "model": sum(models) * n_batches, "writer": writer * n_batches}
    slowest, total = max(stages.values()), sum(stages.values())
    return {"batches": n_batches, "stage_seconds": stages, "slowest_stage_s": round(slowest, 3),
            "sum_of_stages_s": round(total, 3), "pipeline_wall_s": round(wall, 3),
            "pipeline_wall_over_slowest": round(wall / slowest, 3), "pipeline_wall_over_sum": round(wall / total, 3),
            "serial_wall_s": round(serial, 3), "serial_wall_over_slowest": round(serial / slowest, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=80)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reader", type=float, default=None, help="seconds per batch (default: the built-in cases)")
    p.add_argument("--model", type=float, default=0.05, help="seconds per batch for each of --n-models models")
    p.add_argument("--n-models", type=int, default=1)
    p.add_argument("--writer", type=float, default=0.02)
    args = p.parse_args(argv)
    if args.reader is not None:
        cases = {"custom": (args.reader, [args.model] * args.n_models, args.writer)}
    else:
        cases = {"balanced": (0.05, [0.025, 0.025], 0.05),
                 "model-bound (4 backbones)": (0.03, [0.02, 0.015, 0.015, 0.01], 0.02),
                 "reader-bound": (0.06, [0.02, 0.01], 0.015),
                 "writer-bound": (0.02, [0.02], 0.05)}
    rows = {name: run_case(args.batches, args.batch, r, m, w) for name, (r, m, w) in cases.items()}
    print(f"{'case':28s} {'slowest s':>9s} {'sum s':>7s} {'pipeline s':>10s} {'/slowest':>8s} {'/sum':>6s} "
          f"{'serial s':>8s} {'/slowest':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['slowest_stage_s']:9.2f} {r['sum_of_stages_s']:7.2f} {r['pipeline_wall_s']:10.2f} "
              f"{r['pipeline_wall_over_slowest']:8.2f} {r['pipeline_wall_over_sum']:6.2f} {r['serial_wall_s']:8.2f} "
              f"{r['serial_wall_over_slowest']:8.2f}")
    print(json.dumps(rows))
    return 0 if all(r["pipeline_wall_over_slowest"] <= 1.1 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
