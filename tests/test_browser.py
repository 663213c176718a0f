"""What a user sees in a real browser: the explorer in JupyterLab and as a Voilà dashboard.

Layout and latency (``test_layout_*``, on a notebook holding only the explorer): at a 1280×720
viewport and at 150 % browser zoom (emulated exactly: an 853×480 CSS viewport at device scale
factor 1.5, as Chromium zoom gives in a 1280×720 window), in Lab and in Voilà, no control or
plot may stick out of the viewport or the explorer's box (element bounding boxes); screenshots
``build/screenshots/{lab,voila}_explorer_{1280x720,zoom150}.png``. At 1280×720 the latencies
a user feels are measured in the page (capture-phase event → first change of the readout) and
printed as a table (also ``build/screenshots/latency.txt``): slider key press → readout and
criterion switch → readout (median under 100 ms), and Run click → Cancel clickable.

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

from browser_helpers import (CLIPPED, INSTRUMENT, LAYOUT_CELLS, SCREENSHOTS, launch_browser,
                             missing_requirements,
                             notebook_under_test, open_in_lab, plot_y, start_lab, start_voila,
                             stop, write_tiny_notebook)

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
    try:
        # Run All and wait for the whole notebook: a slider move sent while later cells still
        # run would only be answered after them.
        open_in_lab(page, server, notebook, timeout_ms=RUN_ALL_TIMEOUT_MS)
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


# ------------------------------------------------------------------ layout and latency
ROOT = ".prunelab-explorer"
VIEWS = {"1280x720": dict(viewport={"width": 1280, "height": 720}, device_scale_factor=1),
         # Chromium at 150 % zoom in a 1280×720 window: 853×480 CSS pixels, 1.5 device px each
         "zoom150": dict(viewport={"width": 853, "height": 480}, device_scale_factor=1.5)}
LATENCY: dict[str, dict[str, list[float]]] = {}
MOVES = 15


@pytest.fixture(scope="module")
def layout_notebook(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    (tmp / "nb").mkdir()
    return tmp, write_tiny_notebook(tmp / "nb" / "explorer.ipynb", LAYOUT_CELLS)


@pytest.fixture(scope="module")
def layout_lab(layout_notebook):
    tmp, notebook = layout_notebook
    server = start_lab(notebook.parent, tmp / "lab")
    yield server, notebook
    stop(server)


@pytest.fixture(scope="module")
def layout_voila(layout_notebook):
    tmp, notebook = layout_notebook
    server = start_voila(notebook, tmp / "voila")
    yield server, notebook
    stop(server)


@pytest.fixture(scope="module", autouse=True)
def latency_table():
    yield
    if not LATENCY:
        return
    import statistics

    lines = ["where   what                              median ms   min    max    n"]
    for where, rows in LATENCY.items():
        for what, ms in rows.items():
            if ms:
                lines.append(f"{where:<7} {what:<33} {statistics.median(ms):>9.0f} "
                             f"{min(ms):>6.0f} {max(ms):>6.0f} {len(ms):>4}")
    table = "\n".join(lines)
    print("\n" + table)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "latency.txt").write_text(table + "\n")


def view_page(p, view: str):
    browser = launch_browser(p)
    return browser, browser.new_page(**VIEWS[view])


def explorer_in_view(page) -> None:
    readout = page.locator(f"{ROOT} .prunelab-readout").first
    expect(readout).to_contain_text("accuracy", timeout=120_000)
    expect(page.locator(f"{ROOT} .js-plotly-plot").first).to_be_visible()
    # the figures are drawn and fitted to their boxes (the fit runs ~30 ms after a change)
    page.wait_for_function(
        f"""() => {{ const ps = document.querySelectorAll('{ROOT} .js-plotly-plot');
                    return ps.length === 2 && Array.from(ps).every(p => p._fullLayout &&
                        Math.abs(p._fullLayout.width - p.clientWidth) <= 2); }}""",
        timeout=30_000)
    page.evaluate(f"() => document.querySelector('{ROOT}').scrollIntoView({{block: 'start'}})")
    page.wait_for_timeout(300)


def assert_nothing_clipped(page, shot: str) -> None:
    clipped = page.evaluate(CLIPPED, ROOT)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / shot))
    assert clipped == [], f"clipped in {shot}: {clipped}"


def timed(page, action, what: str, until: str | None = None) -> float:
    """ms from the capture-phase event of ``action`` to the readout's first change (or to the
    JS condition ``until``)."""
    page.evaluate("() => { window.__pl.t0 = null; window.__pl.t1 = null; }")
    action()
    if until is None:
        page.wait_for_function("() => window.__pl.t1 !== null", timeout=30_000, polling="raf")
        return page.evaluate("() => window.__pl.t1 - window.__pl.t0")
    page.wait_for_function(f"() => {{ if ({until}) {{ window.__pl.t1 = performance.now(); "
                           "return true; } return false; }", timeout=30_000, polling="raf")
    return page.evaluate("() => window.__pl.t1 - window.__pl.t0")


def measure_latencies(page, where: str) -> None:
    rows = LATENCY.setdefault(where, {})
    readout = page.locator(f"{ROOT} .prunelab-readout").first
    select = page.locator(f"{ROOT} select").first
    # scores of both criteria cached first (a first switch scores; that is not a move)
    select.select_option("lap")
    expect(readout).to_contain_text("one-shot lap", timeout=60_000)
    select.select_option("mp")
    expect(readout).to_contain_text("one-shot mp", timeout=60_000)
    page.wait_for_timeout(300)
    page.evaluate(INSTRUMENT, ROOT)
    handle = page.locator(f"{ROOT} .prunelab-density .noUi-handle").first
    handle.focus()
    rows["slider key → readout"] = [
        timed(page, lambda k=("ArrowLeft" if i % 2 == 0 else "ArrowRight"):
              page.keyboard.press(k), "slider") for i in range(MOVES)]
    rows["criterion switch → readout"] = [
        timed(page, lambda c=("lap" if i % 2 == 0 else "mp"): select.select_option(c),
              "criterion") for i in range(MOVES)]
    # a qm run in 140 stages: Cancel must be clickable at once, and stop the run
    select.select_option("qm")
    expect(readout).to_contain_text("one-shot qm", timeout=120_000)
    stages = page.locator(f"{ROOT} .widget-hslider .noUi-handle").nth(1)
    stages.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    expect(readout).to_contain_text("π=140", timeout=30_000)
    cancel = f"document.querySelector('{ROOT} .prunelab-cancel')"
    rows["Run click → Cancel clickable"] = [timed(
        page, lambda: page.locator(f"{ROOT} .prunelab-run").click(), "run",
        until=f"!{cancel}.disabled")]
    expect(page.locator(f"{ROOT} .widget-hprogress").first).to_be_visible()
    rows["Cancel click → run stopped"] = [timed(
        page, lambda: page.locator(f"{ROOT} .prunelab-cancel").click(), "cancel",
        until=f"{cancel}.disabled")]
    expect(readout).to_contain_text("cancelled after stage", timeout=30_000)
    # back to π = 1: a one-shot readout without the stale stage bar
    stages.focus()
    for _ in range(5):
        page.keyboard.press("ArrowLeft")
    expect(readout).to_contain_text("one-shot qm", timeout=60_000)
    expect(page.locator(f"{ROOT} .widget-hprogress").first).to_be_hidden()
    page.wait_for_function(
        f"() => document.querySelectorAll('{ROOT} .js-plotly-plot')[1].data[0].x.length === 0",
        timeout=10_000)


def check_medians(where: str) -> None:
    import statistics

    for what in ("slider key → readout", "criterion switch → readout"):
        ms = LATENCY[where][what]
        assert statistics.median(ms) < 100, f"{where}: {what} median {statistics.median(ms):.0f} ms"


@pytest.mark.parametrize("view", list(VIEWS))
def test_layout_in_jupyterlab(layout_lab, view):
    server, notebook = layout_lab
    with sync_playwright() as p:
        browser, page = view_page(p, view)
        try:
            open_in_lab(page, server, notebook)
            explorer_in_view(page)
            assert_nothing_clipped(page, f"lab_explorer_{view}.png")
            if view == "1280x720":
                measure_latencies(page, "Lab")
        except Exception:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / f"lab_explorer_{view}_failed.png"))
            raise
        finally:
            browser.close()
    if view == "1280x720":
        check_medians("Lab")


@pytest.mark.parametrize("view", list(VIEWS))
def test_layout_as_voila_dashboard(layout_voila, view):
    server, _ = layout_voila
    with sync_playwright() as p:
        browser, page = view_page(p, view)
        try:
            page.goto(server.url("/"), timeout=RUN_ALL_TIMEOUT_MS)
            explorer_in_view(page)
            assert_nothing_clipped(page, f"voila_explorer_{view}.png")
            if view == "1280x720":
                measure_latencies(page, "Voilà")
        except Exception:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / f"voila_explorer_{view}_failed.png"))
            print(server.log_tail())
            raise
        finally:
            browser.close()
    if view == "1280x720":
        check_medians("Voilà")


def test_projector_scale_in_voila(tmp_path):
    """``scale=1.5`` (projector fonts) at 1280×720: bigger text, still nothing clipped."""
    cells = [(kind, src.replace("\"qm\"])", "\"qm\"], scale=1.5)")) for kind, src in LAYOUT_CELLS]
    assert "scale=1.5" in cells[1][1]
    notebook = write_tiny_notebook(tmp_path / "projector.ipynb", cells)
    server = start_voila(notebook, tmp_path / "voila")
    try:
        with sync_playwright() as p:
            browser, page = view_page(p, "1280x720")
            try:
                page.goto(server.url("/"), timeout=RUN_ALL_TIMEOUT_MS)
                explorer_in_view(page)
                size = page.evaluate(
                    f"() => parseFloat(getComputedStyle(document.querySelector("
                    f"'{ROOT} .prunelab-readout')).fontSize)")
                assert size >= 22, size  # 15 px × 1.5
                assert_nothing_clipped(page, "voila_explorer_projector_1280x720.png")
            finally:
                browser.close()
    finally:
        stop(server)
