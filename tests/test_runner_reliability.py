"""The runner's edges: -p values and names, FORCE/REAL in make, loud dry runs, Ctrl-C and a full disk.

Most tests replace papermill.execute_notebook by a fake that writes what a notebook would (fast, no kernel);
the Ctrl-C test runs a real kernel in a subprocess, since the noise it guards against only shows there."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
import pytest

from vitadapt import config, paths, runner
from vitadapt.config import load_profile

from conftest import write_notebook

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_repo(fake_repo):
    """conftest's fake repository, with the smoke profile's outputs folder: (notebooks, outputs/smoke)."""
    nbs, outs = fake_repo
    return nbs, outs / "smoke"


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill.execute_notebook replaced: records each call's parameters, writes the output notebook and, when
    ``metrics[name]`` is set, that notebook's metrics.json (as Run.finish would); ``raises[name]`` is raised after."""
    calls, metrics, raises = {}, {}, {}

    def execute(nb, out, parameters, **kw):
        name = Path(nb).stem
        calls[name] = parameters
        shutil.copy(nb, out)
        if name in metrics:
            run = {"code_hash": runner.code_hash(name, "smoke")}
            (Path(out).parent / "metrics.json").write_text(json.dumps({"metrics": metrics[name], "run": run}))
        if name in raises:
            raise raises[name]

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(runner, "code_hash", lambda name, profile: f"code of {name}")   # lib may change meanwhile
    return calls, metrics, raises


# ---- 1. parameters ---------------------------------------------------------------------------------------------

def test_yaml_values_follow_yaml_1_2_floats():
    load_yaml = config.load_yaml
    assert load_yaml("5e-4") == 0.0005 and load_yaml("1e3") == 1000.0
    assert load_yaml("[1e-4, 3e-4]") == [0.0001, 0.0003]
    assert load_yaml("5") == 5 and isinstance(load_yaml("5"), int)
    assert load_yaml("1.5") == 1.5 and load_yaml("'5e-4'") == "5e-4" and load_yaml("aid") == "aid"
    assert load_yaml("[true, False]") == [True, False] and load_yaml("yes") == "yes" and load_yaml("no") == "no"


def test_config_files_read_floats_the_same_way(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "smoke.yaml").write_text("defaults:\n  lr: 5e-4\n")
    (tmp_path / "notebooks" / "10_x.yaml").write_text("smoke:\n  ft_lrs: [1e-4, 3e-4]\n")
    monkeypatch.setattr(config, "CONFIGS", tmp_path)
    assert load_profile("smoke", "10_x") == {"lr": 0.0005, "ft_lrs": [0.0001, 0.0003]}


def test_p_values_reach_the_notebook_as_numbers(fake_repo, fake_papermill):
    nbs, _ = fake_repo
    calls, _, _ = fake_papermill
    write_notebook(nbs / "10_x.ipynb", "profile = 'cpu'\nlr = None\nft_lrs = None")
    assert runner.main(["--profile", "smoke", "-p", "lr", "5e-4", "-p", "ft_lrs", "[1e-4, 3e-4]"]) == 0
    assert calls["10_x"] == {"profile": "smoke", "lr": 0.0005, "ft_lrs": [0.0001, 0.0003]}


