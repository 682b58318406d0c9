import json

import nbformat
import pytest

from vitadapt import paths, runner
from vitadapt.config import ExperimentConfig, build_config
from vitadapt.results import Run, atomic_write_text

from conftest import write_notebook


def _cfg(tmp_path, name="nb"):
    return build_config(ExperimentConfig, "smoke", out_dir=str(tmp_path / name))


def test_finish_moves_outputs_and_writes_a_run_record(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = Run("00_x", _cfg(tmp_path), quiet=True)
    run.use("data", {"dataset": "synthetic"})
    fig = plt.figure()
    run.save_figure(fig, "f.png")
    assert not (tmp_path / "nb" / "f.png").exists()          # nothing visible before finish
    path = run.finish({"acc": 0.5})
    blob = json.loads(path.read_text())
    assert blob["metrics"] == {"acc": 0.5}
    rec = blob["run"]
    assert rec["sources"] == {"data": {"dataset": "synthetic"}} and rec["config"]["profile"] == "smoke"
    assert {"git_commit", "packages", "config_hash", "code_hash", "wall_time_s"} <= set(rec)
    assert "torch" in rec["packages"]
    assert (tmp_path / "nb" / "f.png").exists()
    assert not list(tmp_path.glob(".nb.pending-*"))


def test_a_failed_run_leaves_the_previous_outputs_intact(tmp_path):
    first = Run("00_x", _cfg(tmp_path), quiet=True)
    first.path("table.csv").write_text("old")
    first.finish({"acc": 0.9})
    before = (tmp_path / "nb" / "metrics.json").read_text()
    second = Run("00_x", _cfg(tmp_path), quiet=True)
    second.path("table.csv").write_text("half-written new")
    # ... the notebook raises here and never calls finish()
    assert (tmp_path / "nb" / "table.csv").read_text() == "old"
    assert (tmp_path / "nb" / "metrics.json").read_text() == before


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "1")
    atomic_write_text(p, "2")
    assert p.read_text() == "2" and [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_runner_reports_a_failure_runs_the_rest_and_skips_unchanged(fake_repo, capsys):
    nbs, outs = fake_repo
    write_notebook(nbs / "01_fails.ipynb", code="raise RuntimeError('boom in notebook')")
    write_notebook(nbs / "02_works.ipynb", code="print('profile is', profile)")
    (outs / "smoke" / "01_fails").mkdir(parents=True)
    (outs / "smoke" / "01_fails" / "01_fails.ipynb").write_text("previous good result")
    assert runner.main(["--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "01_fails (smoke) ... FAILED" in out and "boom in notebook" in out
    assert "02_works (smoke) ... ok" in out and "1/2 notebooks ok" in out
    # the failed run is kept beside the previous result, which is untouched
    assert (outs / "smoke" / "01_fails" / "01_fails.ipynb").read_text() == "previous good result"
    assert (outs / "smoke" / "01_fails" / "01_fails.failed.ipynb").exists()
    executed = nbformat.read(outs / "smoke" / "02_works" / "02_works.ipynb", 4)
    assert "profile is smoke" in executed.cells[-1].outputs[0]["text"]
    assert not list((outs / "smoke").rglob(".*running*"))


def test_runner_selection_and_bad_values(fake_repo, capsys):
    nbs, _ = fake_repo
    write_notebook(nbs / "01_a.ipynb", code="pass")
    write_notebook(nbs / "02_b.ipynb", code="pass")
    assert [p.stem for p in runner.discover("02")] == ["02_b"]
    assert [p.stem for p in runner.discover("01_a,02")] == ["01_a", "02_b"]
    with pytest.raises(ValueError, match="NB='7' matches no notebook; valid: 01_a, 02_b"):
        runner.discover("7")
    with pytest.raises(SystemExit):
        runner.main(["--profile", "tpu"])
    assert "profile='tpu' is not valid; valid values: smoke, cpu, gpu, paper" in capsys.readouterr().err


def test_a_new_run_clears_pending_folders_of_dead_runs(tmp_path):
    stale = tmp_path / ".nb.pending-999999999"
    stale.mkdir(parents=True)
    (stale / "half.csv").write_text("x")
    Run("00_x", _cfg(tmp_path), quiet=True)
    assert not stale.exists()


def test_launch_rank_reads_torchrun_and_slurm(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert paths.launch_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert paths.launch_rank() == 0                  # a single SLURM task (salloc, sbatch without srun) is rank 0
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert paths.launch_rank() == 2
    monkeypatch.setenv("RANK", "3")                  # torchrun's variable wins
    assert paths.launch_rank() == 3
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK/SLURM_PROCID='x' is not valid"):
        paths.launch_rank()


def test_non_zero_ranks_never_write_over_rank_zero_outputs(fake_repo, monkeypatch):
    nbs, outs = fake_repo
    write_notebook(nbs / "02_works.ipynb", code="print('ok')")
    monkeypatch.setenv("RANK", "1")
    assert runner.main(["--profile", "smoke", "--force"]) == 0
    assert (outs / "smoke" / ".ranks" / "rank1" / "02_works" / "02_works.ipynb").exists()
    assert not (outs / "smoke" / "02_works").exists()
    run = Run("02_works", build_config(ExperimentConfig, "smoke"), quiet=True)
    assert run.finish({"acc": 1.0}) == outs / "smoke" / ".ranks" / "rank1" / "02_works" / "metrics.json"
    monkeypatch.setenv("RANK", "0")
    assert Run("02_works", build_config(ExperimentConfig, "smoke"), quiet=True).out_dir == outs / "smoke" / "02_works"


def test_the_runner_removes_partial_notebooks_of_killed_runs(fake_repo):
    nbs, outs = fake_repo
    write_notebook(nbs / "02_works.ipynb", code="print('ok')")
    out = outs / "smoke" / "02_works"
    out.mkdir(parents=True)
    (out / ".02_works.running-999999999.ipynb").write_text("{}")
    assert runner.main(["--profile", "smoke", "--nb", "02"]) == 0
    assert [p.name for p in out.glob(".*")] == []
