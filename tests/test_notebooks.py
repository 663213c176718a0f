"""Every notebook runs headless top to bottom with its FAST parameter (nbclient)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_fast(path, tmp_path, monkeypatch):
    import nbformat
    from run_notebooks import run

    monkeypatch.setenv("PRUNELAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PRUNELAB_RESULTS", str(tmp_path / "results"))
    out = run(path, {"FAST": 1}, tmp_path, timeout=600)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert list((tmp_path / "figures").glob("*.png")), "the notebook wrote no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_clean(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, path.name
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "no parameters cell"
