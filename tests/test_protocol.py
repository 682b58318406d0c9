"""The shared experiment protocol (vitadapt.protocol) and the one home of the papers' numbers (vitadapt.papers)."""

import json

import numpy as np
import pandas as pd
import pytest

from vitadapt import papers
from vitadapt.config import ExperimentConfig, build_config
from vitadapt.data import DataMissingError
from vitadapt.protocol import grid, report, tables
from vitadapt.protocol.setup import dry_run_reason, start


def test_papers_are_keyed_once_and_as_our_rows_name_them():
    keys = [(n.paper, n.table, n.method) for n in papers.ALL]
    assert len(keys) == len(set(keys))
    assert papers.value("ExPLoRA: linear probe", "explora") == 77.48
    assert papers.value("ExPLoRA: LoRA-r8 fine-tune", "frozen") == 78.08
    assert papers.value("RLRR: VTAB-1k group mean", "rlrr") == 74.5
    assert papers.value("RLRR: VTAB-1k structured", "lora") == 59.8
    assert papers.value("RLRR ablations: sides_residual", "both, residual") == 90.4
    assert papers.value("UpStep: target top-1", "aid / upstep / linear probe") is None      # UpStep publishes none
    assert papers.rlrr_vtab().loc["ssf", "mean"] == 73.1
    assert papers.rlrr_sides().loc["no residual", "left"] == 89.2
    assert papers.explora_table().loc[("linear probe", "ExPLoRA D-[L]-r64"), "fMoW-RGB top-1 (%)"] == 77.48


def test_paper_vs_ours_joins_our_rows_and_counts_them(tmp_path):
    for nb, rows in {"10_explora_dinov2": [report.result_row("ExPLoRA: linear probe", "explora", [0.5, 0.6])],
                     "30_rlrr": [report.result_row("RLRR: VTAB-1k group mean", "lora", [float("nan"), 0.4])]}.items():
        (tmp_path / nb).mkdir()
        (tmp_path / nb / "metrics.json").write_text(json.dumps({"metrics": {"results": rows}, "run": {}}))
    ours = report.collect("smoke", tmp_path)
    shown = report.paper_vs_ours(ours).set_index(["table", "method"])
    assert shown.loc[("ExPLoRA: linear probe", "explora"), "ours (mean ± std)"] == "55.0 ± 7.1 (n=2)"
    assert shown.loc[("ExPLoRA: linear probe", "explora"), "paper"] == 77.48
    assert shown.loc[("RLRR: VTAB-1k group mean", "lora"), "ours (mean ± std)"] == "40.0 ± 0.0 (n=1; 1 of 2 diverged)"
    assert pd.isna(shown.loc[("ExPLoRA: linear probe", "frozen"), "ours"])       # published, not run here
    assert report.joined(shown.reset_index()) == {"ExPLoRA: linear probe": 1, "RLRR: VTAB-1k group mean": 1}


def test_paper_vs_ours_puts_our_official_rows_beside_the_paper_number_they_match(tmp_path):
    """The published numbers were chosen the authors' way: our official row joins the same paper number as our clean
    one, each labelled with its protocol."""
    rows = [report.result_row("ExPLoRA: linear probe", "explora", [0.5, 0.6]),
            report.result_row("ExPLoRA: linear probe (official)", "explora", [0.6, 0.7]),
            report.result_row("ExPLoRA: linear probe (official harness, chosen on val)", "explora", [0.55, 0.65])]
    (tmp_path / "10_explora_dinov2").mkdir()
    (tmp_path / "10_explora_dinov2" / "metrics.json").write_text(json.dumps({"metrics": {"results": rows}, "run": {}}))
    shown = report.paper_vs_ours(report.collect("smoke", tmp_path))
    ex = shown[(shown["table"] == "ExPLoRA: linear probe") & (shown["method"] == "explora")]
    assert list(ex["protocol"]) == ["clean", "official", "official, chosen on val"]
    assert (ex["paper"] == 77.48).all() and list(ex["ours (mean ± std)"].str[:4]) == ["55.0", "65.0", "60.0"]


