"""Display helpers: short reprs and HTML summaries that stay plain values underneath."""
import copy
import json
import math
import pickle

import pandas as pd

from prunelab import results as R


def test_summary_is_a_dict_with_a_short_repr():
    s = R.Summary({"loss": 0.123456, "accuracy": 0.5, "n": 3, "ok": True}, title="Eval")
    assert s == {"loss": 0.123456, "accuracy": 0.5, "n": 3, "ok": True} and dict(s) == s
    assert repr(s) == "Eval(loss=0.1235, accuracy=0.5, n=3, ok=True)"
    for again in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.copy(s)):
        assert again == s and repr(again) == repr(s)
    assert json.loads(json.dumps(s)) == s
    assert pd.DataFrame([s]).columns.tolist() == ["loss", "accuracy", "n", "ok"]


def test_fmt_and_preformatted_text():
    assert [R.fmt(v) for v in (1, 2.0, 1 / 3, math.nan, math.inf, "qm", None)] == \
        ["1", "2", "0.3333", "nan", "inf", "'qm'", "None"]
    assert R.short_repr("X", {"loss": R.text("1 → 2"), "c": "qm"}) == "X(loss=1 → 2, c='qm')"


def test_html_summary_escapes_and_shows_the_table_head_and_tail():
    table = pd.DataFrame({"stage": range(1, 51), "loss": [0.5] * 50})
    html = R.html_summary("<T>", {"a<b": R.text("x & y")}, table, "history", max_rows=10)
    assert "&lt;T&gt;" in html and "a&lt;b" in html and "x &amp; y" in html
    assert "<em>history</em>" in html and html.count("<tr>") == 1 + 10 + 1  # 5 head, …, 5 tail
    assert "<th>0</th>" in html and "<th>49</th>" in html and "<th>25</th>" not in html
