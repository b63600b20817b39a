"""What a whole extraction process costs beyond the model's own compute, and what a rerun's build costs.

    python benchmarks/bench_build.py whole --models r50,incv3 --weights none --limit 160 --repeat 2
    KERAS_BACKEND=jax python benchmarks/bench_build.py rerun --models r50,incv3 --weights none --limit 32

``whole``: two processes, timed from start to exit, interleaved ``--repeat`` times:
  catfeat    ``python -m catfeat.extract DATA --models ... --out <fresh folder>``: listing, decoding,
             build and compile, the models, HDF5 caches, everything a user waits for;
  in-memory  a process that loads the same photos already decoded and resized (uint8, saved
             beforehand by this script: no decode, no files written), builds and compiles the same
             models the same way (``catfeat.models.forward.Forward``) and runs them over every image.
The ratio ``in-memory s / catfeat s`` is catfeat's whole process as a fraction of the speed of the
same compute with nothing around it (1.0: the decoding, the pipeline and the writes cost nothing
on top); the median over the pairs is printed last. The same ratio of the processes' CPU seconds (user + system) is printed beside it: other
load on a shared machine disturbs it less than wall time. Each pair runs back to back, so other load on the machine hits both alike; every pair is printed.

``rerun`` (meant for ``KERAS_BACKEND=jax``): two identical extractions into fresh output folders
sharing one fresh catfeat cache folder (``CATFEAT_CACHE_DIR``): the first compiles every program,
the second finds them in JAX's persistent compilation cache. Prints both ``build`` seconds from the
summary lines (``build 3.1s (compile cache: hit)``) and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dogs-vs-cats" / "original"


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n")
    p = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["whole", "rerun", "inmemory-child"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--models", default="r50,incv3", help="backbones (default: %(default)s)")
    p.add_argument("--weights", default="none", help="imagenet | none (default: %(default)s)")
    p.add_argument("--limit", type=int, default=160, help="images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="pairs of runs, interleaved (default: %(default)s)")
    p.add_argument("--compare-with", type=Path, default=None, metavar="REPO",
                   help="whole: also time catfeat from another checkout (e.g. the main branch) in every pair")
    p.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument("--tensors", type=Path, help=argparse.SUPPRESS)  # inmemory-child: the decoded photos
    return p.parse_args(argv)


def _env(repo: Path = REPO, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    return env


CPU: dict[str, float] = {}  # CPU seconds (user + system) of the last finished child


def _run(cmd: list[str], env: dict, repo: Path = REPO) -> tuple[float, str]:
    """Run ``cmd`` in ``repo`` (``python -m`` puts the working folder first on the path: that
    checkout's catfeat is the one imported); its wall seconds and stdout."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU["last"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"bench_build: {' '.join(cmd[:4])} ... failed (exit {r.returncode})")
    return wall, r.stdout


def _extract_cmd(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "catfeat.extract", str(args.data), "--models", args.models, "--weights",
            args.weights, "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--out", str(out),
            "--no-progress"]


def inmemory_child(args) -> int:
    """The in-memory process: decoded photos in, the same compiled models over them, nothing written."""
    import numpy as np

    from catfeat.models.forward import Forward
    from catfeat.models.registry import parse_models

    tensors = np.load(args.tensors)
    n = 0
    for spec in parse_models(args.models):
        f = Forward(spec, args.weights if args.weights != "none" else None, 0, "float32", args.batch_size)
        feats = f(tensors[str(spec.input_size)])
        n = len(feats)
        assert np.isfinite(feats).all()
    print(json.dumps({"images": n}))
    return 0


def decode_once(args, path: Path) -> int:
    """Decode and resize the photos as catfeat does, into one .npz per input size (not timed)."""
    import numpy as np

    from catfeat.images.listing import list_images
    from catfeat.images.reader import iter_batches
    from catfeat.models.registry import parse_models

    images = list_images(args.data, args.limit)
    sizes = sorted({s.input_size for s in parse_models(args.models)})
    arrays = {s: [] for s in sizes}
    for b in iter_batches(images.paths(), sizes, 64):
        for s in sizes:
            arrays[s].append(b.images[s])
    np.savez(path, **{str(s): np.concatenate(v) for s, v in arrays.items()})
    return len(images)


def whole(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        n = decode_once(args, work / "tensors.npz")
        print(f"bench_build whole: {n} photos from {args.data}; models {args.models} weights={args.weights} "
              f"batch {args.batch_size}; backend {os.environ.get('KERAS_BACKEND', 'default')}; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
        env = _env(CATFEAT_CACHE_DIR=str(work / "catfeat_cache"))
        pairs = []
        for rep in range(args.repeat):
            out = work / f"features{rep}"
            load0 = os.getloadavg()[0]
            cat_s, stdout = _run(_extract_cmd(args, out), env)
            cat_cpu = CPU["last"]
            summary = next((ln for ln in stdout.splitlines() if "images processed" in ln), "")
            mem_s, _ = _run([sys.executable, os.path.abspath(__file__), "inmemory-child", "--models", args.models,
                             "--weights", args.weights, "--batch-size", str(args.batch_size),
                             "--tensors", str(work / "tensors.npz")], env)
            mem_cpu = CPU["last"]
            shutil.rmtree(out, ignore_errors=True)
            pair = {"catfeat_s": round(cat_s, 2), "inmemory_s": round(mem_s, 2), "ratio": round(mem_s / cat_s, 3),
                    "catfeat_cpu_s": round(cat_cpu, 1), "inmemory_cpu_s": round(mem_cpu, 1),
                    "cpu_ratio": round(mem_cpu / cat_cpu, 3), "load_start": round(load0, 2), "summary": summary}
            if args.compare_with:
                other_repo = args.compare_with.resolve()
                other_s, other = _run(_extract_cmd(args, out), _env(other_repo, CATFEAT_CACHE_DIR=str(
                    work / "catfeat_cache")), other_repo)
                shutil.rmtree(out, ignore_errors=True)
                pair.update(other_s=round(other_s, 2), other_ratio=round(mem_s / other_s, 3),
                            other_cpu_s=round(CPU["last"], 1), other_cpu_ratio=round(mem_cpu / CPU["last"], 3),
                            other_summary=next((ln for ln in other.splitlines() if "images processed" in ln), ""))
            pair["load_end"] = round(os.getloadavg()[0], 2)
            pairs.append(pair)
            also = (f"; {args.compare_with}: {pair['other_s']:.1f} s -> {pair['other_ratio']:.3f}x (CPU "
                    f"{pair['other_cpu_s']:.0f} s -> {pair['other_cpu_ratio']:.3f}x)" if args.compare_with else "")
            print(f"  pair {rep + 1}: catfeat {cat_s:.1f} s, in-memory {mem_s:.1f} s -> {mem_s / cat_s:.3f}x (CPU "
                  f"{cat_cpu:.0f} s vs {mem_cpu:.0f} s -> {pair['cpu_ratio']:.3f}x){also} "
                  f"(load {pair['load_start']:.1f}->{pair['load_end']:.1f})\n    {summary}", flush=True)
            if args.compare_with:
                print(f"    {pair['other_summary']}", flush=True)
        import statistics

        wall, cpu = (statistics.median(p[k] for p in pairs) for k in ("ratio", "cpu_ratio"))
        print(f"catfeat whole process vs the same models on in-memory tensors, median of {len(pairs)} pair(s): "
              f"{wall:.3f}x wall, {cpu:.3f}x CPU seconds (every pair above: a pair is side by side)")
        return {"mode": "whole", "images": n, "pairs": pairs, "median_ratio": wall, "median_cpu_ratio": cpu}
    finally:
        shutil.rmtree(work, ignore_errors=True)


BUILD = re.compile(r"build ([\d.]+)s(?: \(compile cache: ([^)]*)\))?")


def rerun(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        env = _env(CATFEAT_CACHE_DIR=str(work / "catfeat_cache"))  # fresh: the first run compiles everything
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        print(f"bench_build rerun: models {args.models} weights={args.weights}, {args.limit} photos, batch "
              f"{args.batch_size}; backend {os.environ.get('KERAS_BACKEND', 'default')}; {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        runs = []
        for k in (1, 2):
            wall, stdout = _run(_extract_cmd(args, work / f"features{k}"), env)
            summary = next((ln for ln in stdout.splitlines() if "images processed" in ln), "")
            m = BUILD.search(summary)
            runs.append({"build_s": float(m.group(1)), "compile_cache": m.group(2) or "", "process_s": round(wall, 2),
                         "load": round(os.getloadavg()[0], 2), "summary": summary})
            print(f"  run {k}: build {m.group(1)} s (compile cache: {m.group(2) or 'none'}), whole process "
                  f"{wall:.1f} s\n    {summary}", flush=True)
        ratio = runs[1]["build_s"] / runs[0]["build_s"]
        entries = sum(1 for _ in (work / "catfeat_cache" / "jax").iterdir()) if (work / "catfeat_cache" / "jax").is_dir() else 0
        print(f"second build / first build = {ratio:.3f} ({runs[1]['build_s']:.1f} s / {runs[0]['build_s']:.1f} s); "
              f"{entries} files in the compile cache")
        return {"mode": "rerun", "runs": runs, "ratio": round(ratio, 3), "cache_files": entries}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "inmemory-child":
        return inmemory_child(args)
    result = whole(args) if args.mode == "whole" else rerun(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