def test_result_rows_average_tasks_per_seed_and_name_rows():
    df = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 2, "task": ["t1", "t2"] * 3, "seed": [0, 0, 1, 1, 0, 0],
                       "test_acc": [0.2, 0.4, 0.4, 0.6, np.nan, np.nan]})
    rows = report.result_rows(df, lambda m: f"T {m}", ["method"], extra=lambda d: {"k": len(d)})
    assert [(r["table"], r["method"], r["n"], r["k"]) for r in rows] == [("T a", "a", 2, 4), ("T b", "b", 0, 2)]
    assert rows[0]["mean"] == pytest.approx(40.0) and rows[1]["status"] == "diverged"
    assert report.summary(df, ["method", "task"])["a/t1"]["n"] == 2


def test_one_factor_skips_the_default_and_repeats():
    cfg = build_config(ExperimentConfig, "smoke")
    out = grid.one_factor(cfg, [("img_size", (32, 64, 64), lambda v: f"size {v}"),
                                ("seeds", ((0, 1), (2,)), lambda v: f"seeds {v}")], canon=lambda f, v: tuple(v) if
                          isinstance(v, (list, tuple)) else v)
    assert out == [("size 64", {"img_size": 64}), ("seeds (2,)", {"seeds": (2,)})]
    assert grid.product(a=(1, 2), b="xy")[1] == {"a": 1, "b": "y"}


def test_run_jobs_takes_finished_jobs_from_the_store(tmp_path):
    from vitadapt.jobs import JobStore

    class R:
        jobs = JobStore(tmp_path)
    calls = []

    def work(job, ckpt):
        calls.append(job["seed"])
        return {"rows": [{"seed": job["seed"], "x": 1.0}], "log": f"seed {job['seed']}"}
    logged = []
    outs = grid.run_jobs(R, grid.product(seed=(0, 1)), work, log=logged.append)
    again = grid.run_jobs(R, grid.product(seed=(0, 1)), work, log=None)
    assert calls == [0, 1] and outs == again and logged == ["seed 0", "seed 1"]
    (rows,) = grid.frames(outs, "rows")
    assert list(rows["seed"]) == [0, 1]


def test_tables_name_diverged_groups():
    df = pd.DataFrame({"variant": ["f", "f", "e", "e", "d", "d"], "seed": [0, 1] * 3, "eval": ["lp"] * 6,
                       "test_acc": [0.5, 0.6, 0.7, np.nan, np.nan, np.nan]})
    t = tables.mean_std(df, "variant", "eval")
    assert t.loc["f", "lp"] == "0.550 ± 0.071" and t.loc["d", "lp"] == "diverged"
    assert t.loc["e", "lp"] == "0.700 ± 0.000 (1 of 2 diverged)"
    d = tables.paired_delta(df, "variant")
    assert list(d.index) == ["e", "d"] and d.loc["e", "lp"] == "+0.200 ± 0.000 (1 of 2 diverged)"
    shown = tables.show_lost(pd.DataFrame({"m": [1.0, np.nan]}), ["m"])
    assert list(shown["m"]) == [1.0, "diverged"]


def test_dry_run_decision_names_what_is_missing():
    cfg = build_config(ExperimentConfig, "smoke", dry_run="auto")

    def missing():
        raise DataMissingError("no AID here; see the README")
    assert dry_run_reason(cfg, {"dataset 'aid'": missing, "fine": lambda: None}) == \
        "not available here: dataset 'aid' (no AID here)"
    assert dry_run_reason(cfg) is None          # synthetic data is always there
    assert dry_run_reason(build_config(ExperimentConfig, "smoke", dry_run="yes")) == "dry_run='yes'"


def test_finish_always_writes_dry_run_and_results(tmp_path, capsys):
    S = start("00_x", ExperimentConfig, "smoke", quiet=True, out_dir=str(tmp_path / "00_x"))
    assert report.finish(S, {"a": 1}) is None
    blob = json.loads((tmp_path / "00_x" / "metrics.json").read_text())["metrics"]
    assert blob == {"a": 1, "dry_run": None, "results": []}
    assert "wrote" in capsys.readouterr().out
