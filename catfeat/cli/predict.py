"""`catfeat predict --head DIR IMAGES...`: predict image files with a saved head and its backbones."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from catfeat.cli.common import add_alias, add_output_flags, int_in, run_cli
from catfeat.predict import UnrecordedFeaturesWarning, build_predictor, check_new, expand_images, export, predict_images


def build_parser() -> argparse.ArgumentParser:
    """The parser of `catfeat predict`."""
    p = argparse.ArgumentParser(prog="catfeat predict",
                                description="Predict image files with a saved fused head and its backbones.")
    p.add_argument("images", nargs="*", help="image files or URLs (s3://, gs://, file://), folders or folder URLs "
                   "(every image in them), CSV/Parquet manifests (column image)")
    p.add_argument("--head", required=True, help="folder of a saved head (head.json + head.keras)")
    p.add_argument("--features", default="features", help="feature caches, read for the backbones' weights when "
                   "the head folder has no weights.json (default: %(default)s)")
    p.add_argument("--weights", default=None, help="imagenet | none | PATH for every backbone (default: recorded)")
    p.add_argument("--batch-size", type=int_in(1), default=16, help="images per call (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="CSV", help="write the predictions here instead of printing them")
    add_alias(p, "--csv", "out")
    p.add_argument("--export", default=None, metavar="PATH", help="save the end-to-end model: PATH.keras, or a "
                   "SavedModel folder (tensorflow backend)")
    p.add_argument("--force", action="store_true", help="let --export replace an existing file or folder")
    p.add_argument("--allow-random-weights", action="store_true", help="predict even when the head's backbones "
                   "were extracted with random weights (weights none): such predictions carry no ImageNet "
                   "knowledge")
    add_output_flags(p, "accepted for uniformity: no extra output yet")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `catfeat predict` with parsed ``args``; returns the exit code."""
    if not args.images and not args.export:
        raise ValueError("name image files to predict and/or --export PATH")
    from catfeat.images.listing import shown

    if args.export:
        check_new(Path(args.export), args.force)  # before building the model
    files = expand_images(args.images)  # before building the model too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnrecordedFeaturesWarning)
        predictor = build_predictor(args.head, args.weights, args.features, args.allow_random_weights)
    for w in caught:
        if issubclass(w.category, UnrecordedFeaturesWarning):
            print(f"catfeat.predict: warning: {w.message}", file=sys.stderr)
        else:  # not ours: as Python would show it
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    done = []
    if args.images:
        df = predict_images(args.head, files, batch_size=args.batch_size, predictor=predictor)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out, index=False, errors="surrogateescape")  # undecodable names keep their bytes
            done.append(f"{len(df)} predictions to {args.out}")
        else:
            print(df.assign(file=df["file"].map(shown)).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            done.append(f"{len(df)} predictions printed")
    if args.export:
        done.append(export(predictor[0], args.export, overwrite=args.force))
    print("catfeat.predict: " + "; ".join(done))
    return 0


def main(argv=None) -> int:
    """`catfeat predict ARGS`: parse ``argv`` and run; returns the exit code."""
    return run_cli(run, build_parser(), argv)