def test_a_malformed_value_is_one_line_naming_it(fake_repo, fake_papermill, capsys):
    nbs, _ = fake_repo
    write_notebook(nbs / "10_x.ipynb", "profile = 'cpu'\nseeds = None")
    with pytest.raises(SystemExit) as e:
        runner.main(["--profile", "smoke", "-p", "seeds", "[0, 1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "error: -p seeds '[0, 1' is not a valid YAML value" in err
    assert fake_papermill[0] == {}


def test_unknown_names_fail_before_any_notebook_runs(fake_repo, fake_papermill, capsys):
    nbs, _ = fake_repo
    write_notebook(nbs / "10_x.ipynb", "profile = 'cpu'\nseeds = None\nlr: 'Optional[float]' = None")
    write_notebook(nbs / "20_y.ipynb", "profile = 'cpu'\nsteps = None")
    with pytest.raises(SystemExit) as e:
        runner.main(["--profile", "smoke", "-p", "devices", "2"])
    assert e.value.code == 2
    assert ("-p devices: no selected notebook has this parameter; valid parameters of the 2 selected notebooks: "
            "lr, profile, seeds, steps") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--profile", "smoke", "--nb", "20", "-p", "lr", "0.1"])
    assert "valid parameters of 20_y: profile, steps" in capsys.readouterr().err
    assert fake_papermill[0] == {}


def test_a_name_only_some_notebooks_have_goes_to_those_only(fake_repo, fake_papermill, capsys):
    nbs, _ = fake_repo
    calls = fake_papermill[0]
    write_notebook(nbs / "10_x.ipynb", "profile = 'cpu'\nlr = None")
    write_notebook(nbs / "20_y.ipynb", "profile = 'cpu'\nsteps = None")
    assert runner.main(["--profile", "smoke", "-p", "lr", "0.1"]) == 0
    assert calls == {"10_x": {"profile": "smoke", "lr": 0.1}, "20_y": {"profile": "smoke"}}
    assert "-p lr is not passed to 20_y (no such parameter there)" in capsys.readouterr().out


def test_p_profile_must_agree_with_profile(fake_repo, fake_papermill, capsys):
    nbs, _ = fake_repo
    write_notebook(nbs / "10_x.ipynb")
    with pytest.raises(SystemExit) as e:
        runner.main(["--profile", "smoke", "-p", "profile", "cpu"])
    assert e.value.code == 2
    assert "-p profile 'cpu' disagrees with --profile 'smoke'" in capsys.readouterr().err
    assert runner.main(["--profile", "smoke", "-p", "profile", "smoke"]) == 0


def test_every_training_notebook_takes_the_fabric_settings_as_parameters():
    """`-p devices 2 -p strategy ddp` reaches every notebook that trains (README's GPU section), none other."""
    fabric = {"devices", "num_nodes", "strategy", "accelerator", "precision"}
    trains = {nb.stem for nb in runner.discover() if nb.stem[:2] in ("10", "11", "12", "20", "21", "30", "31")}
    for nb in runner.discover():
        has = fabric & set(runner.notebook_parameters(nb))
        assert has == (fabric if nb.stem in trains else set()), nb.stem
    commands = [line for line in REPO.joinpath("README.md").read_text().splitlines() if "vitadapt.runner" in line]
    assert [c for c in commands if "-p devices " in c and "-p strategy " in c]


# ---- 2. make reproduce FORCE= / REAL= -------------------------------------------------------------------------

def _make_reproduce(*assignments):
    r = subprocess.run(["make", "-n", "--no-print-directory", "reproduce", "PROFILE=smoke", *assignments], cwd=REPO,
                       capture_output=True, text=True)
    runs = [line for line in r.stdout.splitlines() if "vitadapt.runner" in line]
    return r.returncode, (runs[-1] if runs else ""), r.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_force_and_real_take_only_clear_values():
    for v in ("1", "yes", "true"):
        rc, line, _ = _make_reproduce(f"FORCE={v}", f"REAL={v}")
        assert rc == 0 and "--force" in line and "--require-real" in line
    rc, line, _ = _make_reproduce("FORCE=", "REAL=")
    assert rc == 0 and line and "--force" not in line and "--require-real" not in line
    for var in ("FORCE", "REAL"):
        rc, line, err = _make_reproduce(f"{var}=0")
        assert rc != 0 and not line
        assert f"{var}=0 is not valid; valid values: 1, yes, true, or empty" in err


# ---- 3. dry runs are loud ---------------------------------------------------------------------------------------

def test_dry_runs_are_counted_named_and_never_skipped(fake_repo, fake_papermill, capsys):
    nbs, outs = fake_repo
    calls, metrics, _ = fake_papermill
    write_notebook(nbs / "10_dry.ipynb")
    write_notebook(nbs / "20_real.ipynb")
    metrics["10_dry"] = {"dry_run": "dataset 'fmow' is not available here"}
    metrics["20_real"] = {"dry_run": None, "acc": 0.5}
    assert runner.main(["--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "10_dry (smoke) ... dry run (dataset 'fmow' is not available here)" in out
    assert "20_real (smoke) ... ok" in out
    assert "1 ran, 1 dry run, 0 skipped (unchanged), 0 FAILED" in out
    assert "  dry run: 10_dry: dataset 'fmow' is not available here" in out
    calls.clear()
    assert runner.main(["--profile", "smoke"]) == 0                      # again, without --force
    assert list(calls) == ["10_dry"]                                     # the dry run runs again, the real one is skipped
    assert "0 ran, 1 dry run, 1 skipped (unchanged), 0 FAILED" in capsys.readouterr().out


def test_require_real_makes_a_dry_run_a_failure(fake_repo, fake_papermill, capsys):
    nbs, _ = fake_repo
    write_notebook(nbs / "10_dry.ipynb")
    fake_papermill[1]["10_dry"] = {"dry_run": "dry_run='yes'"}
    assert runner.main(["--profile", "smoke", "--require-real"]) == 1
    out = capsys.readouterr().out
    assert "10_dry (smoke) ... FAILED" in out and "dry run (dry_run='yes') and --require-real was given" in out
    assert "0/1 notebooks ok" in out and "1 FAILED" in out


# ---- 4. Ctrl-C and a full disk ----------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_exit_130_and_keeps_previous_outputs(tmp_path):
    """A real kernel, interrupted by SIGINT to the runner while a cell runs: no tracebacks, exit 130."""
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "smoke.yaml", tmp_path / "configs")
    (tmp_path / "notebooks").mkdir()
    write_notebook(tmp_path / "notebooks" / "01_slow.ipynb", code="print('started', flush=True)\nimport time\ntime.sleep(300)")
    out = tmp_path / "outputs" / "smoke" / "01_slow"
    out.mkdir(parents=True)
    (out / "01_slow.ipynb").write_text("previous")
    (out / "metrics.json").write_text("{}")
    env = {**os.environ, "VITADAPT_ROOT": str(tmp_path)}
    for var in ("RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    p = subprocess.Popen([sys.executable, "-m", "vitadapt.runner", "--profile", "smoke"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:       # wait until the sleeping cell runs
        running = list(out.glob(".01_slow.running-*.ipynb"))
        if running and "started" in running[0].read_text():
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stderr
    assert stdout.strip().splitlines()[-1] == (
        "interrupted during 01_slow after 0/1 notebooks finished; the previous outputs of 01_slow are intact; "
        "partial notebook kept as outputs/smoke/01_slow/01_slow.failed.ipynb")
    assert (out / "01_slow.ipynb").read_text() == "previous" and (out / "metrics.json").read_text() == "{}"
    nbformat.read(out / "01_slow.failed.ipynb", 4)
    assert not list(out.glob(".*"))


def test_an_invalid_partial_notebook_is_deleted_not_kept(fake_repo, fake_papermill, monkeypatch, capsys):
    nbs, outs = fake_repo
    write_notebook(nbs / "10_x.ipynb")
    earlier = outs / "10_x" / "10_x.failed.ipynb"
    earlier.parent.mkdir(parents=True)
    write_notebook(earlier, code="'the earlier failure'")

    def disk_full(nb, out, **kw):
        Path(out).write_text('{"cells": [{"cell_type": "co')           # truncated by a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(papermill, "execute_notebook", disk_full)
    assert runner.main(["--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "10_x (smoke) ... FAILED" in out and "disk full writing the executed notebook" in out
    assert "its partial notebook was not a valid notebook" in out and "the earlier 10_x.failed.ipynb is kept" in out
    assert "the earlier failure" in nbformat.read(earlier, 4).cells[1].source
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["10_x.failed.ipynb"]


def test_a_full_disk_while_stamping_is_a_failure_not_a_crash(fake_repo, fake_papermill, monkeypatch, capsys):
    nbs, outs = fake_repo
    write_notebook(nbs / "10_x.ipynb")
    write_notebook(nbs / "20_y.ipynb")
    fake_papermill[1]["10_x"] = {"acc": 0.5}
    fake_papermill[1]["20_y"] = {"acc": 0.7}
    written = {}
    real_execute, real_write_text, real_fsync = papermill.execute_notebook, Path.write_text, os.fsync

    def execute(nb, out, **kw):       # the notebook finishes, then 10_x's disk is full
        real_execute(nb, out, **kw)
        written[Path(nb).stem] = (Path(out).parent / "metrics.json").read_text()

    def full(path):
        return Path(path).resolve().parent.name in written and Path(path).resolve().parent.name == "10_x"

    def write_text(self, *a, **kw):
        if full(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **kw)

    def fsync(fd):
        if full(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(os, "fsync", fsync)
    assert runner.main(["--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "10_x (smoke) ... FAILED" in out and "20_y (smoke) ... ok" in out
    assert f"disk full writing {outs / '10_x' / 'metrics.json'}; it is left as the notebook wrote it" in out
    assert (outs / "10_x" / "metrics.json").read_text() == written["10_x"]
    assert sorted(p.name for p in (outs / "10_x").iterdir()) == ["10_x.ipynb", "metrics.json"]
    assert "runner_key" in json.loads((outs / "20_y" / "metrics.json").read_text())["run"]


def test_a_dry_run_never_replaces_real_results():
    """01 in the smoke profile for real, then as a dry run: the real notebook and metrics stay where they were, the
    dry run's go to <nb>/dry_run/; a later real run removes that folder. (Real kernels: outputs/smoke/01_baselines.)"""
    env = {**os.environ, "VITADAPT_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "vitadapt.runner", "--profile", "smoke", "--nb", "01",
                                     "--force", *a], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    real = run()
    assert real.returncode == 0, real.stdout + real.stderr
    nb_dir = paths.OUTPUTS / "smoke" / "01_baselines"
    before = (nb_dir / "metrics.json").read_text()
    dry = run("-p", "dry_run", "yes")
    assert dry.returncode == 0 and "dry run (dry_run='yes')" in dry.stdout, dry.stdout + dry.stderr
    assert (nb_dir / "metrics.json").read_text() == before
    assert json.loads((nb_dir / "dry_run" / "metrics.json").read_text())["metrics"]["dry_run"] == "dry_run='yes'"
    assert (nb_dir / "dry_run" / "01_baselines.ipynb").exists()
    assert run().returncode == 0 and not (nb_dir / "dry_run").exists()
