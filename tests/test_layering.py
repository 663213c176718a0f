"""Imports point one way, from higher layers to lower ones (DESIGN.md), and the package is light."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "prunelab"

# DESIGN.md: data < models < train < metrics < zoo < graph < criteria < masks < prune
#            < units, connectivity, collapse, lottery < experiments < plots < figures < widgets
# (figures reuses the frame helpers of plots: the static versions of the same views)
LAYERS = [
    {"paths", "_parametrize", "store"}, {"data"}, {"models"}, {"train"}, {"metrics"}, {"zoo"}, {"graph"},
    {"criteria"}, {"masks"}, {"pruning"}, {"units", "connectivity", "collapse", "lottery", "at_init", "compression"},
    {"structured"}, {"metapruning"}, {"experiments"}, {"plots"}, {"figures"}, {"widgets"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
TORCH_FREE = {"paths", "store", "plots", "figures"}


def module_files():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue
        top = rel.parts[0].removesuffix(".py")
        yield top, path


def imported_prunelab_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "prunelab":
                yield from (a.name for a in node.names)
            elif node.module.startswith("prunelab."):
                yield node.module.split(".")[1]
            elif node.level == 1 and path.parent != PKG:  # relative import inside a subpackage
                continue
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("prunelab."):
                    yield a.name.split(".")[1]


@pytest.mark.parametrize("top,path", list(module_files()), ids=lambda v: str(v))
def test_imports_point_down(top, path):
    assert top in LEVEL, f"{top} is not placed in a layer: add it to LAYERS and DESIGN.md"
    for dep in imported_prunelab_modules(path):
        if dep == top:
            continue
        assert dep in LEVEL, f"{path.name} imports unknown prunelab module {dep}"
        assert LEVEL[dep] < LEVEL[top], f"{top} (layer {LEVEL[top]}) imports {dep} (layer {LEVEL[dep]})"


@pytest.mark.parametrize("name", sorted(TORCH_FREE))
def test_torch_free_modules(name):
    code = f"import sys, prunelab.{name}; assert 'torch' not in sys.modules, 'torch was loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_lazy():
    code = "import sys, prunelab; assert 'torch' not in sys.modules and 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
