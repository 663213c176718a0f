"""Every location prunelab reads or writes on disk. Torch-free.

``ROOT`` is the project checkout when prunelab is installed from one (``pip install -e .``),
else the current directory; ``PRUNELAB_ROOT`` overrides it, ``PRUNELAB_DATA`` moves ``data/``,
``PRUNELAB_RESULTS`` moves the result stores and ``PRUNELAB_FIGURES`` the figures;
``PRUNELAB_SCRATCH_FIGURES`` moves the scratch folder where figures of FAST or partial runs go
(only complete, full-setting runs write ``figures/``).
"""
from __future__ import annotations

import os
from pathlib import Path


def _default_root() -> Path:
    if os.environ.get("PRUNELAB_ROOT"):
        return Path(os.environ["PRUNELAB_ROOT"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists():
        return checkout
    return Path.cwd()


ROOT: Path = _default_root()
DATA: Path = Path(os.environ.get("PRUNELAB_DATA", ROOT / "data")).expanduser()
DATASETS: Path = DATA / "datasets"
ZOO: Path = DATA / "zoo"
RESULTS: Path = Path(os.environ.get("PRUNELAB_RESULTS", DATA / "results")).expanduser()
FIGURES: Path = Path(os.environ.get("PRUNELAB_FIGURES", ROOT / "figures")).expanduser()
# Figures of FAST (PRUNELAB_FAST=1) or interrupted runs: never mixed with the paper's figures.
SCRATCH_FIGURES: Path = Path(os.environ.get("PRUNELAB_SCRATCH_FIGURES",
                                            ROOT / "build" / "scratch_figures")).expanduser()

# Where Debian's dataset packages put their files (e.g. dataset-fashion-mnist).
SYSTEM_DATASETS: Path = Path("/usr/share/datasets")

__all__ = ["ROOT", "DATA", "DATASETS", "ZOO", "RESULTS", "FIGURES", "SCRATCH_FIGURES",
           "SYSTEM_DATASETS"]


def __dir__():
    return sorted(__all__)
