"""Servers and a browser for the end-to-end tests (tests/test_browser.py).

JupyterLab and Voilà are started on 127.0.0.1 only, on a free port with a random token, with
their own settings/workspaces/runtime folders, each in its own process group so that stopping it
also stops the kernels it started. Debian's Chromium is driven headless by Python Playwright
(no ``playwright install``: it cannot download here and is not needed). Recipes from
ECOSYSTEM.md §2.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
SCREENSHOTS = ROOT / "build" / "screenshots"
DEFAULT_NOTEBOOK = ROOT / "notebooks" / "01_loss_modelling.ipynb"
BIN = Path(sys.executable).parent

# The notebook written when the lecture notebook does not exist (yet): the explorer on the
# pretrained MLP, nothing else, so Voilà (which runs all of it before the first page) is quick.
TINY_CELLS = [
    ("markdown", "# Pruning explorer\n\nThe pretrained MLP on MNIST-1D; move the sliders."),
    ("code", "import torch\ntorch.set_num_threads(1)\nimport prunelab as pl\n\n"
             "model, bundle = pl.zoo.load(\"mlp\", \"mnist1d\", seed=0, train_if_missing=False)\n"
             "explorer = pl.widgets.PruningExplorer(model, bundle, "
             "criteria=[\"mp\", \"lap\", \"snip\", \"random\"])\nexplorer"),
]


# The layout and latency tests: the explorer alone (qm offered for a staged run long enough to
# cancel), so that Lab's Run All and Voilà's first page take seconds.
LAYOUT_CELLS = [
    ("markdown", "# Pruning explorer\n\nThe pretrained MLP on MNIST-1D."),
    ("code", "import torch\ntorch.set_num_threads(1)\nimport prunelab as pl\n\n"
             "model, bundle = pl.zoo.load(\"mlp\", \"mnist1d\", seed=0, train_if_missing=False)\n"
             "explorer = pl.widgets.PruningExplorer(model, bundle, "
             "criteria=[\"mp\", \"lap\", \"snip\", \"random\", \"qm\"])\nexplorer"),
]


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"needs Debian's Chromium at {CHROMIUM} (make sysdeps)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright Python package (pip install playwright; no browser download)"
    if not (BIN / "voila").exists() and shutil.which("voila") is None:
        return "needs voila (pip install voila)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_notebook(path: Path, cells=None) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown"
                else nbformat.v4.new_code_cell(src) for kind, src in (cells or TINY_CELLS)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def notebook_under_test(folder: Path) -> Path:
    """A copy of the notebook to open, in ``folder`` (never the committed file: Lab autosaves).

    ``PRUNELAB_E2E_NOTEBOOK`` names one (``tiny``: the tiny one); else
    ``notebooks/01_loss_modelling.ipynb`` when it exists; else a tiny notebook that displays the
    explorer on the pretrained MLP.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chosen = os.environ.get("PRUNELAB_E2E_NOTEBOOK", "")
    if chosen == "tiny" or (not chosen and not DEFAULT_NOTEBOOK.exists()):
        return write_tiny_notebook(folder / "explorer.ipynb")
    source = Path(chosen) if chosen else DEFAULT_NOTEBOOK
    if not source.exists():
        raise FileNotFoundError(f"PRUNELAB_E2E_NOTEBOOK={chosen!r} does not exist")
    return Path(shutil.copy(source, folder / source.name))


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    token: str
    log: Path

    def url(self, path: str, query: str = "") -> str:
        sep = "&" if query else ""
        return f"{self.base}{path}?{query}{sep}token={self.token}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _env(tmp: Path) -> dict:
    settings = tmp / "settings"
    toast = settings / "@jupyterlab" / "apputils-extension"
    toast.mkdir(parents=True, exist_ok=True)
    # The "get notified about Jupyter news?" toast would cover the notebook (ECOSYSTEM §2.2).
    (toast / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ,
               JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp / "config"),
               PRUNELAB_FAST="1",                         # the lecture notebook's small settings
               PRUNELAB_FIGURES=str(tmp / "figures"),     # never write into the checkout
               PRUNELAB_RESULTS=str(tmp / "results"),
               PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start(cmd: list[str], tmp: Path, cwd: Path, name: str, port: int, token: str,
           ready_path: str | None, timeout: float) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(tmp), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: kernels stop too
    server = Server(proc, f"http://127.0.0.1:{port}", token, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if ready_path is None:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return server
            else:
                urllib.request.urlopen(server.url(ready_path), timeout=2).close()
                return server
        except (OSError, urllib.error.URLError):
            time.sleep(0.3)
    stop(server)
    raise RuntimeError(f"{name} did not answer on port {port} within {timeout:.0f} s:\n"
                       f"{server.log_tail()}")


def start_lab(root: Path, tmp: Path, timeout: float = 90) -> Server:
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--allow-root", "--LabApp.news_url=None",
           "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp, a fallback for Run All
    return _start(cmd, tmp, root, "jupyterlab", port, token, "/api/status", timeout)


def start_voila(notebook: Path, tmp: Path, timeout: float = 90) -> Server:
    port, token = free_port(), secrets.token_hex(16)
    voila = BIN / "voila" if (BIN / "voila").exists() else Path(shutil.which("voila"))
    cmd = [str(voila), str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--Voila.port_retries=0", f"--token={token}", "--show_tracebacks=True"]
    # Voilà runs the notebook on the first page request, so only wait for the port here.
    return _start(cmd, tmp, notebook.parent, "voila", port, token, None, timeout)


def stop(server: Server, timeout: float = 20) -> None:
    """SIGTERM the server's process group (server and its kernels), SIGKILL if it lingers."""
    proc = server.proc
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # kernels left behind in the group
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(5)


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


# Progress of a Run All in JupyterLab, read from the notebook model (needs
# --LabApp.expose_app_in_browser): independent of which cells the windowed notebook has in the DOM.
NOTEBOOK_PROGRESS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model) return null;
  let pending = 0, done = 0; const errors = [];
  for (const cell of panel.content.model.cells) {
    if (cell.type !== 'code') continue;
    if (cell.executionCount === null || cell.executionCount === undefined) pending++; else done++;
    for (let j = 0; j < cell.outputs.length; j++) {
      const out = cell.outputs.get(j).toJSON();
      if (out.output_type === 'error') errors.push(out.ename + ': ' + out.evalue);
    }
  }
  return {pending, done, errors};
}"""


def plot_y(page, index: int = 0) -> list:
    """The y data of the ``index``-th plotly figure of the explorer, as rendered."""
    return page.evaluate(
        """(i) => { const p = document.querySelectorAll('.prunelab-explorer .js-plotly-plot')[i];
                   return p && p.data ? Array.from(p.data[0].y) : null; }""", index)


# Every control and plot of an explorer (``root``: a CSS selector) that sticks out of the
# viewport or of the explorer's own box, as {what, left, right, limit}; [] when nothing is
# clipped. Hidden elements (display: none) are skipped.
CLIPPED = """(root) => {
  const r = document.querySelector(root);
  if (!r) return [{what: 'no ' + root}];
  const vw = document.documentElement.clientWidth;
  const box = r.getBoundingClientRect();
  const limit = Math.min(vw, box.right) + 1;
  const out = [];
  if (box.right > vw + 1) out.push({what: 'explorer', left: box.left, right: box.right, limit: vw});
  const sel = ['.widget-inline-hbox', '.widget-button', '.widget-toggle-buttons', '.widget-html',
               '.widget-dropdown', '.widget-hslider', '.widget-hprogress', '.js-plotly-plot',
               '.main-svg', '.widget-readout'];
  for (const el of r.querySelectorAll(sel.join(','))) {
    const b = el.getBoundingClientRect();
    if (b.width === 0 || b.height === 0) continue;
    if (b.right > limit || b.left < box.left - 1)
      out.push({what: el.className.baseVal !== undefined ? 'svg ' + el.className.baseVal
                                                         : el.className, left: b.left,
                right: b.right, limit: limit});
  }
  for (const el of r.querySelectorAll('.prunelab-figure')) {
    const fig = el.querySelector('.main-svg');
    const b = el.getBoundingClientRect();
    if (fig && fig.getBoundingClientRect().width > b.width + 1)
      out.push({what: 'figure wider than its box', left: b.left,
                right: fig.getBoundingClientRect().right, limit: b.right});
  }
  return out;
}"""

# Timestamps of the last user action (keydown, change, click; capture phase, so before the
# widget sees it) and of the first change of the readout after it.
INSTRUMENT = """(root) => {
  const ro = document.querySelector(root + ' .prunelab-readout');
  window.__pl = {t0: null, t1: null};
  new MutationObserver(() => {
    if (window.__pl.t0 !== null && window.__pl.t1 === null) window.__pl.t1 = performance.now();
  }).observe(ro, {childList: true, subtree: true, characterData: true});
  const start = () => { window.__pl.t0 = performance.now(); window.__pl.t1 = null; };
  for (const kind of ['keydown', 'change', 'click']) document.addEventListener(kind, start, true);
}"""


def open_in_lab(page, server: Server, notebook: Path, timeout_ms: int = 900_000) -> None:
    """Open ``notebook`` in Lab, Run All and wait until every cell ran (no errors)."""
    import re

    from playwright.sync_api import expect

    page.goto(server.url(f"/lab/tree/{notebook.name}", "reset"), timeout=120_000)
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    # the kernel is idle (read from the app: at 150 % zoom the toolbar's indicator is folded
    # into its overflow menu)
    page.wait_for_function(
        "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " const k = w && w.sessionContext && w.sessionContext.session"
        " && w.sessionContext.session.kernel; return !!k && k.status === 'idle'; }",
        timeout=120_000, polling=500)
    page.locator(f"{panel} .jp-Cell").first.click()  # the notebook is the current widget
    page.locator("li.lm-MenuBar-item", has_text="Run").click()
    page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
    prompts = page.locator(f"{panel} .jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    try:
        expect(prompts.first).to_be_visible(timeout=15_000)
    except AssertionError:  # the menu click came too early: run through the command API
        page.keyboard.press("Escape")
        page.evaluate("() => window.jupyterapp.commands.execute('runmenu:run-all')")
        expect(prompts.first).to_be_visible(timeout=15_000)
    page.wait_for_function(
        f"() => {{ const p = ({NOTEBOOK_PROGRESS})(); "
        "return p !== null && (p.pending === 0 || p.errors.length > 0); }",
        timeout=timeout_ms, polling=500)
    progress = page.evaluate(NOTEBOOK_PROGRESS)
    assert not progress["errors"], f"{notebook.name} failed: {progress['errors']}"
