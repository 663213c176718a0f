"""Notebooks: jupytext percent sources paired with clean .ipynb files, run headless by papermill
with their FAST parameter."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_fast(path, tmp_path, monkeypatch):
    import nbformat
    import papermill

    monkeypatch.setenv("PRUNELAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PRUNELAB_SCRATCH_FIGURES", str(tmp_path / "scratch"))
    monkeypatch.setenv("PRUNELAB_RESULTS", str(tmp_path / "results"))
    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters={"FAST": 1},
                               cwd=str(path.parent), kernel_name="python3",
                               progress_bar=False, execution_timeout=600)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    written = list((tmp_path / "figures").glob("*.png")) + list(
        (tmp_path / "scratch").glob("*.png"))
    assert written, "the notebook drew no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_clean(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, path.name
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "no parameters cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_and_its_jupytext_source_are_in_sync(path):
    """Edit either (JupyterLab or the .py) and run `jupytext --sync notebooks/*.py`."""
    import jupytext
    import nbformat

    source = path.with_suffix(".py")
    assert source.exists(), f"{path.name} has no paired jupytext source {source.name}"
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    py = jupytext.read(source)
    cells = [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert cells == [(c.cell_type, c.source.strip()) for c in py.cells], (
        f"{path.name} and {source.name} differ: run `jupytext --sync {source}`")
