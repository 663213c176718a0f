"""UnitExplorer in a real browser: a Voilà dashboard in headless Chromium (see test_browser.py).

A tiny notebook shows the explorer on a briefly trained small_conv on digits; the test picks a
different score in the dropdown and another fraction (typed into the slider's readout), and checks
that the readout and the rendered penalty bars change, and that nothing is clipped (the figure
redrawn per move is fitted to its box). Screenshot: build/screenshots/.
"""
from __future__ import annotations

import re

import nbformat
import pytest

from browser_helpers import (CLIPPED, SCREENSHOTS, launch_browser, missing_requirements,
                             start_voila, stop)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
_why = missing_requirements()
if _why:
    pytest.skip(_why, allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

ROOT = ".prunelab-unit-explorer"
PRUNED = re.compile(r"pruned (\d+)/(\d+) units")
PENALTY = re.compile(r"removed: penalty ([-+0-9.]+)")

SOURCE = """
import torch
import prunelab as pl

torch.set_num_threads(1)
bundle = pl.data.load("digits")
model = pl.models.build("small_conv", bundle, seed=0, padding="same", width=0.5)
pl.train.fit(model, bundle.train, recipe=pl.train.Recipe(epochs=2), progress=False)
pl.widgets.UnitExplorer(model, bundle, batch_size=200)
"""


def penalty_bars(page) -> list | None:
    return page.evaluate(
        f"""() => {{ const p = document.querySelector('{ROOT} .js-plotly-plot');
                    return p && p.data ? Array.from(p.data[0].y) : null; }}""")


def test_unit_explorer_as_voila_dashboard(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SOURCE.strip())]
    path = tmp_path / "units.ipynb"
    nbformat.write(nb, path)
    server = start_voila(path, tmp_path / "voila")
    try:
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            try:
                page.goto(server.url("/"), timeout=600_000)
                readout = page.locator(f"{ROOT} .prunelab-readout").first
                expect(readout).to_contain_text("pruned", timeout=120_000)
                # both figures drawn before the first interaction (a user cannot be faster)
                page.wait_for_function(
                    f"""() => {{ const ps = document.querySelectorAll('{ROOT} .js-plotly-plot');
                                return ps.length === 2 && Array.from(ps).every(
                                    p => p.querySelectorAll('.point path').length > 0); }}""",
                    timeout=60_000)
                text0 = readout.text_content()
                bars0 = penalty_bars(page)
                assert bars0 and len(bars0) == 2, bars0
                # a different score from the dropdown
                page.locator(f"{ROOT} select").nth(1).select_option("rand")
                expect(readout).not_to_have_text(text0, timeout=30_000)
                text1 = readout.text_content()
                # a larger fraction, typed into the slider's readout
                box = page.locator(f"{ROOT} .widget-slider .widget-readout").first
                box.click()
                page.keyboard.press("Control+A")
                page.keyboard.type("0.5")
                page.keyboard.press("Enter")
                expect(readout).not_to_have_text(text1, timeout=30_000)
                text2 = readout.text_content()
                n1, n2 = (int(PRUNED.search(t).group(1)) for t in (text1, text2))
                assert n2 > n1, (text1, text2)
                page.wait_for_function(
                    f"""(before) => {{
                        const p = document.querySelector('{ROOT} .js-plotly-plot');
                        return Array.from(p.data[0].y).some((v, i) => v !== before[i]); }}""",
                    arg=bars0, timeout=10_000)
                assert float(PENALTY.search(text2).group(1)) == pytest.approx(
                    penalty_bars(page)[0], abs=2e-3)
                # the sorted-score bars, as drawn: half of conv1's 16 channels red (pruned)
                page.wait_for_function(
                    f"""() => {{
                        const p = document.querySelectorAll('{ROOT} .js-plotly-plot')[1];
                        const fills = Array.from(p.querySelectorAll('.point path'))
                            .map(e => e.style.fill);
                        return fills.length === 16 &&
                            fills.filter(f => f === 'rgb(228, 87, 86)').length === 8; }}""",
                    timeout=10_000)
                # the new scores figure is fitted to its box (~150 ms: the fit, then plotly's
                # own resize timer) and nothing sticks out of the page or the explorer
                page.wait_for_function(
                    f"""() => Array.from(document.querySelectorAll('{ROOT} .js-plotly-plot'))
                        .every(p => p._fullLayout &&
                               Math.abs(p._fullLayout.width - p.clientWidth) <= 2)""",
                    timeout=10_000)
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "voila_unit_explorer.png"))
                assert page.evaluate(CLIPPED, ROOT) == []
            except Exception:
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "voila_unit_explorer_failed.png"),
                                full_page=True)
                print(server.log_tail())
                raise
            finally:
                browser.close()
    finally:
        stop(server)
