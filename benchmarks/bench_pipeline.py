"""Does the extraction pipeline overlap its stages? Stub stages of known cost, real plumbing.

    python benchmarks/bench_pipeline.py                 # the built-in cases
    python benchmarks/bench_pipeline.py --batches 60 --reader 0.02 --model 0.05 --writer 0.03 --jitter 0.8

Each stage sleeps for its cost per batch (sleeping releases the GIL, as decode, device work and
HDF5 writes do), so the ideal wall time is the slowest stage's total and the no-overlap wall time
is the sum of the stages. The stubs run through the real :func:`catfeat.extraction.stages.run_stages`
(``ModelRunner`` dispatching to a stub device whose queued work runs back to back in its own
time, like a GPU stream; the writer thread reading results back and writing) and, side by side in the same run, through two older shapes of the engine:

* serial: wait for batch -> run each model -> write;
* one ahead: the previous run_stages, whose dispatching thread read batch k-1 back itself right after
  dispatching batch k, so at most one batch waited on the device while it waited for the reader.

``--gil-writer`` makes the writer's cost a C call that holds the GIL (an HDF5 write can), so the
dispatching thread cannot run meanwhile. ``--jitter J`` draws each reader batch's cost uniformly from mean x (1 - J) .. mean x (1 + J)
(seeded): a reader as fast as the device on average but uneven, as a process pool over JPEGs of
different sizes is. ``--launch`` is host time spent by the dispatching thread per model call.
Reports wall / slowest stage (want <= 1.1) and wall / sum of stages.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catfeat.extraction.stages import ModelRunner, run_stages  # noqa: E402


class StubBatch:
    def __init__(self, start: int, n: int):
        self.start, self.ok, self.errors = start, np.ones(n, bool), {}
        self.images = {8: np.zeros((n, 8, 8, 3), np.uint8)}

    def __len__(self) -> int:
        return len(self.ok)


def _calibrate() -> float:
    n = 200_000
    t = time.perf_counter()
    sum(range(n))
    return n / (time.perf_counter() - t)


_GIL_RATE = None


def hold_gil(seconds: float) -> None:
    """Busy for ``seconds`` inside one C call that never releases the GIL (as an h5py write or a
    large copy can be): other Python threads cannot run meanwhile, unlike during a sleep."""
    global _GIL_RATE
    if _GIL_RATE is None:
        _GIL_RATE = max(_calibrate() for _ in range(3))
    sum(range(int(seconds * _GIL_RATE)))


def reader_costs(n_batches: int, mean: float, jitter: float, seed: int = 0) -> list[float]:
    """Seconds per batch: ``mean`` each, or uniform in mean x (1 -/+ jitter) (same mean)."""
    rng = np.random.default_rng(seed)
    return list(mean * (1 + jitter * rng.uniform(-1, 1, n_batches))) if jitter else [mean] * n_batches


def stub_reader(n_batches: int, batch: int, costs: list[float], prefetch: int = 2):
    """Batches made on a background thread (``costs[k]`` seconds each), ``prefetch`` ahead (as iter_batches)."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)

    def produce():
        for k in range(n_batches):
            time.sleep(costs[k])
            q.put(StubBatch(k * batch, batch))
        q.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (b := q.get()) is not None:
        yield b


class DeviceClock:
    """One accelerator stream: queued work runs back to back in its own time, with no GIL needed."""

    def __init__(self):
        self.busy_until = 0.0


class StubDevice:
    """One backbone on the stream: dispatch queues ``cost`` seconds of work and returns at once
    (after ``launch`` seconds of host time with the GIL held); fetch sleeps until that work is done."""

    def __init__(self, cost: float, batch: int, clock: DeviceClock, dim: int = 4, launch: float = 0.0):
        self.cost, self.batch_size, self.dim, self.clock, self.launch = cost, batch, dim, clock, launch

    def dispatch(self, x):
        if self.launch:
            hold_gil(self.launch)
        end = max(time.perf_counter(), self.clock.busy_until) + self.cost
        self.clock.busy_until = end
        return end, len(x)

    def fetch(self, handle, n):
        end, rows = handle
        time.sleep(max(0.0, end - time.perf_counter()))
        return np.zeros((rows, self.dim), np.float32)[:n]


def one_ahead(batches, runner: ModelRunner, write) -> None:
    """The previous run_stages: dispatch batch k, then read back batch k-1 on the same thread."""
    from catfeat.extraction.stages import WriterThread

    writer = WriterThread(write, 2)
    previous = None
    try:
        for batch in batches:
            current = (batch, runner.dispatch(batch.images))
            if previous is not None:
                writer.put(previous[0], runner.fetch(previous[1]))
            previous = current
        if previous is not None:
            writer.put(previous[0], runner.fetch(previous[1]))
    finally:
        writer.close()


