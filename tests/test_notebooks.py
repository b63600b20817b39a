"""Execute every notebook in notebooks/ on a few real photos, so the walkthroughs never rot."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, real_data

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # one folder for all notebooks: the feature caches of the first are reused by the others
    return tmp_path_factory.mktemp("notebooks")


def test_there_are_three_walkthroughs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_outliers_and_cam.ipynb",
                                           "03_learning_curves.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, workdir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    data = real_data("small200").parent
    monkeypatch.setenv("CATFEAT_NB_LIMIT", os.environ.get("CATFEAT_NB_TEST_LIMIT", "40"))
    monkeypatch.setenv("CATFEAT_DATA", str(data))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the python3 kernel runs `python`: make it this interpreter (the venv with catfeat)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    nb = nbformat.read(path, as_version=4)
    assert any(c.cell_type == "code" and c.get("outputs") for c in nb.cells), f"{path.name} is committed unexecuted"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (workdir / "results").is_dir()
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if {"image/png", "image/jpeg"} & set(o.get("data", {}))]
    assert pictures
