"""Execute notebooks headless (nbclient), papermill-style parameters, outputs kept out of git.

    python tools/run_notebooks.py notebooks/00_tour.ipynb [-p FAST 1] [--out build/notebooks]

A cell tagged ``parameters`` holds the defaults; ``-p NAME VALUE`` adds a cell after it that
overrides them (VALUE is a Python literal). The executed copy goes to ``--out``; the notebook in
``notebooks/`` is never written, so it stays committed without outputs.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def inject(nb, params: dict) -> None:
    """Insert a cell assigning ``params`` right after the ``parameters`` cell (or at the top)."""
    if not params:
        return
    src = "# injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    idx = next((i + 1 for i, c in enumerate(nb.cells)
                if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    nb.cells.insert(idx, cell)


def run(path: Path, params: dict, out_dir: Path, timeout: int = 7200) -> Path:
    """Execute one notebook with ``params``; returns the path of the executed copy."""
    nb = nbformat.read(path, as_version=4)
    inject(nb, params)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    client.execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    nbformat.write(nb, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--out", type=Path, default=Path("build/notebooks"))
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = ap.parse_args(argv)
    params = {}
    for name, value in args.p:
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value
    for nb in args.notebooks:
        t0 = time.perf_counter()
        out = run(nb, params, args.out, args.timeout)
        print(f"executed {nb} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
