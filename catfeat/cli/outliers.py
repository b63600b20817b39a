"""`catfeat outliers`: flag training images that look like neither class to ImageNet classifiers."""
from __future__ import annotations

import argparse
from pathlib import Path

from catfeat.cli.common import add_output_flags, int_in, run_cli
from catfeat.outliers import find_outliers, save_contact_sheet


def build_parser() -> argparse.ArgumentParser:
    """The parser of `catfeat outliers`."""
    p = argparse.ArgumentParser(
        prog="catfeat outliers",
        description="Flag training images whose top-N ImageNet classes (from the cached features times each "
                    "backbone's classifier) hold no cat or dog class, voting across backbones.")
    p.add_argument("--features", default="features", help="folder of gap_<Model>.h5 caches (default: %(default)s)")
    p.add_argument("--models", default=None, help="comma-separated backbones (default: every complete cache)")
    p.add_argument("--top", type=int_in(1, 1000), default=30, help="an image is an animal for a backbone when a cat or dog "
                   "class is among its top N (default: %(default)s)")
    p.add_argument("--min-votes", type=int_in(1), default=None, help="votes needed to flag (default: a majority)")
    p.add_argument("--weights", default=None, help="weights of the classifier (default: those of the cache)")
    p.add_argument("--out", default="outliers.csv", help="ranked CSV of every image (default: %(default)s)")
    p.add_argument("--sheet", default=None, metavar="PNG", help="contact sheet of the flagged images")
    p.add_argument("--show", type=int_in(0), default=20, help="flagged rows to print (default: %(default)s)")
    p.add_argument("--allow-random-weights", action="store_true", help="run even when the caches (or --weights) "
                   "are random weights (weights none): their ImageNet classes mean nothing")
    add_output_flags(p, "print every flagged row, not only --show of them")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `catfeat outliers` with parsed ``args``; returns the exit code."""
    from catfeat.cache.store import find_cache

    df = find_outliers(args.models, args.features, args.top, args.min_votes, weights=args.weights,
                       allow_random=args.allow_random_weights)
    flagged = df[df["flagged"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False, errors="surrogateescape")
    if len(flagged) and not args.quiet:
        from catfeat.images.listing import shown as show_name

        rows = flagged if args.verbose else flagged.head(args.show)
        print(rows[["file", "label", "votes", "p_animal", "top_classes"]].assign(
              file=lambda d: d["file"].map(show_name)).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    written = [str(out)]
    if args.sheet and len(flagged):
        root = find_cache(df.attrs["models"][0], args.features).attrs.get("data_root")
        if not root:
            raise ValueError("the cache records no data_root; re-extract to draw the contact sheet")
        caps = [f"{Path(f).name} v{v}" for f, v in zip(flagged["file"], flagged["votes"])]
        written.append(str(save_contact_sheet(flagged["file"], root, args.sheet, captions=caps)))
    print(f"catfeat.outliers: {len(flagged)} of {len(df)} images flagged ({len(flagged) / max(len(df), 1):.1%}) "
          f"by >= {df.attrs['min_votes']} of {len(df.attrs['models'])} backbones ({', '.join(df.attrs['models'])}), "
          f"top {args.top}; wrote {', '.join(written)}")
    return 0


def main(argv=None) -> int:
    """`catfeat outliers ARGS`: parse ``argv`` and run; returns the exit code."""
    return run_cli(run, build_parser(), argv)

