"""The `catfeat` command: subcommands, shared flags, `info`, and fixed CLI messages."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def test_fit_on_an_empty_folder_names_the_folder(tmp_path, capsys):
    from catfeat import fit

    assert fit.main(["--features", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "{args.features}" not in err
    assert f"--features {tmp_path}" in err and len(err.strip().splitlines()) == 1


def test_predict_to_stdout_ends_with_a_summary(tmp_path, capsys, monkeypatch):
    from catfeat import predict

    df = pd.DataFrame({"file": ["a.jpg", "b.jpg"], "p_0": [0.1, 0.8], "p_1": [0.9, 0.2], "label": [1, 0]})
    monkeypatch.setattr(predict, "build_predictor", lambda *a, **k: (None, None))
    monkeypatch.setattr(predict, "predict_images", lambda *a, **k: df)
    assert predict.main(["--head", str(tmp_path), "a.jpg", "b.jpg"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "a.jpg" in out[1] and out[-1] == "catfeat.predict: 2 predictions printed"
