"""Extraction benchmark: the reference recipe vs catfeat vs the compute ceiling, same images, same backbones.

    python benchmarks/bench_extract.py --models lite0 --limit 400          # ImageNet weights (offline)
    python benchmarks/bench_extract.py --models lite0 --limit 1600
    python benchmarks/bench_extract.py --models r50,incv3 --weights none --limit 160

Three methods, each in its own subprocess (so its peak resident memory is its own):
  reference  what the seed write-up does: for each backbone separately, read + resize every image into
             one in-memory float32 array (Pillow, one thread), preprocess_input on the host,
             model.predict on a float-input Keras model, features saved with h5py;
  catfeat    catfeat.run_extraction with all backbones in one pass (decode thread pool, compiled
             uint8 -> GAP call per backbone, HDF5 caches), into a fresh temporary folder;
  ceiling    the same compiled models (catfeat.models.forward.Forward) over uint8 tensors decoded and resized
             beforehand and already in memory: no file I/O, no decode, no write.

Timing: model build and the first compiled call (tracing/compilation, on one batch of zeros) are
excluded for all three methods alike ("build+warm-up" column). For catfeat the warm-up call is made
inside Forward's construction by a benchmark-side subclass, so run_extraction's "build" stage holds
it; catfeat's timed seconds are run_extraction's total minus that stage (image listing, cache
writing and closing stay in). img/s = images / timed seconds, every image through every backbone.
Framework imports happen before timing in every method. With --repeat N the methods run N times,
interleaved, and the table shows each method's fastest run (all runs are in the JSON). Peak RSS is
the subprocess's ru_maxrss; "growth" is peak minus the RSS right after build+warm-up.
"CPU cores busy" = process CPU seconds / timed wall seconds (2.0 = both cores of a 2-core machine);
"CPU ms/img" = process CPU per image, which other load on the machine disturbs less than wall time.
The table is printed and saved as JSON and CSV under --out-dir; the features of the three methods
are compared (max relative difference) to show they computed the same thing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats" / "original"
METHODS = ("reference", "catfeat", "ceiling")


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n")
    p = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--models", default="lite0",
                   help="backbones, comma-separated (default: %(default)s; e.g. r50,incv3 with --weights none)")
    p.add_argument("--weights", default="imagenet", help="imagenet | none (default: %(default)s)")
    p.add_argument("--limit", type=int, default=400, help="images (per split, class-balanced; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--precision", default="float32", help="float32 | mixed | mixed_bfloat16 ... (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="catfeat decode threads (default: catfeat's own, every core)")
    p.add_argument("--methods", default=",".join(METHODS), help="which to run (default: %(default)s)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="catfeat's engine (default: %(default)s); with ray, the actors' model builds are "
                        "excluded like the local build, Ray's start-up (connect, actor spawn) counts; the "
                        "figure after the whole start-up is printed too")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every method this many times, interleaved, and report each one's fastest run "
                        "(use on a shared machine; default: %(default)s)")
    p.add_argument("--tf-threads", default=None, metavar="INTRA,INTER",
                   help="TensorFlow intra-/inter-op thread counts for catfeat's run; the reference and the "
                        "ceiling keep TF's defaults (default: TF's own)")
    p.add_argument("--check-precision", action="store_true",
                   help="also compare features with --precision mixed_bfloat16 against float32 "
                        "(compiled models, first 2 batches) and report the relative error")
    p.add_argument("--out-dir", type=Path, default=Path("bench_extract_results"),
                   help="where the JSON and CSV go (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (caches, features)")
    # internal: run one method in this process and write its result as JSON
    p.add_argument("--method", choices=METHODS + ("precision",), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- children

def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _setup_tf(args) -> None:
    if args.tf_threads and args.method == "catfeat":  # the other methods keep TF's defaults
        import tensorflow as tf

        intra, inter = (int(v) for v in args.tf_threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)


def _host_preprocess(spec, x):
    """The recipe's host-side preprocess_input (keras.applications) on a float32 array."""
    if spec.keras_preprocess:
        from catfeat.models.registry import _import

        return _import(spec.keras_preprocess)(x)
    if spec.preprocessing == "lite":
        return (x - 127.0) / 128.0
    raise ValueError(f"no host preprocessing for {spec.name}")


