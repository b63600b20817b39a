"""Issue 23: the default head trains enough on few rows, and the CLI keeps the backend's start-up chatter quiet."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from conftest import REPO, make_kaggle

# Lines TensorFlow 2.21 writes on stderr when imported, TF_CPP_MIN_LOG_LEVEL=2 notwithstanding.
CHATTER = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard")


def env_without_tf_settings(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


# -- 1. few rows: an epoch of several passes, in memory and streamed alike ---------------------------------
def blobs(n=60, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return (rng.normal(size=(n, d)) + 1.2 * y[:, None]).astype(np.float32), y


def test_few_rows_get_the_step_budget_not_200_steps():
    from catfeat.head.estimator import FusedHead
    from catfeat.head.network import MIN_EPOCH_STEPS

    X, y = blobs(50)
    head = FusedHead(random_state=0, early_stopping=False).fit(X, y)  # 45 rows would be one step an epoch
    p = head.params_
    assert p["batch_size"] == 50 and p["passes_per_epoch"] == MIN_EPOCH_STEPS
    assert p["epochs"] * p["passes_per_epoch"] >= p["max_steps"]  # ~1,200 optimizer steps, not 200
    # explicit epochs keep their meaning: one pass each
    assert FusedHead(random_state=0, epochs=3).fit(X, y).params_["passes_per_epoch"] == 1
    # many rows: one pass an epoch, as measured on the real features
    Xb, yb = blobs(3000, d=2)
    assert FusedHead(random_state=0, epochs="auto", max_steps=16).fit(Xb, yb).params_["passes_per_epoch"] == 1


def test_few_rows_streamed_train_like_in_memory(tmp_path):
    from catfeat.head.estimator import FusedHead
    from catfeat.cache.store import load_features, write_cache
    from catfeat.cache.rows import CacheRows

    X, y = blobs(80, d=7)
    names = [f"train/{'dog' if v else 'cat'}.{i}.jpg" for i, v in enumerate(y)]
    write_cache(tmp_path / "gap_EfficientNetLite0.h5", "EfficientNetLite0", X[:, :4], y, names)
    write_cache(tmp_path / "gap_EfficientNetLite1.h5", "EfficientNetLite1", X[:, 4:], y, names)
    Xm, ym, _ = load_features("lite0,lite1", tmp_path)
    mem = FusedHead(random_state=1).fit(Xm, ym)
    rows = CacheRows.open("lite0,lite1", tmp_path)
    st = FusedHead(random_state=1).fit(rows, rows.labels)
    assert mem.params_["passes_per_epoch"] == st.params_["passes_per_epoch"] > 1
    assert mem.params_["epochs"] == st.params_["epochs"]
    assert np.corrcoef(mem.predict_proba(Xm)[:, 1], st.predict_proba(Xm)[:, 1])[0, 1] > 0.95
    assert st.score(Xm, ym) > 0.8


# -- 2. no backend start-up chatter on the terminal unless -v ---------------------------------------------
def test_cli_keeps_tensorflow_start_up_lines_off_stderr_unless_verbose(tmp_path):
    data = make_kaggle(tmp_path / "data", n_per_class=2, n_test=1)
    cmd = [sys.executable, "-m", "catfeat.extract", str(data), "--models", "lite0", "--weights", "none"]
    env = env_without_tf_settings(KERAS_BACKEND="tensorflow")
    for flag in ("-q", ""):
        out = tmp_path / f"f{flag}"
        proc = subprocess.run(cmd + ["--features", str(out)] + ([flag] if flag else []), env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert (out / "gap_EfficientNetLite0.h5").is_file() and "5 images processed" in proc.stdout
        assert not [c for c in CHATTER if c in proc.stderr], proc.stderr
        if flag == "-q":
            assert proc.stderr == ""
    proc = subprocess.run(cmd + ["--features", str(tmp_path / "fv"), "-v"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "oneDNN custom operations" in proc.stderr  # -v shows them: the assertions above could fail


def test_import_filter_drops_only_the_chatter_and_keeps_real_errors(tmp_path):
    # A stand-in `tensorflow` package that writes like the real one, from C (fd 2) and from Python,
    # then fails: the filter is real, on real file descriptors, in a real process.
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent("""\
        import os, sys
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1796368533.632776   27500 port.cc:153] oneDNN custom operations are on.\\n")
        os.write(2, b"E0000 00:00:1796368533.632776   27500 cuda_dnn.cc:8] Unable to register cuDNN factory\\n")
        print("python warning from the import", file=sys.stderr)
        os.write(2, b"no newline at the end")
        raise ImportError("broken build")
        """))
    script = textwrap.dedent("""\
        import sys
        from catfeat.cli.common import quiet_backend_startup
        with quiet_backend_startup():
            try:
                import tensorflow
            except ImportError as e:
                print(f"caught: {e}", file=sys.stderr)
        print("stderr still works", file=sys.stderr)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=env_without_tf_settings(PYTHONPATH=os.pathsep.join([str(fake.parent), str(REPO)])))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "absl::InitializeLog" not in err and "oneDNN" not in err
    for kept in ("E0000 00:00:1796368533.632776   27500 cuda_dnn.cc:8] Unable to register cuDNN factory",
                 "python warning from the import", "no newline at the end", "caught: broken build",
                 "stderr still works"):
        assert kept in err, err
