"""Issue 12's newcomer test: every paper equation of the README's table is implemented by the
function the table names, and that function's docstring cites it (grep the citation, find it)."""
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def table_rows():
    text = README.read_text()
    block = text.split("## Where each equation lives", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `([\w.]+)` \| (.+?) \|$", block, re.M)
    assert len(rows) >= 20, "the README's equation table is missing or short"
    return rows


@pytest.mark.parametrize("equation, target, cite", table_rows(), ids=lambda v: str(v)[:40])
def test_each_equation_has_one_function_that_cites_it(equation, target, cite):
    module, _, name = target.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    assert cite in (fn.__doc__ or ""), f"{target} does not cite {cite!r} ({equation})"
