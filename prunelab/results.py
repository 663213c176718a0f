"""How results show themselves in Jupyter: short reprs and small HTML summaries. Torch-free.

A result is a plain value first (a dict, a dataclass, a DataFrame) so code keeps working on it;
these helpers only add the ``__repr__`` and ``_repr_html_`` that Jupyter calls.
"""
from __future__ import annotations

import html
import math
import numbers
from collections.abc import Mapping

__all__ = ["Summary", "fmt", "text", "short_repr", "html_summary"]


def __dir__():
    return sorted(__all__)


def fmt(value) -> str:
    """A value for a repr: floats to 4 significant digits, strings quoted, others as ``repr``."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        return repr(v) if not math.isfinite(v) else f"{v:.4g}"
    return repr(value)


def short_repr(name: str, fields: Mapping[str, object]) -> str:
    """``name(key=value, ...)`` on one line, values through :func:`fmt` (strings kept as
    written when they are already formatted, e.g. ``"0.31 → 0.85"``)."""
    parts = [f"{k}={_shown(v)}" for k, v in fields.items()]
    return f"{name}({', '.join(parts)})"


class _Text(str):
    """A pre-formatted repr value (shown without quotes)."""


def _shown(value) -> str:
    return str.__str__(value) if isinstance(value, _Text) else fmt(value)


def html_summary(title: str, fields: Mapping[str, object], table=None,
                 table_title: str | None = None, max_rows: int = 20) -> str:
    """A small HTML block: ``title``, a two-column table of ``fields`` and, if given, a
    DataFrame ``table`` (at most ``max_rows`` rows shown, head and tail)."""
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
        f"<td style='text-align:left'>{html.escape(_shown(v))}"
        f"</td></tr>" for k, v in fields.items())
    out = f"<div><strong>{html.escape(title)}</strong><table>{rows}</table>"
    if table is not None:
        if table_title:
            out += f"<div><em>{html.escape(table_title)}</em></div>"
        out += table.to_html(max_rows=max_rows, float_format=lambda v: f"{v:.4g}", border=0)
    return out + "</div>"


def text(value: str) -> _Text:
    """Mark ``value`` as pre-formatted for :func:`short_repr` / :func:`html_summary`."""
    return _Text(value)


class Summary(dict):
    """A dict of named numbers that renders: a short repr and an HTML table in Jupyter.

    It *is* a dict (``s["loss"]``, ``dict(s)``, ``s == {...}``, ``json.dumps(s)`` all work as
    before); only the display changes. ``title`` names it in the display.
    """

    def __init__(self, *args, title: str = "Summary", **kwargs):
        super().__init__(*args, **kwargs)
        self.title = title

    def __repr__(self) -> str:
        return short_repr(self.title, self)

    def _repr_html_(self) -> str:
        return html_summary(self.title, self)

    def __reduce__(self):  # pickle/copy keep the title
        return (_summary, (self.title, dict(self)))


def _summary(title: str, values: dict) -> Summary:
    return Summary(values, title=title)