def run_case(n_batches: int, batch: int, reader: float, models: list[float], writer: float,
             jitter: float = 0.0, launch: float = 0.0, gil_writer: bool = False) -> dict:
    def write(b, feats):
        (hold_gil if gil_writer else time.sleep)(writer)

    costs = reader_costs(n_batches, reader, jitter)

    def stub_runner():
        clock = DeviceClock()  # one device: every backbone's work queues up in one stream
        return ModelRunner({f"m{i}": (8, StubDevice(c, batch, clock, launch=launch)) for i, c in enumerate(models)},
                           to_device=lambda x: x)

    t = time.perf_counter()
    run_stages(stub_reader(n_batches, batch, costs), stub_runner(), write)
    wall = time.perf_counter() - t
    t = time.perf_counter()
    one_ahead(stub_reader(n_batches, batch, costs), stub_runner(), write)
    ahead = time.perf_counter() - t
    clock = DeviceClock()
    devices = {f"m{i}": StubDevice(c, batch, clock, launch=launch) for i, c in enumerate(models)}
    t = time.perf_counter()
    for b in stub_reader(n_batches, batch, costs):
        for d in devices.values():
            d.fetch(d.dispatch(b.images[8]), len(b))
        write(b, None)
    serial = time.perf_counter() - t
    stages = {"reader": sum(costs), "model": sum(models) * n_batches, "writer": writer * n_batches}
    slowest, total = max(stages.values()), sum(stages.values())
    return {"batches": n_batches, "jitter": jitter, "launch": launch, "gil_writer": gil_writer, "stage_seconds": stages,
            "slowest_stage_s": round(slowest, 3), "sum_of_stages_s": round(total, 3), "pipeline_wall_s": round(wall, 3),
            "pipeline_wall_over_slowest": round(wall / slowest, 3), "pipeline_wall_over_sum": round(wall / total, 3),
            "one_ahead_wall_s": round(ahead, 3), "one_ahead_wall_over_slowest": round(ahead / slowest, 3),
            "serial_wall_s": round(serial, 3), "serial_wall_over_slowest": round(serial / slowest, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=80)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reader", type=float, default=None, help="seconds per batch (default: the built-in cases)")
    p.add_argument("--model", type=float, default=0.05, help="seconds per batch for each of --n-models models")
    p.add_argument("--n-models", type=int, default=1)
    p.add_argument("--writer", type=float, default=0.02)
    p.add_argument("--jitter", type=float, default=0.0, help="reader cost spread, 0..1 (default: %(default)s)")
    p.add_argument("--launch", type=float, default=0.0,
                   help="host seconds per model call, GIL held (default: %(default)s)")
    p.add_argument("--gil-writer", action="store_true", help="the writer holds the GIL while it works")
    args = p.parse_args(argv)
    if args.reader is not None:
        cases = {"custom": (args.reader, [args.model] * args.n_models, args.writer, args.jitter, args.launch,
                            args.gil_writer)}
    else:
        cases = {"balanced": (0.05, [0.025, 0.025], 0.05, 0.0, 0.0),
                 "model-bound (4 backbones)": (0.03, [0.02, 0.015, 0.015, 0.01], 0.02, 0.0, 0.0),
                 "reader-bound": (0.06, [0.02, 0.01], 0.015, 0.0, 0.0),
                 "writer-bound": (0.02, [0.02], 0.05, 0.0, 0.0),
                 # a GPU run: device-bound on average, the reader uneven, each call costs host time
                 "device-bound, uneven reader": (0.04, [0.012, 0.012, 0.012, 0.012], 0.02, 0.9, 0.002),
                 "  and the writer holds the GIL": (0.04, [0.012, 0.012, 0.012, 0.012], 0.02, 0.9, 0.002, True)}
    rows = {name: run_case(args.batches, args.batch, *c) for name, c in cases.items()}
    print(f"{'case':28s} {'slowest s':>9s} {'sum s':>7s} {'pipeline s':>10s} {'/slowest':>8s} {'/sum':>6s} "
          f"{'one-ahead s':>11s} {'/slowest':>8s} {'serial s':>8s} {'/slowest':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['slowest_stage_s']:9.2f} {r['sum_of_stages_s']:7.2f} {r['pipeline_wall_s']:10.2f} "
              f"{r['pipeline_wall_over_slowest']:8.2f} {r['pipeline_wall_over_sum']:6.2f} {r['one_ahead_wall_s']:11.2f} "
              f"{r['one_ahead_wall_over_slowest']:8.2f} {r['serial_wall_s']:8.2f} {r['serial_wall_over_slowest']:8.2f}")
    print(json.dumps(rows))
    return 0 if all(r["pipeline_wall_over_slowest"] <= 1.1 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
