"""The runner's progress: cells done / total while papermill runs a notebook, the time left from the last finished
run's cell timings (outputs/<profile>/.timings.json, written atomically), a bar in a terminal, plain lines in a log.

Most tests drive the runner with a fake papermill that calls the progress callbacks the way the runner's papermill
engine does, with fixed cell durations (fast, exact numbers); one runs a real kernel end to end."""

import io
import json
import re
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from vitadapt import runner
from vitadapt.runner import Progress, remaining_s

from conftest import write_notebook


@pytest.fixture
def fake_repo(fake_repo):
    """conftest's fake repository, with the smoke profile's outputs folder: (notebooks, outputs/smoke)."""
    nbs, outs = fake_repo
    return nbs, outs / "smoke"


def write_cells(path, sleeps):
    """A notebook: the parameters cell, then one code cell per entry of ``sleeps`` (``time.sleep(s)``)."""
    write_notebook(path, code="import time")
    nb = nbformat.read(path, 4)
    nb.cells += [nbformat.v4.new_markdown_cell("a note")]
    nb.cells += [nbformat.v4.new_code_cell(f"time.sleep({s})") for s in sleeps]
    nbformat.write(nb, path)


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill.execute_notebook replaced by the runner engine's callbacks without a kernel: every code cell
    'takes' ``durations[name][i]`` seconds (papermill's own cell metadata), 0.1 s by default; ``interrupt_at[name]``
    raises KeyboardInterrupt when that code cell starts (Ctrl-C)."""
    durations, interrupt_at = {}, {}

    def execute(nb_path, out, parameters, progress=None, **kw):
        name = Path(nb_path).stem
        nb = nbformat.read(nb_path, 4)
        injected = nbformat.v4.new_code_cell(repr(parameters))
        injected.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(1, injected)
        nbformat.write(nb, out)
        progress.notebook_started(nb)
        code = 0
        for i, cell in enumerate(nb.cells):
            progress.cell_start(cell, i)
            if cell.cell_type == "code":
                if interrupt_at.get(name) == code:
                    raise KeyboardInterrupt
                took = durations.get(name, [])
                cell.metadata["papermill"] = {"duration": took[code] if code < len(took) else 0.1}
                code += 1
            progress.cell_complete(cell, i)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(runner, "code_hash", lambda name, profile: f"code of {name}")
    return durations, interrupt_at


def run(*args):
    return runner.main(["--profile", "smoke", "--force", "--progress", "lines", "--progress-every", "0", *args])


# ---- the estimate ----------------------------------------------------------------------------------------------

def test_time_left_is_the_last_runs_cells_still_to_run_scaled_by_this_runs_pace():
    assert remaining_s([None, None], [None, None], None, 0) is None                      # no timings: no estimate
    assert remaining_s([10, 20, 30], [None, None, None], None, 0) == 60
    assert remaining_s([10, 20, 30], [10, None, None], 1, 5) == 45                       # 15 of cell 2, then 30
    assert remaining_s([10, 20, 30], [20, None, None], 1, 5) == 95                       # twice as slow: 35 + 60
    assert remaining_s([10, 20, 30], [10, None, None], 1, 25) == 30                      # cell 2 overran its 20 s
    assert remaining_s([10, None, 30], [None, None, None], None, 0) == 10 + 30 + 30      # a new cell: the median
    assert remaining_s([1, 1, 100], [3, None, None], 1, 0) == 101                        # < 5 s done: not scaled
    assert remaining_s([10, 10], [1000, None], 1, 0) == 40                                # pace capped at 4x


# ---- plain lines (not a terminal) ---------------------------------------------------------------------------------

def test_lines_show_cells_done_of_total_then_the_next_run_estimates_from_the_timings(fake_repo, fake_papermill, capsys):
    nbs, outs = fake_repo
    durations, _ = fake_papermill
    write_cells(nbs / "10_x.ipynb", [0, 0, 0])        # 6 code cells: parameters, injected, import, 3 cells
    durations["10_x"] = [0.1, 0.1, 0.1, 10, 20, 30]
    assert run() == 0
    out, err = capsys.readouterr()
    assert "[1/1] 10_x (smoke) ... ok" in out and "10_x (smoke):" not in out      # stdout keeps one line per notebook
    lines = [line for line in err.splitlines() if line.startswith("[1/1] 10_x (smoke): ")]
    assert [re.search(r"(\d+)/6 cells", line).group(1) for line in lines[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert all("no estimate yet" in line for line in lines)
    record = json.loads((outs / ".timings.json").read_text())["notebooks"]["10_x"]
    assert [s for _, s in record["cells"]] == durations["10_x"] and record["status"] == "ok"
    assert record["cells"][1][0] == "injected-parameters"

    durations["10_x"] = [0.1, 0.1, 0.1, 10, 40, 60]   # the second run: cell 4 as before, then twice as slow
    assert run() == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[1/1] 10_x (smoke): ")]
    left = [re.search(r"(\d)/6 cells, .*about (.+?) left \(last run", line).groups() for line in lines[1:]]
    # after cell 4 (as fast as before): 20 + 30 s; after cell 5 (40 s, not 20): 30 s at this run's pace (x 1.66)
    assert left == [("1", "1 min 00 s"), ("2", "1 min 00 s"), ("3", "1 min 00 s"), ("4", "50 s"), ("5", "50 s"),
                    ("6", "0 s")]


def test_the_suite_line_adds_the_notebooks_still_to_run(fake_repo, fake_papermill, capsys):
    nbs, outs = fake_repo
    durations, _ = fake_papermill
    for name in ("10_x", "20_y", "30_z"):
        write_cells(nbs / f"{name}.ipynb", [0])
    runner.save_timings("smoke", "10_x", {"wall_s": 110, "cells": []})
    runner.save_timings("smoke", "20_y", {"wall_s": 200, "cells": []})
    assert run() == 0
    err = capsys.readouterr().err
    assert ("[1/3] 10_x (smoke): starting the kernel, 0 s, about 1 min 50 s left (last run 1 min 50 s); "
            "suite at least 5 min 10 s left (1 notebook without timings)") in err
    assert ("[2/3] 20_y (smoke): starting the kernel, 0 s, about 3 min 20 s left (last run 3 min 20 s); "
            "suite at least 3 min 20 s left (1 notebook without timings)") in err
    assert "[3/3] 30_z (smoke): starting the kernel, 0 s, no estimate yet (first timed run)\n" in err


def test_lines_are_rate_limited_for_a_log(fake_repo, fake_papermill, capsys):
    nbs, _ = fake_repo
    durations, _ = fake_papermill
    write_cells(nbs / "10_x.ipynb", [0] * 10)
    durations["10_x"] = [0.1] * 12 + [45]
    assert runner.main(["--profile", "smoke", "--progress", "lines"]) == 0        # default: every 30 s
    lines = [line for line in capsys.readouterr().err.splitlines() if "10_x" in line]
    assert len(lines) == 2, lines                                   # the start, the 45 s cell
    assert "starting the kernel" in lines[0] and "13/13 cells" in lines[1]


def test_off_shows_nothing_and_still_records_timings(fake_repo, fake_papermill, capsys):
    nbs, outs = fake_repo
    write_cells(nbs / "10_x.ipynb", [0])
    assert runner.main(["--profile", "smoke", "--progress", "off"]) == 0
    assert capsys.readouterr().err == ""
    assert len(json.loads((outs / ".timings.json").read_text())["notebooks"]["10_x"]["cells"]) == 4


def test_bad_progress_values_are_refused_naming_the_valid_ones(fake_repo, capsys):
    with pytest.raises(SystemExit):
        runner.main(["--profile", "smoke", "--progress", "fancy"])
    assert "invalid choice: 'fancy' (choose from 'auto', 'bar', 'lines', 'off')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--profile", "smoke", "--progress-every", "-1"])
    assert "--progress-every -1 is not valid; valid values: 0 (every cell) or more seconds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress mode 'x' is not valid; valid values: bar, lines, off"):
        Progress("x")


# ---- a terminal --------------------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place(fake_repo, fake_papermill, capsys, monkeypatch):
    nbs, _ = fake_repo
    write_cells(nbs / "10_x.ipynb", [0, 0])
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("TERM", "xterm")
    assert runner.main(["--profile", "smoke"]) == 0                    # --progress auto
    shown = tty.getvalue()
    assert "\n" not in shown.split("[1/1] 10_x (smoke) ... ok")[0]     # one line, redrawn with \r
    assert shown.startswith("\r[1/1] 10_x (smoke): starting the kernel, 0 s, no estimate yet")
    assert "\r[1/1] 10_x (smoke) [####----------------] 1/5 cells, 0 s, no estimate yet" in shown
    assert "\r[1/1] 10_x (smoke) [####################] 5/5 cells" in shown
    assert "\r\033[K[1/1] 10_x (smoke) ... ok" in shown                # cleared, then the result (stdout is a file)
    assert "[1/1] 10_x (smoke) ... ok" in capsys.readouterr().out


# ---- the timings file ----------------------------------------------------------------------------------------------

def test_the_timings_file_stays_valid_json_when_a_run_is_interrupted(fake_repo, fake_papermill, capsys, monkeypatch):
    nbs, outs = fake_repo
    durations, interrupt_at = fake_papermill
    write_cells(nbs / "10_x.ipynb", [0, 0])
    durations["10_x"] = [1, 1, 1, 5, 5]
    assert run() == 0
    before = (outs / ".timings.json").read_text()

    interrupt_at["10_x"] = 3                            # Ctrl-C in the middle of the notebook: nothing is recorded
    assert run() == 130
    assert (outs / ".timings.json").read_text() == before

    del interrupt_at["10_x"]                            # Ctrl-C while the timings are written: the old file stays
    replace = runner.os.replace

    def interrupted_replace(src, dst):
        if Path(dst).name == ".timings.json":
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(runner.os, "replace", interrupted_replace)
    durations["10_x"] = [2, 2, 2, 2, 2]
    assert run() == 130
    assert json.loads((outs / ".timings.json").read_text()) == json.loads(before)
    assert sorted(p.name for p in outs.iterdir() if p.name.startswith(".")) == [".timings.json"]   # no temp file
    monkeypatch.setattr(runner.os, "replace", replace)
    assert run() == 0
    assert [s for _, s in json.loads((outs / ".timings.json").read_text())["notebooks"]["10_x"]["cells"]] == [2] * 5


def test_an_unreadable_timings_file_means_no_estimate_and_is_rewritten(fake_repo, fake_papermill, capsys):
    nbs, outs = fake_repo
    write_cells(nbs / "10_x.ipynb", [0])
    outs.mkdir(parents=True)
    (outs / ".timings.json").write_text('{"notebooks": {"10_x": {"wall_s": 3, "cel')
    assert run() == 0
    err = capsys.readouterr().err
    assert err.count(".timings.json is not readable (JSONDecodeError)") == 1 and "no estimate yet" in err
    assert json.loads((outs / ".timings.json").read_text())["notebooks"]["10_x"]["wall_s"] >= 0


def test_a_failed_run_keeps_the_timings_of_the_last_finished_one(fake_repo, fake_papermill, capsys, monkeypatch):
    nbs, outs = fake_repo
    durations, _ = fake_papermill
    write_cells(nbs / "10_x.ipynb", [0])
    durations["10_x"] = [1, 1, 1, 7]
    assert run() == 0
    before = (outs / ".timings.json").read_text()
    execute = papermill.execute_notebook

    def fails(*a, **kw):
        execute(*a, **kw)
        raise RuntimeError("boom")

    monkeypatch.setattr(papermill, "execute_notebook", fails)
    assert run() == 1
    assert (outs / ".timings.json").read_text() == before


# ---- end to end: papermill's engine feeds the progress -------------------------------------------------------------

def test_a_real_kernel_run_shows_its_cells_and_the_second_run_an_estimate(fake_repo, capsys):
    nbs, outs = fake_repo
    write_cells(nbs / "10_x.ipynb", [0.3, 0.6])
    assert run() == 0
    err = capsys.readouterr().err
    done = re.findall(r"\[1/1\] 10_x \(smoke\): (\d)/5 cells", err)
    assert done == ["1", "2", "3", "4", "5"] and "no estimate yet" in err, err
    record = json.loads((outs / ".timings.json").read_text())["notebooks"]["10_x"]
    took = dict(record["cells"])
    assert len(took) == 5 and "injected-parameters" in took and 0.55 < max(took.values()) < 3, took
    assert run() == 0
    err = capsys.readouterr().err
    m = re.search(r"\[1/1\] 10_x \(smoke\): 2/5 cells, \d+ s, about (\d+) s left \(last run (\d+) s\)", err)
    assert m and int(m.group(1)) in (0, 1, 2) and int(m.group(2)) >= 1, err


def test_a_long_silent_cell_still_gets_a_line_every_so_often():
    """Between papermill's callbacks the clock keeps going: a plain line when ``every_s`` passed (a log shows the
    run is alive), and the bar is redrawn every second."""
    import time
    now = [1000.0]
    out = io.StringIO()
    p = Progress("lines", out, every_s=30, clock=lambda: now[0])
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("train()"), nbformat.v4.new_code_cell("report()")]
    p.start("[1/1] 10_x (cpu)", {"wall_s": 400, "cells": [[nb.cells[0].id, 300], [nb.cells[1].id, 60]]})
    p.notebook_started(nb)
    p.cell_start(nb.cells[0], 0)
    now[0] += 95
    deadline = time.monotonic() + 5
    while out.getvalue().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/1] 10_x (cpu): starting the kernel, 0 s, about 6 min 40 s left (last run 6 min 40 s)"
    assert lines[1] == ("[1/1] 10_x (cpu): 0/2 cells, 1 min 35 s, cell 1 running for 1 min 35 s, "
                        "about 4 min 25 s left (last run 6 min 40 s)")
    assert len(lines) == 2                                   # the clock stands still now: no more lines
