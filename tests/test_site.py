"""`make report`: the static site of a profile's executed notebooks (vitadapt.report_site), built from a tiny fake
outputs folder, never from real runs."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from vitadapt import report_site
from vitadapt.paths import REPO_ROOT

# A 1x1 PNG: the figure a notebook printed (an image output) and saved beside it.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAA"
                       "AABJRU5ErkJggg==")
TABLE_HTML = ('<table border="1" class="dataframe"><thead><tr><th>method</th><th>test_acc</th></tr></thead>'
              "<tbody><tr><td>linear probe</td><td>0.8765</td></tr></tbody></table>")


def _nb(path: Path, outputs: list) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook\nIts abstract."),
                nbformat.v4.new_code_cell("display(table)", execution_count=1, outputs=outputs)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


def _metrics(path: Path, metrics: dict) -> None:
    run = {"git_commit": "abc1234", "started": "2026-11-30T10:00:00+00:00", "papermill_wall_time_s": 4.2,
           "sources": {"weights": {"weights_used": "random"}, "data": {"dataset": "synthetic"}}}
    path.write_text(json.dumps({"metrics": metrics, "run": run}))


def _fake_outputs(root: Path) -> Path:
    out = root / "smoke"
    d = out / "01_baselines"
    _nb(d / "01_baselines.ipynb", [
        nbformat.v4.new_output("display_data", data={"text/html": TABLE_HTML, "text/plain": "table"}),
        nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(PNG).decode(),
                                                     "text/plain": "<Figure>"})])
    (d / "baselines.png").write_bytes(PNG)
    (d / "baselines.csv").write_text("method,test_acc\nlinear probe,0.8765\n")
    _metrics(d / "metrics.json", {"dry_run": None, "results": [
        {"table": "Frozen baselines", "method": "linear probe", "metric": "top-1 (%)", "mean": 87.65,
         "std": 1.25, "n": 2},
        {"table": "Frozen baselines", "method": "kNN", "metric": "top-1 (%)", "mean": 80.0, "std": 0.5, "n": 2}]})
    dry = out / "10_explora_dinov2" / "dry_run"
    _nb(dry / "10_explora_dinov2.ipynb", [nbformat.v4.new_output("stream", name="stdout", text="dry run\n")])
    _metrics(dry / "metrics.json", {"dry_run": "weights dinov2_vitl14 not available here", "results": []})
    _nb(out / "20_upstep" / "20_upstep.failed.ipynb", [nbformat.v4.new_output(
        "error", ename="ValueError", evalue="dataset='no_such_dataset' is not valid; valid values: aid, synthetic",
        traceback=["ValueError: dataset='no_such_dataset' is not valid"])])
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.th = [], []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        self._in_th = False

    def handle_data(self, data):
        if self._in_th and data.strip():
            self.th.append(data.strip())


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_site_index_pages_and_paper_beside_ours(tmp_path):
    out = _fake_outputs(tmp_path)
    index = report_site.build("smoke", out)
    assert index == out / "site" / "index.html"
    site = index.parent
    text = index.read_text(encoding="utf-8")
    parsed = _parse(index)

    # every link of the index resolves to a file of the site (it opens from disk), anchors to an id
    files = [h for h in parsed.links if not h.startswith("#")]
    assert files, "the index links to nothing"
    for href in files:
        assert not re.match(r"[a-z]+:", href), f"{href}: the site must link within itself"
        assert (site / href).is_file(), f"index links to {href}, which is not in the site"
    for anchor in [h[1:] for h in parsed.links if h.startswith("#")]:
        assert f'id="{anchor}"' in text
    assert {"01_baselines.html", "10_explora_dinov2.html", "20_upstep.html",
            "01_baselines/baselines.png", "01_baselines/baselines.csv"} <= set(files)

    # statuses: ok, dry run with its reason, failed with its error, missing for a notebook never run
    plain = html.unescape(re.sub(r"<[^>]+>", " ", text))
    assert "weights dinov2_vitl14 not available here" in plain
    assert "ValueError: dataset='no_such_dataset' is not valid" in plain
    assert re.search(r"30_rlrr\s+missing", plain), "a notebook without outputs is listed as missing"
    # headline numbers from metrics.json results
    assert "Frozen baselines · linear probe: 87.7 ± 1.2 % (n=2)" in plain

    # the paper-beside-ours table: a paper column, the published number beside ours, linked to the notebook
    assert "paper" in parsed.th and "ours (mean ± std)" in parsed.th
    row = re.search(r"<tr><td>linear probe</td>(.*?)</tr>", text).group(1)
    assert "69.0" in row and "87.7 ± 1.2 (n=2)" in row and 'href="01_baselines.html"' in row

    # a notebook page: its table and its figure embedded, a way back, nothing fetched from the network
    page = (site / "01_baselines.html").read_text(encoding="utf-8")
    assert "<table" in page and "0.8765" in page and "linear probe" in page
    assert "data:image/png;base64," in page
    assert 'href="index.html"' in page
    assert not re.search(r"<script[^>]*src=\"https?://", page)
    failed = (site / "20_upstep.html").read_text(encoding="utf-8")
    assert "no_such_dataset" in failed
    assert not list(tmp_path.rglob(".site.*")), "no temporary build folder is left behind"


def test_site_later_failure_noted_and_failed_build_keeps_previous_site(tmp_path):
    out = _fake_outputs(tmp_path)
    index = report_site.build("smoke", out)
    before = index.read_text(encoding="utf-8")
    # a later failed run of 01: the ok results stay shown, the failure is noted and has its page
    failed = out / "01_baselines" / "01_baselines.failed.ipynb"
    _nb(failed, [nbformat.v4.new_output("error", ename="RuntimeError", evalue="CUDA out of memory", traceback=[])])
    report_site.build("smoke", out)
    text = index.read_text(encoding="utf-8")
    assert "01_baselines.failed.html" in text and "CUDA out of memory" in text
    assert (index.parent / "01_baselines.failed.html").is_file()
    before = text
    # a notebook that cannot be read: the build fails naming it, the previous site stays whole
    (out / "01_baselines" / "01_baselines.ipynb").write_text("{ not json")
    with pytest.raises(report_site.ReportError, match="01_baselines.ipynb"):
        report_site.build("smoke", out)
    assert index.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_site_without_executed_notebooks_says_what_to_run(tmp_path):
    empty = tmp_path / "smoke"
    empty.mkdir()
    (empty / "01_baselines").mkdir()           # a folder, but no executed notebook
    with pytest.raises(report_site.ReportError, match=r"no executed notebooks .*profile 'smoke'.*"
                                                      r"make reproduce PROFILE=smoke"):
        report_site.build("smoke", empty)
    assert not (empty / "site").exists()
    with pytest.raises(report_site.ReportError, match=r"PROFILE='nosuch' is not valid; valid values: .*smoke"):
        report_site.build("nosuch", tmp_path / "nosuch")


def test_site_command_line_exit_code_and_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vitadapt.report_site", "--profile", "smoke",
                        "--outputs", str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 2
    assert "make reproduce PROFILE=smoke" in r.stderr and "Traceback" not in r.stderr
