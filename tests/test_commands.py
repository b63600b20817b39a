"""The `catfeat` command: subcommands, shared flags, `info`, and fixed CLI messages."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest


def test_fit_on_an_empty_folder_names_the_folder(tmp_path, capsys):
    from catfeat.cli import fit

    assert fit.main(["--features", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "{args.features}" not in err
    assert f"--features {tmp_path}" in err and len(err.strip().splitlines()) == 1


def test_predict_to_stdout_ends_with_a_summary(tmp_path, capsys, monkeypatch):
    from catfeat.cli import predict

    df = pd.DataFrame({"file": ["a.jpg", "b.jpg"], "p_0": [0.1, 0.8], "p_1": [0.9, 0.2], "label": [1, 0]})
    monkeypatch.setattr(predict, "build_predictor", lambda *a, **k: (None, None))
    monkeypatch.setattr(predict, "predict_images", lambda *a, **k: df)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jpg").touch()  # predict refuses names of files that do not exist
    (tmp_path / "b.jpg").touch()
    assert predict.main(["--head", str(tmp_path), "a.jpg", "b.jpg"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "a.jpg" in out[1] and out[-1] == "catfeat.predict: 2 predictions printed"


# -- the catfeat command ------------------------------------------------------------------------------
def test_version_and_help_list_every_command(capsys):
    import catfeat
    from catfeat.cli.main import COMMANDS, main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"catfeat {catfeat.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name}  " in out for name in COMMANDS)
    with pytest.raises(SystemExit) as e:
        main(["fti"])
    assert e.value.code == 2 and "invalid choice: 'fti'" in capsys.readouterr().err


def test_python_dash_m_catfeat():
    import subprocess
    import sys

    import catfeat

    r = subprocess.run([sys.executable, "-m", "catfeat", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"catfeat {catfeat.__version__}"


def test_version_is_the_installed_one():
    from importlib.metadata import version

    import catfeat

    assert version("catfeat") == catfeat.__version__


REQUIRED = {"extract": ["data/"], "predict": ["--head", "h/", "a.jpg"]}


@pytest.mark.parametrize("name", ["extract", "fit", "compare", "outliers", "predict", "info"])
def test_every_command_takes_quiet_and_verbose(name, capsys):
    from catfeat.cli.main import command

    parser, _ = command(name)
    assert parser.prog == f"catfeat {name}"
    args = REQUIRED.get(name, [])
    assert parser.parse_args([*args, "-q"]).quiet and parser.parse_args([*args, "--verbose"]).verbose
    assert not parser.parse_args(args).quiet
    with pytest.raises(SystemExit):
        parser.parse_args([*args, "-q", "-v"])  # one or the other
    assert "not allowed with" in capsys.readouterr().err


def test_one_flag_name_per_idea_old_spellings_still_parse():
    from catfeat.cli import extract, predict

    p = extract.build_parser()
    a = p.parse_args(["data/"])
    assert a.features == "features" and a.weights_seed == 0
    a = p.parse_args(["data/", "--out", "f2", "--seed", "7"])
    assert a.features == "f2" and a.weights_seed == 7
    assert p.parse_args(["data/", "--features", "f3", "--weights-seed", "5"]).features == "f3"
    help_text = p.format_help()
    assert "--features" in help_text and "--weights-seed" in help_text
    assert "--out" not in help_text and "--seed " not in help_text
    p = predict.build_parser()
    assert p.parse_args(["--head", "h", "--csv", "x.csv"]).out == "x.csv"
    assert p.parse_args(["--head", "h", "--out", "y.csv"]).out == "y.csv"
    assert p.parse_args(["--head", "h"]).out is None and "--csv" not in p.format_help()


@pytest.mark.parametrize("name, flag, value, message", [
    ("extract", "--limit", "0", "must be at least 1, got 0"),
    ("extract", "--limit", "-5", "must be at least 1, got -5"),
    ("extract", "--shards", "0", "must be at least 1, got 0"),
    ("extract", "--shard-retries", "-1", "must be at least 0, got -1"),
    ("extract", "--workers", "-2", "must be at least 1, got -2"),
    ("extract", "--batch-size", "0", "must be between 1 and 4,096, got 0"),
    ("predict", "--batch-size", "0", "must be at least 1, got 0"),
    ("fit", "--batch-size", "-8", "must be at least 1, got -8"),
    ("fit", "--epochs", "0", "must be at least 1, got 0"),
    ("compare", "--batch-size", "0", "must be at least 1, got 0"),
    ("outliers", "--top", "0", "must be between 1 and 1,000, got 0"),
    ("outliers", "--show", "-1", "must be at least 0, got -1"),
])
def test_counts_below_their_least_are_one_argparse_error_naming_the_flag(name, flag, value, message, capsys):
    """Zero or negative sizes and counts stop at parsing (exit 2), in one line that names the flag."""
    from catfeat.cli.main import command

    parser, _ = command(name)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*REQUIRED.get(name, []), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: {message}" in err and "Traceback" not in err

# -- catfeat info -------------------------------------------------------------------------------------
def _partial_cache(folder, model="EfficientNetLite2", rows=5, n=20):
    from catfeat.cache.store import FeatureWriter, cache_path

    names = [f"train/{'cat' if i < n // 2 else 'dog'}.{i}.jpg" for i in range(n)]
    attrs = {"backbone": model, "weights": "imagenet", "precision": "float32", "decoder": "opencv",
             "backend": "jax", "classes": '["cat", "dog"]'}
    w = FeatureWriter(cache_path(folder, model), attrs, names, np.array([0] * (n // 2) + [1] * (n - n // 2)),
                      ["train"] * n, 4)
    w.write(0, np.ones(rows, bool), np.ones((rows, 4), np.float32), {})
    w.close()


def test_describe_caches_lists_complete_and_unfinished(tmp_path):
    from conftest import make_caches

    from catfeat.cache.describe import describe_caches

    make_caches(tmp_path, n=40, n_test=6)
    _partial_cache(tmp_path)
    (tmp_path / "gap_EfficientNetLite3.h5").write_bytes(b"not hdf5")
    df = describe_caches(tmp_path).set_index("file")
    assert list(df.index) == ["gap_EfficientNetLite0.h5", "gap_EfficientNetLite1.h5",
                              "gap_EfficientNetLite2.h5.partial", "gap_EfficientNetLite3.h5"]
    lite0 = df.loc["gap_EfficientNetLite0.h5"]
    assert (lite0.status, lite0.backbone, lite0.train, lite0.test, lite0.classes, lite0.skipped) == (
        "complete", "EfficientNetLite0", 40, 6, "cat,dog", 0)
    assert lite0.decoder == "pillow" and lite0.weights == "unknown" and lite0.size_bytes > 0  # no decoder attr
    part = df.loc["gap_EfficientNetLite2.h5.partial"]
    assert (part.status, part.rows_written, part.n_images, part.train, part.decoder, part.backend) == (
        "unfinished", 5, 20, 5, "opencv", "jax")
    bad = df.loc["gap_EfficientNetLite3.h5"]
    assert bad.status == "unreadable" and "not an HDF5 file" in bad.error


def test_info_cli(tmp_path, capsys):
    from conftest import make_caches

    from catfeat.cli.main import main

    make_caches(tmp_path, n=40, n_test=6)
    _partial_cache(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["file", "status", "backbone", "train"]
    assert any("unfinished 5/20 images" in line for line in out)
    assert out[-1].startswith(f"catfeat.info: {tmp_path}: 3 cache files (2 complete, 1 unfinished)")
    assert main(["info", "--features", str(tmp_path), "-q"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("catfeat info: error: no folder") and len(err.splitlines()) == 1


# -- compare, quiet and progress ------------------------------------------------------------------------
FAST = ["--preset", "reference", "--epochs", "3", "--batch-size", "32", "--learning-rate", "0.01"]


def test_compare_command(tmp_path, capsys):
    from conftest import make_caches

    from catfeat.cli.main import main

    make_caches(tmp_path, n=80, n_test=0, test=False)
    rc = main(["compare", "--features", str(tmp_path), "--strategies", "concat", "--out-dir", str(tmp_path / "c"),
               *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and "EfficientNetLite0+EfficientNetLite1" in out and "logreg" in out
    assert out.splitlines()[-1].startswith("catfeat.compare: 4 candidates; ")
    assert "compare: " in err  # the progress bar over the candidate heads
    assert pd.read_csv(tmp_path / "c" / "compare.csv").shape[0] == 4
    rc = main(["compare", "--features", str(tmp_path), "--strategies", "concat", "--no-logreg", "-q", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.splitlines()) == 1 and "3 candidates" in out and err == ""
    assert main(["compare", "--features", str(tmp_path), "--strategies", "mean"]) == 2
    assert "unknown strategy 'mean'" in capsys.readouterr().err


def test_fit_quiet_prints_only_the_summary_and_cv_shows_progress(tmp_path, capsys):
    from conftest import make_caches

    from catfeat.cli import fit

    make_caches(tmp_path, n=60, n_test=0, test=False)
    assert fit.main(["--features", str(tmp_path), "--cv", "3", *FAST]) == 0
    out, err = capsys.readouterr()
    assert "CV folds" in err and "out-of-fold predictions" in out
    assert fit.main(["--features", str(tmp_path), "--cv", "3", "-q", *FAST]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("catfeat.fit: ") and len(out.splitlines()) == 1 and err == ""


def test_describe_caches_is_public(tmp_path):
    import catfeat

    assert catfeat.describe_caches(tmp_path).empty and "describe_caches" in dir(catfeat)


def test_extract_quiet_and_verbose(kaggle_dir, tmp_path, capsys):
    from catfeat.cli.main import main

    out = tmp_path / "f"
    argv = ["extract", str(kaggle_dir), "--models", "lite0", "--weights", "none", "--features", str(out),
            "--batch-size", "4"]
    assert main([*argv, "-q"]) == 0
    printed, err = capsys.readouterr()
    assert len(printed.splitlines()) == 1 and printed.startswith("catfeat.extract: 11 images processed")
    assert "img/s" not in err  # no progress bar
    assert main([*argv, "-v", "--out", str(out)]) == 0  # the hidden alias names the same folder: reused
    printed = capsys.readouterr().out
    assert "reused: EfficientNetLite0" in printed and re.search(r"gap_EfficientNetLite0.h5\s+complete", printed)


def test_compare_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    from conftest import make_caches

    from catfeat.head.comparison import compare
    from catfeat.head.estimator import FusedHead

    matplotlib = pytest.importorskip("matplotlib")
    # switching to Agg silenced every later plt.show() of a notebook that had called compare
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("compare switched the matplotlib backend"))
    make_caches(tmp_path, n=40, test=False)
    compare(None, tmp_path, head=FusedHead(preset="reference", epochs=1), strategies=(), linear=False)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_command_streams(tmp_path, capsys):
    from conftest import make_caches

    from catfeat.cli.main import main

    make_caches(tmp_path, n=80, n_test=0, test=False)
    rc = main(["compare", "--features", str(tmp_path), "--strategies", "concat", "--out-dir", str(tmp_path / "c"),
               "--stream", "--no-logreg", *FAST])
    out, _ = capsys.readouterr()
    assert rc == 0 and "EfficientNetLite0+EfficientNetLite1" in out
    assert pd.read_csv(tmp_path / "c" / "compare.csv").shape[0] == 3
