"""vitadapt.golden: metrics compared with tolerances (fast, no torch)."""

import copy
import json

from vitadapt.golden import check, compare, golden_view, main, write


def blob():
    return {
        "metrics": {
            "dry_run": None,
            "plan": [{"variant": "explora", "trainable backbone": 114048, "fraction of backbone": 0.46716}],
            "test_acc": {"explora/linear probe": {"mean": 0.615, "std": 0.035, "n": 2}},
            "results": [{"table": "UpStep: target top-1", "method": "digits / upstep / linear probe",
                         "metric": "top-1 (%)", "mean": 61.5, "std": 3.5, "n": 2, "trainable": 11424,
                         "wall_time_s": 0.5}],
            "runs": [{"variant": "explora", "steps": 3, "backward_passes": 3, "final_loss": 6.0968,
                      "peak_memory_mb": 1054.0, "s_per_step": 0.12}],
            "cost": {"explora": {"steps": 3.0, "final_loss": 6.0968, "wall_time_s": 0.3}},
            "per_seed": [{"seed": 0, "eval": "kNN", "test_acc": 0.15, "selected": "k=10"}],
        },
        "run": {"notebook": "20_upstep", "config": {"profile": "smoke", "seeds": [0, 1], "lr": 0.005,
                                                     "out_dir": ""},
                "started": "2026-11-24T01:16:24+00:00", "wall_time_s": 13.1, "code_hash": "ab12",
                "git_commit": "a919fea", "packages": {"torch": "2.14.1"}, "host": {"cpus": 2}},
    }


def changed(path, value):
    b = copy.deepcopy(blob())
    node = b
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return b


def test_identical_blobs_agree():
    assert compare(blob(), blob(), "20_upstep") == []


def test_floats_within_tolerance_pass():
    b = changed(["metrics", "test_acc", "explora/linear probe", "mean"], 0.620)       # the 0.615 -> 0.620
    b["metrics"]["test_acc"]["explora/linear probe"]["std"] = 0.028
    b["metrics"]["runs"][0]["final_loss"] = 6.0968 * 1.04                              # a loss 4 % off
    b["metrics"]["results"][0]["mean"] = 61.5 + 3.125                                  # percent: one of 32 images
    assert compare(b, blob(), "20_upstep") == []


def test_float_beyond_tolerance_fails_with_a_readable_line():
    b = changed(["metrics", "test_acc", "explora/linear probe", "mean"], 0.70)
    assert compare(b, blob(), "20_upstep") == [
        "20_upstep: metrics.test_acc.explora/linear probe.mean: 0.7 vs golden 0.615 (tolerance 0.05 abs / 5% rel)"]


def test_percent_rows_get_a_percent_tolerance_and_losses_a_relative_one():
    b = changed(["metrics", "results"], [dict(blob()["metrics"]["results"][0], mean=55.0)])
    assert compare(b, blob(), "20_upstep") == [
        "20_upstep: metrics.results[0].mean: 55 vs golden 61.5 (tolerance 5 abs (percent) / 5% rel)"]
    b = changed(["metrics", "runs"], [dict(blob()["metrics"]["runs"][0], final_loss=6.0968 * 1.08)])
    assert compare(b, blob()) == [
        "metrics.runs[0].final_loss: 6.58454 vs golden 6.0968 (tolerance 5% rel, a loss)"]


def test_a_small_loss_gets_no_absolute_slack():
    g = {"metrics": {"runs": [{"final_cv_drift": 0.0006185, "loss_cluster": 0.0}]}}
    a = {"metrics": {"runs": [{"final_cv_drift": 0.0006185 * 1.00001, "loss_cluster": 0.0}]}}
    assert compare(a, g) == []                                     # another CPU's rounding
    a["metrics"]["runs"][0]["final_cv_drift"] = 0.03                 # within 0.05 abs, but 50x the golden
    assert len(compare(a, g)) == 1


def test_an_int_difference_fails():
    b = changed(["metrics", "runs"], [dict(blob()["metrics"]["runs"][0], backward_passes=4)])
    assert compare(b, blob(), "21") == ["21: metrics.runs[0].backward_passes: 4 vs golden 3 (exact)"]
    b = changed(["metrics", "plan"], [dict(blob()["metrics"]["plan"][0], **{"trainable backbone": 114049})])
    assert len(compare(b, blob())) == 1


def test_counts_stored_as_floats_are_exact():
    b = changed(["metrics", "cost", "explora", "steps"], 3.01)
    assert compare(b, blob()) == ["metrics.cost.explora.steps: 3.01 vs golden 3 (exact)"]