def run_reference(args, images, specs) -> dict:
    import h5py
    import numpy as np
    from PIL import Image

    from catfeat.models.registry import build_backbone
    from catfeat.models.weights import normalize_weights
    from catfeat.models.forward import dtype_policy, resolve_precision

    w = normalize_weights(args.weights)
    t = time.perf_counter()
    models = {}
    for spec in specs:
        with dtype_policy(resolve_precision(args.precision)):
            models[spec.name] = build_backbone(spec, weights=w)
        s = spec.input_size
        models[spec.name].predict(np.zeros((args.batch_size, s, s, 3), np.float32), batch_size=args.batch_size,
                                  verbose=0)
    build = time.perf_counter() - t
    rss0 = _rss_mb()
    paths = images.paths()
    feats = {}
    t0, c0 = time.perf_counter(), _cpu()
    stages = {"decode": 0.0, "model": 0.0, "write": 0.0}
    for spec in specs:  # the recipe: one backbone at a time, every image read again for each
        s = spec.input_size
        t = time.perf_counter()
        x = np.array([np.asarray(Image.open(p).convert("RGB").resize((s, s), Image.BILINEAR)) for p in paths],
                     dtype=np.float32)
        x = _host_preprocess(spec, x)
        stages["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        f = np.asarray(models[spec.name].predict(x, batch_size=args.batch_size, verbose=0), np.float32)
        stages["model"] += time.perf_counter() - t
        stages[f"model:{spec.name}"] = time.perf_counter() - t
        del x
        t = time.perf_counter()
        with h5py.File(args.work / f"reference_{spec.name}.h5", "w") as h:
            h["features"] = f
        stages["write"] += time.perf_counter() - t
        feats[spec.name] = f
    secs = time.perf_counter() - t0
    cpu = _cpu() - c0
    np.savez(args.work / "feats_reference.npz", **feats)
    return {"seconds": secs, "build_warmup": build, "cpu": cpu, "rss_after_build_mb": rss0, "stages": stages}


def run_catfeat(args, images, specs) -> dict:
    import numpy as np

    import catfeat.models.forward as rt
    from catfeat.extraction.run import run_extraction
    from catfeat.cache.store import open_cache

    warm: dict[str, float] = {}
    rss: dict[str, float] = {}

    class WarmForward(rt.Forward):  # the first compiled call happens at build time, as in the other methods
        def __init__(self, spec, *a, **k):
            super().__init__(spec, *a, **k)
            t = time.perf_counter()
            self(np.zeros((self.batch_size, spec.input_size, spec.input_size, 3), np.uint8))
            warm[spec.name] = time.perf_counter() - t
            rss["after_build"] = _rss_mb()

    rt.Forward = WarmForward
    # Framework imports happen before timing in every method (run_extraction would import Keras,
    # TensorFlow, h5py and tqdm on its first call otherwise: 4-8 s here, a one-time cost).
    import h5py  # noqa: F401
    import keras
    import tqdm.auto  # noqa: F401

    keras.backend.backend()
    out = Path(tempfile.mkdtemp(prefix="catfeat_", dir=args.work))  # fresh: never a reused cache
    c0 = _cpu()
    report = run_extraction(args.data, [s.name for s in specs], out, weights=args.weights,
                            batch_size=args.batch_size, limit=args.limit, force=True, precision=args.precision,
                            workers=args.workers, progress=False, engine=args.engine)
    cpu = _cpu() - c0
    build = report.seconds.get("build", 0.0)
    secs = report.seconds["total"] - build
    np.savez(args.work / "feats_catfeat.npz",
             **{name: open_cache(path).features("train") for name, path in report.paths.items()})
    if report.reused or report.processed != len(images):
        raise RuntimeError(f"catfeat did not process every image: {report.summary()}")
    shutil.rmtree(out, ignore_errors=True)
    stages = {k: v for k, v in report.seconds.items() if k not in ("total", "build")}
    stages["model"] = sum(v for k, v in stages.items() if k.startswith("model:"))
    return {"seconds": secs, "build_warmup": build, "warmup": warm, "cpu": cpu,
            "rss_after_build_mb": rss.get("after_build"), "stages": stages, "processed": report.processed,
            "skipped": len(report.skipped), "workers": args.workers or os.cpu_count() or 1,
            "summary": report.summary()}


def _decode_all(images, sizes):
    import numpy as np

    from catfeat.images.reader import iter_batches

    arrays = {s: [] for s in sizes}
    for b in iter_batches(images.paths(), sizes, 64):
        for s in sizes:
            arrays[s].append(b.images[s])
    return {s: np.concatenate(v) for s, v in arrays.items()}


def run_ceiling(args, images, specs) -> dict:
    import numpy as np

    from catfeat.models.weights import normalize_weights
    from catfeat.models.forward import Forward

    x = _decode_all(images, sorted({s.input_size for s in specs}))  # not timed: the ceiling has no decode
    w = normalize_weights(args.weights)
    t = time.perf_counter()
    forwards = {}
    for spec in specs:
        forwards[spec.name] = f = Forward(spec, w, 0, args.precision, args.batch_size)
        f(np.zeros((args.batch_size, spec.input_size, spec.input_size, 3), np.uint8))
    build = time.perf_counter() - t
    rss0 = _rss_mb()
    feats, stages = {}, {}
    t0, c0 = time.perf_counter(), _cpu()
    for spec in specs:
        t = time.perf_counter()
        feats[spec.name] = forwards[spec.name](x[spec.input_size])
        stages[f"model:{spec.name}"] = time.perf_counter() - t
    secs = time.perf_counter() - t0
    cpu = _cpu() - c0
    stages["model"] = secs
    np.savez(args.work / "feats_ceiling.npz", **feats)
    return {"seconds": secs, "build_warmup": build, "cpu": cpu, "rss_after_build_mb": rss0, "stages": stages}


def run_precision(args, images, specs) -> dict:
    import numpy as np

    from catfeat.models.weights import normalize_weights
    from catfeat.images.listing import list_images
    from catfeat.models.forward import Forward

    n = min(len(images), 2 * args.batch_size)
    sub = list_images(args.data, n)
    x = _decode_all(sub, sorted({s.input_size for s in specs}))
    w = normalize_weights(args.weights)
    out = {}
    for spec in specs:
        ref = Forward(spec, w, 0, "float32", args.batch_size)(x[spec.input_size])
        t = time.perf_counter()
        low = Forward(spec, w, 0, "mixed_bfloat16", args.batch_size)(x[spec.input_size])
        rel_rows = np.linalg.norm(low - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        out[spec.name] = {"images": int(len(ref)),
                          "rel_error": float(np.linalg.norm(low - ref) / np.linalg.norm(ref)),
                          "max_row_rel_error": float(rel_rows.max()),
                          "cosine_min": float(np.min(np.sum(low * ref, 1) / (np.linalg.norm(low, axis=1)
                                                                             * np.linalg.norm(ref, axis=1)))),
                          "seconds_mixed_incl_build": time.perf_counter() - t}
    return {"precision": out}


def child(args) -> int:
    _setup_tf(args)
    import keras  # imported before any timer in every method, so "build+warm-up" compares alike

    keras.backend.backend()
    from catfeat.models.registry import parse_models
    from catfeat.images.listing import list_images

    specs = parse_models(args.models)
    images = list_images(args.data, args.limit)
    load0 = os.getloadavg()
    fn = {"reference": run_reference, "catfeat": run_catfeat, "ceiling": run_ceiling,
          "precision": run_precision}[args.method]
    result = fn(args, images, specs)
    result.update(method=args.method, images=len(images), peak_rss_mb=_peak_mb(),
                  loadavg_start=load0, loadavg_end=os.getloadavg())
    (args.work / f"result_{args.method}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


# ------------------------------------------------------------------------------------------- parent

def _spawn(args, method: str, work: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--work", str(work),
           "--data", str(args.data), "--models", args.models, "--weights", args.weights,
           "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--precision", args.precision,
           "--engine", args.engine]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.tf_threads:
        cmd += ["--tf-threads", args.tf_threads]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench_extract: method {method} failed (exit {proc.returncode})")
    result = json.loads((work / f"result_{method}.json").read_text())
    result["process_wall"] = time.perf_counter() - t
    return result


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _max_rel_diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(("" if r.get(k) is None else format(r[k], f)) for k, _, f in cols) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.method:
        return child(args)
    import numpy as np

    from catfeat.models.registry import parse_models
    from catfeat.images.listing import list_images

    specs = parse_models(args.models)
    n = len(list_images(args.data, args.limit))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"bench_extract: unknown method {m!r}; known: {', '.join(METHODS)}")
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    env = {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
           "python": platform.python_version(), "keras": _version("keras"),
           "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
           "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"), "loadavg_start": os.getloadavg()}
    print(f"bench_extract: {n} images from {args.data}; models {','.join(s.name for s in specs)} "
          f"weights={args.weights} batch={args.batch_size} precision={args.precision} workers={args.workers or 'default'}"
          f" tf_threads={args.tf_threads or 'default'}; {env['cores']} cores, Keras {env['keras']} "
          f"({env['backend']}), TF {env['tensorflow']}; load average {env['loadavg_start'][0]:.2f}", flush=True)
    results: dict[str, dict] = {}
    runs: dict[str, list] = {m: [] for m in methods}
    try:
        for rep in range(args.repeat):  # interleaved, so that a burst of other load hits every method alike
            for m in methods:
                r = _spawn(args, m, work)
                runs[m].append(r)
                if m not in results or r["seconds"] < results[m]["seconds"]:
                    results[m] = r
                print(f"  {m:9s} {r['images'] / r['seconds']:7.1f} img/s  {r['seconds']:7.1f} s timed, "
                      f"build+warm-up {r['build_warmup']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"load {r['loadavg_start'][0]:.2f}->{r['loadavg_end'][0]:.2f}", flush=True)
        for m, rs in runs.items():
            results[m]["all_img_s"] = [x["images"] / x["seconds"] for x in rs]
        precision = _spawn(args, "precision", work)["precision"] if args.check_precision else None
        feats = {m: dict(np.load(work / f"feats_{m}.npz")) for m in results}
        base = "ceiling" if "ceiling" in feats else next(iter(feats), None)
        agreement = {m: {k: _max_rel_diff(v[k], feats[base][k]) for k in v if k in feats[base]}
                     for m, v in feats.items() if m != base}
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for m, r in results.items():
        row = {"method": m, "images": r["images"], "seconds": r["seconds"], "img_s": r["images"] / r["seconds"],
               "build_warmup_s": r["build_warmup"], "peak_rss_mb": r["peak_rss_mb"],
               "rss_growth_mb": r["peak_rss_mb"] - (r.get("rss_after_build_mb") or 0.0),
               "cpu_util": r["cpu"] / r["seconds"], "cpu_ms_img": 1000 * r["cpu"] / r["images"], "load_end": r["loadavg_end"][0],
               "runs_img_s": " / ".join(f"{v:.1f}" for v in r["all_img_s"])}
        for other in ("reference", "ceiling"):
            if other in results and other != m:
                row[f"vs_{other}"] = row["img_s"] / (results[other]["images"] / results[other]["seconds"])
        rows.append(row)
    cols = [("method", "method", ""), ("images", "images", "d"), ("seconds", "timed s", ".1f"),
            ("img_s", "img/s (all backbones)", ".1f"), ("vs_reference", "x reference", ".2f"),
            ("vs_ceiling", "x ceiling", ".3f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("rss_growth_mb", "RSS growth MB", ".0f"), ("cpu_util", "CPU cores busy", ".2f"),
            ("cpu_ms_img", "CPU ms/img", ".0f"),
            ("build_warmup_s", "build+warm-up s (excl.)", ".1f")]
    if args.repeat > 1:
        cols.append(("runs_img_s", "img/s of each run", ""))
    print()
    print(_fmt_table(rows, cols))

    stage_rows = []
    for m, r in results.items():
        st = r["stages"]
        row = {"method": m, **{k: v for k, v in st.items()}}
        stage_rows.append(row)
    stage_keys = ["decode", "resize", "wait", "model", *[f"model:{s.name}" for s in specs], "write"]
    stage_cols = [("method", "method", "")] + [(k, k + " s", ".2f") for k in stage_keys]
    print()
    print("Per-stage seconds (catfeat: decode and resize summed over its threads; wait = main thread waiting for a "
          "decoded batch):")
    print(_fmt_table(stage_rows, stage_cols))
    if "catfeat" in results and "ceiling" in results:
        cm, xm = results["catfeat"]["stages"]["model"], results["ceiling"]["stages"]["model"]
        print(f"\ncatfeat model stage vs ceiling: {cm:.2f} s vs {xm:.2f} s ({cm / xm:.3f}x: slowdown of the "
              f"model from sharing the cores with decoding)")
    if "catfeat" in results and "ceiling" in results and "startup" in results["catfeat"]["stages"]:
        r, ceil = results["catfeat"], results["ceiling"]["images"] / results["ceiling"]["seconds"]
        up = r["stages"]["startup"]
        after = r["images"] / (r["seconds"] + r["build_warmup"] - up)
        print(f"Ray after its start-up ({up:.1f} s: connect, Ray Data start, first actor spawned, built and "
              f"compiled): {after:.1f} img/s = {after / ceil:.3f}x the ceiling")
    if agreement:
        print(f"features vs {base}: " + "; ".join(f"{m} max rel diff " + ", ".join(f"{k} {v:.1e}" for k, v in d.items())
                                                 for m, d in agreement.items()))
    if precision:
        print("mixed_bfloat16 vs float32: " + "; ".join(
            f"{k}: rel error {v['rel_error']:.2e} (worst image {v['max_row_rel_error']:.2e}, min cosine "
            f"{v['cosine_min']:.5f}, {v['images']} images)" for k, v in precision.items()))
    env["loadavg_end"] = os.getloadavg()
    print(f"\nload average {env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end "
          f"(1-minute; other work on this {env['cores']}-core machine slows every method)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{'-'.join(s.name for s in specs)}_{args.weights}_{n}_{args.precision}"
    if args.workers:
        tag += f"_w{args.workers}"
    if args.tf_threads:
        tag += f"_tf{args.tf_threads.replace(',', '-')}"
    payload = {"args": {k: str(v) for k, v in vars(args).items() if k not in ("method", "work")}, "env": env,
               "rows": rows, "results": results, "feature_agreement": agreement, "precision_check": precision}
    (args.out_dir / f"bench_extract_{tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    with open(args.out_dir / f"bench_extract_{tag}.csv", "w", newline="") as f:
        keys = [c[0] for c in cols] + ["load_end"] + [f"stage:{k}" for k in stage_keys]
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        for row in rows:
            st = results[row["method"]]["stages"]
            wr.writerow({**row, **{f"stage:{k}": st.get(k) for k in stage_keys}})
    print(f"saved {args.out_dir / f'bench_extract_{tag}.json'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
