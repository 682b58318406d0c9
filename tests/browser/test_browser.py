"""The reader's side, in a real browser: JupyterLab on localhost driven by headless Chromium.

1. ``99_launcher``: run all cells, press the form's **Run** (a smoke run of ``40_parameter_budgets``); a table must
   appear in the form's output area.
2. ``31_rlrr_ablations`` (smoke, ``interactive = True``): run all cells, press the ablation panel's **Run**; a
   validation accuracy must appear.
3. ``make report PROFILE=smoke``, then its site (``outputs/smoke/site/index.html``) opened from disk (file://): the
   paper-beside-ours table has rows with both numbers, and a notebook page shows its tables or figures. Skipped,
   saying so, while the Makefile has no ``report`` target.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright (``requirements.txt``) with its
executable path set: Playwright's own browser download is never used (it cannot work offline). Missing either,
the test fails with one line saying what to install. Screenshots of every stage go to ``outputs/browser/``.

Isolation: the Jupyter server (and so the kernels and the launcher's runner subprocess) runs with
``VITADAPT_ROOT`` pointing at a temporary mirror of the repository (``lib``, ``configs``, ``notebooks``, ...
linked; ``outputs`` empty), so these runs never touch ``outputs/smoke`` that nbval, the goldens and the report
read, and every table seen in the browser was made by this test's own run. Run with ``make test-browser`` or
``pytest tests/browser`` (``pytest tests`` deselects it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "outputs" / "browser"
KERNEL = "Python (vitadapt)"
MIRRORED = ["lib", "configs", "notebooks", "data_manifests", "pyproject.toml", "Makefile", "data"]
LAUNCH_TIMEOUT_S = 150        # one smoke run of 40_parameter_budgets through the runner: ~10-40 s on 2 cores
PANEL_TIMEOUT_S = 120
NOTEBOOK_TIMEOUT_S = 150      # kernel start + run all of a smoke notebook


def _missing() -> list[str]:
    missing = []
    if not shutil.which("chromium"):
        missing.append("Debian's chromium (apt-get install chromium; `make setup` does it when root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (`make setup`, pinned in requirements.txt)")
    return missing


@pytest.fixture(scope="module", autouse=True)
def _requirements():
    missing = _missing()
    if missing:
        # one line and exit code 1, never a silent skip: make test must not pass without the browser test
        pytest.exit("browser test cannot run: install " + " and ".join(missing), returncode=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mirror(root: Path) -> Path:
    """A repository root whose code, configs and notebooks are the real ones (symlinks) and whose outputs are new."""
    root.mkdir(parents=True, exist_ok=True)
    for name in MIRRORED:
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    (root / "outputs").mkdir()
    (root / "browser").mkdir()
    return root


class Lab:
    def __init__(self, root: Path, port: int, token: str, proc: subprocess.Popen, log: Path):
        self.root, self.port, self.token, self.proc, self.log = root, port, token, proc, log
        self.base = f"http://127.0.0.1:{port}"

    def url(self, rel: str) -> str:
        return f"{self.base}/lab/tree/{rel}?token={self.token}"

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = _mirror(tmp_path_factory.mktemp("lab") / "repo")
    state = root.parent / "jupyter"
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, VITADAPT_ROOT=str(root), VITADAPT_OFFLINE="1", TQDM_DISABLE="1", PYTHONHASHSEED="0",
               JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_RUNTIME_DIR=str(state / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(state / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"))
    jupyter = Path(sys.executable).parent / "jupyter"
    cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    # no "official Jupyter news?" toast over the page (the settings folder is this server's own)
    news = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))
    log = root.parent / "jupyter.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(root, port, token, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode} before answering: {lab.log_tail()}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(f"{lab.base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on port {port} within 60 s: {lab.log_tail()}", pytrace=False)
            time.sleep(0.5)
        yield lab
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)       # its own session: the server, its kernels, their runners
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        ctx.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def parameterized_copy(lab: Lab, notebook: str, **params) -> str:
    """Copy ``notebooks/<notebook>.ipynb`` under the server's root with ``params`` injected after its
    parameters cell, as papermill does; the path relative to the server root."""
    import nbformat
    import papermill as pm
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    src = REPO / "notebooks" / f"{notebook}.ipynb"
    known = pm.inspect_notebook(str(src))
    unknown = sorted(set(params) - set(known))
    assert not unknown, f"{notebook} has no parameter(s) {unknown}; its parameters: {', '.join(known)}"
    nb = load_notebook_node(str(src))         # as papermill reads it (every cell gets its tags list)
    nb = parameterize_notebook(nb, params)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    assert nb.metadata.kernelspec.display_name == KERNEL, nb.metadata.kernelspec
    rel = f"browser/{notebook}.ipynb"
    nbformat.write(nb, lab.root / rel)
    return rel


def open_and_run_all(page, lab: Lab, rel: str, stage: str) -> None:
    """Open a notebook in a workspace of its own, wait for its kernel, and run all its cells from the Run menu."""
    page.goto(f"{lab.base}/lab/workspaces/{stage}/tree/{rel}?reset&token={lab.token}")
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=60_000)
    kernel = panel.locator(".jp-Toolbar-kernelName")
    try:
        page.wait_for_function(
            """name => { const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                         const k = p && p.querySelector('.jp-Toolbar-kernelName');
                         const s = p && p.querySelector('.jp-Notebook-ExecutionIndicator');
                         return k && k.textContent.includes(name) && s && s.dataset.status === 'idle'; }""",
            arg=KERNEL, timeout=60_000)
    except Exception as e:
        path = shot(page, f"{stage}-FAILED")
        raise AssertionError(f"{rel}: kernel {KERNEL!r} not idle within 60 s (the page shows kernel "
                             f"{kernel.all_inner_texts()}; screenshot {path})") from e
    shot(page, f"{stage}-1-opened")
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    first = panel.locator(".jp-CodeCell .jp-InputPrompt").first
    try:   # "[*]:" while queued or running, "[1]:" when done: the run has started
        page.wait_for_function("e => /\\[(\\*|\\d+)\\]/.test(e.textContent)", arg=first.element_handle(),
                               timeout=30_000)
    except Exception as e:
        path = shot(page, f"{stage}-FAILED")
        raise AssertionError(f"{rel}: Run > Run All Cells did not start the cells (screenshot {path})") from e


def cell_errors(page) -> str:
    """The text of the error outputs (tracebacks) of the notebook on show; warnings on stderr are not errors."""
    errs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) "
                        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    text = "\n".join(t for t in errs.all_inner_texts() if ERROR.search(t))
    return text[-2000:]


ERROR = re.compile(r"Traceback|^\w*(Error|Exception)\b", re.M)


def wait_for(page, locator, timeout_s: float, what: str, stage: str) -> None:
    """Wait until ``locator`` shows; fail at once, with the notebook's error, when a cell fails meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            locator.first.wait_for(state="visible", timeout=2000)
            return
        except Exception as e:  # playwright's TimeoutError: a cell error, or time is up
            errors = cell_errors(page)
            if errors or time.monotonic() > deadline:
                path = shot(page, f"{stage}-FAILED")
                when = "a cell failed before it appeared" if errors else f"it did not appear within {timeout_s:.0f} s"
                raise AssertionError(f"{what}: {when} (screenshot {path}); errors in the notebook: "
                                     f"{errors or 'none'}") from e