def test_a_spread_over_seeds_is_not_a_count():
    g = {"metrics": {"summary": [{"mean std (seeds)": 2.2, "n_seeds": 2}]}}
    a = {"metrics": {"summary": [{"mean std (seeds)": 2.22, "n_seeds": 2}]}}
    assert compare(a, g) == []
    a["metrics"]["summary"][0]["n_seeds"] = 3
    assert compare(a, g) == ["metrics.summary[0].n_seeds: 3 vs golden 2 (exact)"]


def test_nan_matches_only_nan():
    b = changed(["metrics", "cost", "explora", "steps"], float("nan"))
    assert compare(b, b) == []
    assert compare(b, blob()) == ["metrics.cost.explora.steps: nan vs golden 3"]
    b = changed(["metrics", "runs"], [dict(blob()["metrics"]["runs"][0], final_loss=float("nan"))])
    assert compare(b, blob()) == ["metrics.runs[0].final_loss: nan vs golden 6.0968"]


def test_strings_bools_and_none_are_exact():
    assert len(compare(changed(["metrics", "plan"], [dict(blob()["metrics"]["plan"][0], variant="lora")]), blob())) == 1
    assert len(compare(changed(["metrics", "dry_run"], False), blob())) == 1
    assert len(compare(changed(["run", "config", "profile"], "cpu"), blob())) == 1


def test_missing_and_extra_keys_and_list_lengths_fail():
    b = blob()
    del b["metrics"]["test_acc"]["explora/linear probe"]["std"]
    assert compare(b, blob(), "x") == ["x: metrics.test_acc.explora/linear probe.std: missing (golden 0.035)"]
    b = changed(["metrics", "extra"], 1)
    assert compare(b, blob()) == ["metrics.extra: not in the golden"]
    b = changed(["run", "config", "seeds"], [0])
    assert compare(b, blob()) == ["run.config.seeds: 1 items vs golden 2"]


def test_volatile_keys_are_ignored():
    b = blob()
    b["metrics"]["runs"][0].update(peak_memory_mb=2000.0, s_per_step=9.0)
    b["metrics"]["results"][0]["wall_time_s"] = 99.0
    b["metrics"]["cost"]["explora"]["wall_time_s"] = 99.0
    b["metrics"]["per_seed"][0]["selected"] = "k=20"             # chosen on validation
    b["run"].update(started="2030-01-01", wall_time_s=1.0, code_hash="ff", git_commit="dirty",
                    packages={"torch": "3.0"}, host={"cpus": 64}, papermill_wall_time_s=3.0)
    b["run"]["config"]["out_dir"] = "/somewhere/else"
    b["metrics"]["available"] = {"aid": False}                 # which datasets this machine holds (00)
    golden = blob()
    golden["metrics"]["available"] = {"aid": True}
    assert compare(b, golden) == []
    assert set(golden_view(blob())["run"]) == {"config"}


def test_write_then_check(tmp_path, capsys):
    out, gold = tmp_path / "outputs", tmp_path / "golden"
    (out / "20_upstep").mkdir(parents=True)
    (out / "20_upstep" / "metrics.json").write_text(json.dumps(blob()))
    assert main(["write", str(out), str(gold)]) == 0
    assert json.loads((gold / "20_upstep.json").read_text()) == golden_view(blob())
    assert main(["check", str(out), str(gold)]) == 0
    (out / "20_upstep" / "metrics.json").write_text(
        json.dumps(changed(["metrics", "test_acc", "explora/linear probe", "mean"], 0.9)))
    assert main(["check", str(out), str(gold)]) == 1
    assert "20_upstep: metrics.test_acc.explora/linear probe.mean: 0.9 vs golden 0.615" in capsys.readouterr().out
    (out / "20_upstep" / "metrics.json").unlink()
    diffs, _ = check(out, gold)
    assert diffs and "missing" in diffs[0]


def test_check_reports_metrics_not_rewritten_by_this_run(tmp_path):
    import os
    out, gold = tmp_path / "outputs", tmp_path / "golden"
    (out / "01_baselines").mkdir(parents=True)
    m = out / "01_baselines" / "metrics.json"
    m.write_text(json.dumps(blob()))
    write(out, gold)
    stamp = tmp_path / "stamp"
    stamp.touch()
    os.utime(m, (stamp.stat().st_mtime - 60,) * 2)
    diffs, _ = check(out, gold, newer_than=stamp)
    assert len(diffs) == 1 and "older than" in diffs[0]
