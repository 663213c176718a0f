"""What a user sees in a real browser: the explorer in JupyterLab and as a Voilà dashboard.

JupyterLab and Voilà serve on 127.0.0.1 (free port, random token, isolated settings); Debian's
Chromium runs headless under Python Playwright. Each test opens the notebook, waits for the
explorer, moves the sparsity slider as a user would (typing into its readout), checks that the
shown accuracy and the rendered bars changed, and saves a screenshot to build/screenshots/.

The notebook is ``PRUNELAB_E2E_NOTEBOOK`` if set, else notebooks/01_loss_modelling.ipynb if it
exists (run with PRUNELAB_FAST=1), else a tiny notebook showing the explorer on the pretrained MLP.
"""
from __future__ import annotations

import re

import pytest

from browser_helpers import (NOTEBOOK_PROGRESS, SCREENSHOTS, launch_browser,
                             missing_requirements, notebook_under_test, plot_y, start_lab,
                             start_voila, stop)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
_why = missing_requirements()
if _why:
    pytest.skip(_why, allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

import prunelab as pl  # noqa: E402

READOUT = ".prunelab-explorer .prunelab-readout"
ACCURACY = re.compile(r"accuracy ([0-9.]+) → ([0-9.]+)")
SPARSITY = re.compile(r"sparsity ([0-9.]+)")
RUN_ALL_TIMEOUT_MS = 900_000  # the notebook's FAST setting (PRUNELAB_FAST=1) on 2 busy cores


@pytest.fixture(scope="module", autouse=True)
def pretrained_checkpoint():
    if not (pl.paths.ZOO / "mlp-mnist1d-s0.safetensors").exists():
        pytest.skip("the pretrained mlp-mnist1d-s0 checkpoint is not in data/zoo "
                    "(python -m prunelab.zoo ensure mlp mnist1d --seed 0)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return tmp, notebook_under_test(tmp / "nb")


@pytest.fixture(scope="module")
def lab(workdir):
    tmp, notebook = workdir
    server = start_lab(notebook.parent, tmp / "lab")
    yield server, notebook
    stop(server)


@pytest.fixture(scope="module")
def voila(workdir):
    tmp, notebook = workdir
    server = start_voila(notebook, tmp / "voila")
    yield server, notebook
    stop(server)


@pytest.fixture
def page():
    with sync_playwright() as p:
        browser = launch_browser(p)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1100})
        finally:
            browser.close()


def shown_accuracy(page) -> tuple[str, float]:
    text = page.locator(READOUT).first.text_content()
    m = ACCURACY.search(text)
    assert m, f"no accuracy in the readout: {text!r}"
    return text, float(m.group(2))


def move_sparsity_slider(page, density: str) -> None:
    """Type a new fraction remaining into the slider's readout, as a user can."""
    box = page.locator(".prunelab-explorer .prunelab-density .widget-readout").first
    box.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(density)
    page.keyboard.press("Enter")


def check_slider_changes_accuracy(page, shot: str) -> None:
    readout = page.locator(READOUT).first
    expect(readout).to_contain_text("accuracy", timeout=120_000)
    # the notebook may have scrolled past it (Lab skips rendering cells out of view)
    page.locator(".prunelab-explorer").first.scroll_into_view_if_needed()
    expect(page.locator(".prunelab-explorer .js-plotly-plot").first).to_be_visible()
    text0, acc0 = shown_accuracy(page)
    bars0 = plot_y(page)
    assert bars0, "the per-layer density bars were not rendered"
    move_sparsity_slider(page, "0.02")
    expect(readout).to_contain_text("sparsity 0.980", timeout=30_000)
    text1, acc1 = shown_accuracy(page)
    assert acc1 != acc0, (text0, text1)
    assert float(SPARSITY.search(text1).group(1)) == pytest.approx(0.98, abs=1e-3)
    page.wait_for_function(
        """(before) => { const p = document.querySelector('.prunelab-explorer .js-plotly-plot');
                         return Array.from(p.data[0].y).some((v, i) => v !== before[i]); }""",
        arg=bars0, timeout=10_000)
    bars1 = plot_y(page)
    assert bars1 != bars0 and sum(bars1) < sum(bars0)
    page.locator(".prunelab-explorer").first.scroll_into_view_if_needed()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / shot))


def test_explorer_in_jupyterlab(lab, page):
    server, notebook = lab
    (SCREENSHOTS / "lab_explorer_failed.png").unlink(missing_ok=True)
    page.goto(server.url(f"/lab/tree/{notebook.name}", "reset"), timeout=120_000)
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    page.wait_for_selector(f"{panel} .jp-Notebook-ExecutionIndicator[data-status='idle']",
                           timeout=120_000)
    page.locator(f"{panel} .jp-Cell").first.click()  # the notebook is the current widget
    page.locator("li.lm-MenuBar-item", has_text="Run").click()
    page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
    try:
        prompts = page.locator(f"{panel} .jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
        try:
            expect(prompts.first).to_be_visible(timeout=15_000)
        except AssertionError:  # the menu click came too early: run through the command API
            page.keyboard.press("Escape")
            page.evaluate("() => window.jupyterapp.commands.execute('runmenu:run-all')")
            expect(prompts.first).to_be_visible(timeout=15_000)
        # Wait for the whole notebook: a slider move sent while later cells still run would only
        # be answered after them.
        page.wait_for_function(
            f"() => {{ const p = ({NOTEBOOK_PROGRESS})(); "
            "return p !== null && (p.pending === 0 || p.errors.length > 0); }",
            timeout=RUN_ALL_TIMEOUT_MS, polling=500)
        progress = page.evaluate(NOTEBOOK_PROGRESS)
        assert not progress["errors"], f"{notebook.name} failed: {progress['errors']}"
        check_slider_changes_accuracy(page, "lab_explorer.png")
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "lab_explorer_failed.png"))
        raise


def test_explorer_as_voila_dashboard(voila, page):
    server, _ = voila
    (SCREENSHOTS / "voila_explorer_failed.png").unlink(missing_ok=True)
    # Voilà runs the whole notebook before it answers the first request.
    page.goto(server.url("/"), timeout=RUN_ALL_TIMEOUT_MS)
    try:
        expect(page.locator(".prunelab-explorer").first).to_be_visible(timeout=120_000)
        assert page.locator(".cm-editor, .CodeMirror").count() == 0, "Voilà shows code"
        check_slider_changes_accuracy(page, "voila_explorer.png")
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "voila_explorer_failed.png"), full_page=True)
        print(server.log_tail())
        raise