def form_cell(page, button_text: str = "Run"):
    """The notebook cell whose output holds a widget form with a ``button_text`` button."""
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    inner = page.locator(".jp-OutputArea-output button.jupyter-button", has_text=re.compile(f"^{button_text}$"))
    # `has` is matched inside each cell, so it is the page-relative locator, not one under `panel`
    return panel.locator(".jp-Cell").filter(has=inner), panel.locator(".jp-Cell").locator(inner)


def test_launcher_form_shows_the_tables_of_its_run(lab, page):
    t0 = time.monotonic()
    rel = parameterized_copy(lab, "99_launcher", profile="smoke", target="40_parameter_budgets", interactive=True)
    open_and_run_all(page, lab, rel, "launcher")
    cell, button = form_cell(page)
    wait_for(page, button, NOTEBOOK_TIMEOUT_S, "the launcher form's Run button", "launcher")
    assert button.count() == 1, f"{button.count()} Run buttons on the page; expected the launcher's one"
    out = cell.first.locator(".widget-output")
    assert out.locator("table").count() == 0, "a table is shown before the run (the outputs folder is new)"
    button.first.scroll_into_view_if_needed()
    shot(page, "launcher-2-form")
    button.first.click()
    table = out.locator("table")
    wait_for(page, table, LAUNCH_TIMEOUT_S, "a table in the launcher form's output area after a smoke run of "
             "40_parameter_budgets", "launcher")
    table.first.scroll_into_view_if_needed()
    shot(page, "launcher-3-result")
    rows = table.first.locator("tbody tr")
    assert rows.count() >= 1, "the table in the form's output area has no rows"
    assert "trainable" in table.first.inner_text(), table.first.inner_text()[:500]
    assert (lab.root / "outputs" / "smoke" / "40_parameter_budgets" / "metrics.json").exists()
    print(f"launcher: table after {time.monotonic() - t0:.0f} s")


