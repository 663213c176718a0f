"""Tab completion shows the API only: every public module lists it in ``__all__`` and its
``dir()`` is exactly that (no ``copy``, ``torch``, ``G`` ...); every listed name exists."""
import importlib

import pytest

# The modules given __all__ + __dir__ so far (the others follow as they are edited).
MODULES = sorted(__import__("prunelab")._SUBMODULES)  # every public module, a new one too


@pytest.mark.parametrize("name", MODULES)
def test_dir_is_the_api(name):
    module = importlib.import_module(f"prunelab.{name}")
    api = module.__all__
    assert len(api) == len(set(api)), f"duplicates in {name}.__all__"
    assert dir(module) == sorted(api)
    missing = [n for n in api if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what {name} lacks: {missing}"
    assert not any(n.startswith("_") for n in api)


def test_masks_completion_hides_imports():
    import prunelab as pl

    shown = dir(pl.masks)
    assert not {"copy", "G", "math", "os", "pd", "torch"} & set(shown)
    assert {"apply", "current", "density", "sparsity"} <= set(shown)
