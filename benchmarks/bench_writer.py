"""The HDF5 feature writer alone: rows/s of ``FeatureWriter.write`` + ``finish`` on synthetic features.

Writes ``--images`` rows of ``--dim`` float32 features in batches of ``--batch-size`` (one position
in 50 skipped, one in 100 damaged, a tenth of the images in the test split), as the local engine
does, and prints rows/s. ``--repo`` imports ``catfeat`` from another checkout, so that two versions
are timed side by side in one command, e.g. before/after::

    python benchmarks/bench_writer.py --repo /work/main --repo . --rounds 3

``--busy`` runs a pure-Python thread beside the writer (the dispatching thread of a real run), which
is where per-call interpreter-lock hand-offs in h5py show.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ONE = r'''
import sys, time, tempfile, threading, inspect
import numpy as np
from catfeat.cache.store import FeatureWriter
n, dim, bs, busy = {n}, {dim}, {bs}, {busy}
names = [f"train/cat.{{i}}.jpg" for i in range(n - n // 10)] + [f"test/{{i}}.jpg" for i in range(n // 10)]
split = ["train"] * (n - n // 10) + ["test"] * (n // 10)
labels = np.array([i % 2 for i in range(n - n // 10)] + [-1] * (n // 10))
rng = np.random.default_rng(0)
feats = rng.standard_normal((bs, dim)).astype(np.float32)
stop = threading.Event()
def spin():
    x = 0
    while not stop.is_set():
        x += 1
if busy:
    threading.Thread(target=spin, daemon=True).start()
kw = {{"flush_seconds": 1.0}} if "flush_seconds" in inspect.signature(FeatureWriter).parameters else {{}}
with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    w = FeatureWriter(d + "/gap_X.h5", {{"backbone": "X"}}, names, labels, split, dim, **kw)
    in_write = 0.0
    for s in range(0, n, bs):
        k = min(bs, n - s)
        ok = np.ones(k, bool)
        ok[[i for i in range(k) if (s + i) % 50 == 7]] = False
        errors = {{s + i: "cannot decode" for i in range(k) if not ok[i]}}
        damaged = {{s + i: "truncated" for i in range(k) if (s + i) % 100 == 3 and ok[i]}}
        rows = feats[:int(ok.sum())].copy()  # a fresh array per batch, as the runner hands over
        t1 = time.perf_counter()
        w.write(s, ok, rows, errors, damaged)
        in_write += time.perf_counter() - t1
    w.finish()
    dt = time.perf_counter() - t
stop.set()
print(n / dt, 1000 * in_write / -(-n // bs))
'''


def rows_per_second(repo: str, n: int, dim: int, bs: int, busy: bool) -> tuple[float, float]:
    """(rows/s of the whole write + finish, mean milliseconds of one ``write`` call) in a fresh process."""
    code = ONE.format(n=n, dim=dim, bs=bs, busy=busy)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(repo).resolve()), "PATH": "/usr/bin:/bin"})
    rate, ms = out.stdout.strip().splitlines()[-1].split()
    return float(rate), float(ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", action="append", help="checkout to import catfeat from (repeatable; default .)")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per checkout (median reported)")
    p.add_argument("--busy", action="store_true", help="a busy Python thread beside the writer")
    args = p.parse_args(argv)
    repos = args.repo or ["."]
    got: dict[str, list[tuple]] = {r: [] for r in repos}
    for _ in range(args.rounds):
        for r in repos:
            got[r].append(rows_per_second(r, args.images, args.dim, args.batch_size, args.busy))
    med = {r: sorted(x[0] for x in v)[len(v) // 2] for r, v in got.items()}
    ms = {r: sorted(x[1] for x in v)[len(v) // 2] for r, v in got.items()}
    out = {"images": args.images, "dim": args.dim, "batch_size": args.batch_size, "busy": args.busy,
           "rows_per_s": {r: round(v) for r, v in med.items()},
           "write_call_ms": {r: round(v, 3) for r, v in ms.items()},
           "all_rows_per_s": {r: [round(x[0]) for x in v] for r, v in got.items()}}
    if len(repos) > 1:
        out["rows_per_s_ratio_last_to_first"] = round(med[repos[-1]] / med[repos[0]], 2)
        out["write_call_ms_ratio_first_to_last"] = round(ms[repos[0]] / ms[repos[-1]], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