def test_ablation_panel_shows_a_validation_accuracy(lab, page):
    t0 = time.monotonic()
    rel = parameterized_copy(lab, "31_rlrr_ablations", profile="smoke", interactive=True)
    open_and_run_all(page, lab, rel, "panel")
    cell, button = form_cell(page)
    wait_for(page, button, NOTEBOOK_TIMEOUT_S, "the ablation panel's Run button (31_rlrr_ablations, smoke, "
             "interactive)", "panel")
    cell.first.scroll_into_view_if_needed()
    shot(page, "panel-2-form")
    button.first.click()
    table = cell.first.locator(".widget-output table", has_text="val_acc")
    wait_for(page, table, PANEL_TIMEOUT_S, "a table with val_acc in the ablation panel's output area", "panel")
    table.first.scroll_into_view_if_needed()
    shot(page, "panel-3-result")
    # pandas' HTML: the first header row has a blank cell over the index; a body row is the index's th, then tds
    headers = [h.strip() for h in table.first.locator("thead tr").first.locator("th").all_inner_texts()]
    cells = [c.strip() for c in table.first.locator("tbody tr").first.locator("th, td").all_inner_texts()]
    values = dict(zip(headers, cells))
    acc = float(values["val_acc"])
    assert 0.0 <= acc <= 1.0, f"val_acc {acc} is not an accuracy in [0, 1]: {values}"
    print(f"panel: val_acc {acc} after {time.monotonic() - t0:.0f} s")


def _has_report_target() -> bool:
    return re.search(r"^report\s*:", (REPO / "Makefile").read_text(), re.M) is not None


def test_report_site_shows_paper_beside_ours(page):
    if not _has_report_target():
        pytest.skip("no `make report` target in the Makefile yet")
    # the site of the smoke outputs, built as a reader builds it (`make test` has just run the smoke notebooks)
    t0 = time.monotonic()
    made = subprocess.run(["make", "--no-print-directory", "report", "PROFILE=smoke"], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert made.returncode == 0, f"make report PROFILE=smoke failed ({made.returncode}): {made.stdout[-2000:]}"
    index = REPO / "outputs" / "smoke" / "site" / "index.html"
    assert index.exists(), f"make report PROFILE=smoke did not write {index.relative_to(REPO)}: {made.stdout[-1000:]}"
    print(f"report: built in {time.monotonic() - t0:.0f} s")
    page.goto(index.as_uri())
    section = page.locator("#paper")
    wait_for(page, section, 30, "the 'Paper beside ours' section (#paper) of the report index", "report")
    shot(page, "report-1-index")
    # every table with a paper column and an ours column; rows where both hold a number
    found = page.evaluate("""() => [...document.querySelectorAll('table')].map(t => {
        const heads = [...t.querySelectorAll('thead th')].map(h => h.textContent.trim().toLowerCase());
        const p = heads.indexOf('paper'), o = heads.findIndex(h => h.startsWith('ours'));
        if (p < 0 || o < 0) return null;
        const rows = [...t.querySelectorAll('tbody tr')].map(r => [...r.children].map(c => c.textContent.trim()));
        return {rows: rows.length, both: rows.filter(r => r[p] && r[o]).length};
    }).filter(x => x)""")
    assert found, "the report index has no table with a 'paper' and an 'ours' column"
    assert sum(f["both"] for f in found) >= 1, f"no row of the paper-beside-ours tables has both numbers: {found}"
    section.scroll_into_view_if_needed()
    shot(page, "report-2-paper-beside-ours")
    links = page.locator("a[href$='.html']")
    assert links.count() >= 1, "the report index links to no notebook page"
    href = links.first.get_attribute("href")
    page.goto((index.parent / href).resolve().as_uri())
    page.wait_for_load_state()
    shot(page, "report-3-notebook")
    assert page.locator("table, img").count() >= 1, f"the report page {href} shows no table or figure"
