import json

import pytest

from vitadapt.launcher import Launcher, cell_progress, notebook_path, parse_value


@pytest.fixture(autouse=True)
def no_leaked_shell():
    """Output.append_display_data creates IPython's InteractiveShell singleton; left behind, it changes how
    ``with output:`` treats exceptions in later tests (it shows and swallows them). Remove it after each test."""
    from IPython.core.interactiveshell import InteractiveShell
    had = InteractiveShell.initialized()
    yield
    if not had and InteractiveShell.initialized():
        InteractiveShell.clear_instance()


def test_form_values_become_the_run_parameters():
    la = Launcher("01_baselines", profile="cpu")
    assert "profile" in la.widgets and "seeds" in la.widgets
    assert la.parameters() == {"profile": "cpu"}                 # empty fields: the profile decides
    la.widgets["seeds"].value = "[0, 1]"
    la.widgets["dataset"].value = "synthetic"
    la.widgets["compare_random"].value = "false"
    la.widgets["profile"].value = "smoke"
    assert la.parameters() == {"profile": "smoke", "seeds": [0, 1], "dataset": "synthetic", "compare_random": False}
    cmd = la.command()
    assert cmd[1:10] == ["-m", "vitadapt.runner", "--profile", "smoke", "--nb", "01_baselines", "--force",
                         "--progress", "off"]
    pairs = {cmd[i + 1]: json.loads(cmd[i + 2]) for i in range(10, len(cmd), 3)}
    assert pairs == {"seeds": [0, 1], "dataset": "synthetic", "compare_random": False}
    assert str(la.out_dir).endswith("outputs/smoke/01_baselines")


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="notebook='77' is not valid; valid values: 00_data_and_backbones"):
        notebook_path("77")
    with pytest.raises(ValueError, match="is not valid YAML"):
        parse_value("[0, 1")
    assert parse_value("") is None and parse_value("3") == 3


def test_progress_counts_completed_code_cells(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}},
                    {"cell_type": "code", "metadata": {"papermill": {"status": "completed"}}},
                    {"cell_type": "code", "metadata": {"papermill": {"status": "running"}}},
                    {"cell_type": "code", "metadata": {"papermill": {"status": "pending"}}}]}
    (tmp_path / "r.ipynb").write_text(json.dumps(nb))
    assert cell_progress(tmp_path / "r.ipynb") == (1, 3)
    assert cell_progress(tmp_path / "missing.ipynb") == (0, 0)


def test_a_form_value_in_scientific_notation_is_a_number():
    from vitadapt.launcher import parse_value
    assert parse_value("5e-4") == 0.0005 and parse_value("[1e-4, 3e-4]") == [0.0001, 0.0003]


# ---- the form: fields, picker, validation (no run) ---------------------------------------------------------

def _text(outputs) -> str:
    """Everything the output area holds, as one string (stream text and every mime type of display data)."""
    return "\n".join(o.get("text", "") + "\n".join(str(v) for v in o.get("data", {}).values()) for o in outputs)


def test_the_picker_rebuilds_the_fields_and_keeps_the_profile():
    from vitadapt.launcher import notebooks
    la = Launcher("01_baselines", profile="cpu")
    assert la.picker.options == tuple(p.stem for p in notebooks())
    assert "seeds" in la.widgets and "archs" not in la.widgets
    la.picker.value = "40_parameter_budgets"
    assert la.name == "40_parameter_budgets" and list(la.widgets) == ["profile", "archs", "methods"]
    assert la.widgets["profile"].value == "cpu"
    assert len(la.fields.children) == 3                                  # profile + two parameter rows
    la.widgets["archs"].value = '["ViT-B/16"]'
    assert la.command()[5:7] == ["--nb", "40_parameter_budgets"] and la.parameters()["archs"] == ["ViT-B/16"]
    assert str(la.out_dir).endswith("outputs/cpu/40_parameter_budgets")
    la.picker.value = "12_explora_ablations"                          # the runner sets interactive=False itself
    assert "ablate_rank" in la.widgets and "interactive" not in la.widgets
    from vitadapt.config import load_profile                          # an empty field shows the profile's value
    assert la.widgets["seeds"].placeholder == f"cpu: {json.dumps(load_profile('cpu', la.name)['seeds'])}"
    la.profile.value = "smoke"
    assert la.widgets["seeds"].placeholder == f"smoke: {json.dumps(load_profile('smoke', la.name)['seeds'])}"


def test_invalid_fields_are_reported_in_the_form_without_launching(monkeypatch):
    import subprocess

    def no_launch(*a, **k):
        raise AssertionError("launched despite invalid fields")
    monkeypatch.setattr(subprocess, "Popen", no_launch)
    la = Launcher("01_baselines", profile="smoke")
    la.widgets["seeds"].value = "[0, 1"
    la.widgets["img_size"].value = "big"
    la.widgets["compare_random"].value = "yes"
    la.widgets["dataset"].value = "synthetic"                          # a valid one is not reported
    assert la.launch() is None and la.process is None
    text = _text(la.output.outputs)
    assert "seeds: value '[0, 1' is not valid YAML" in text
    assert "img_size: 'big' is a str; this parameter takes a whole number" in text
    assert "compare_random: 'yes' is a str; this parameter takes true or false" in text
    assert "dataset" not in text
    assert "not launched" in la.status.value and "seeds" in la.status.value
    assert la.widgets["seeds"].layout.border and not la.widgets["dataset"].layout.border
    with pytest.raises(ValueError, match="seeds: value"):
        la.parameters()


def test_unknown_profiles_and_notebooks_are_named():
    with pytest.raises(ValueError, match="profile='tpu' is not valid; valid values: smoke, cpu, gpu, paper"):
        Launcher("01_baselines", profile="tpu")
    la = Launcher("90_results", profile="smoke")
    la.widgets["source_profile"].value = "tpu"
    assert la.problems() == {"source_profile": "'tpu' is not a profile; valid values: smoke, cpu, gpu, paper"}
    la.widgets["source_profile"].value = '""'
    assert la.problems() == {}
    la.picker.value = "99_launcher"
    la.widgets["target"].value = "77_nothing"
    assert "notebook='77_nothing' is not valid; valid values: 00_data_and_backbones" in la.problems()["target"]


# ---- following a run ---------------------------------------------------------------------------------------

def _notebook(done, total):
    cells = [{"cell_type": "code", "metadata": {"papermill": {"status": "completed" if i < done else "pending"}}}
             for i in range(total)]
    return json.dumps({"cells": cells})


def test_the_progress_bar_reads_its_own_runs_notebook_only(tmp_path):
    import types

    from vitadapt.launcher import _Run, running_file
    la = Launcher("01_baselines", profile="smoke")
    run = _Run("01_baselines", "smoke", tmp_path, types.SimpleNamespace(pid=1234), 0.0)
    assert run.running == running_file(tmp_path, "01_baselines", 1234) == tmp_path / ".01_baselines.running-1234.ipynb"
    (tmp_path / ".01_baselines.running-99999.ipynb").write_text(_notebook(3, 3))   # another runner, sorts last
    la._follow(run)
    assert (la.progress.value, la.progress.max) == (0, 1)             # ours is not there yet: nothing moves
    run.running.write_text(_notebook(1, 3))
    la._follow(run)
    assert (la.progress.value, la.progress.max) == (1, 3) and "cell 2 of 3" in la.status.value


def test_the_failing_cells_error_is_read_without_ansi_codes(tmp_path):
    from vitadapt.runner import notebook_error
    nb = {"cells": [{"cell_type": "markdown", "source": "x", "metadata": {}},
                    {"cell_type": "code", "execution_count": 1, "outputs": [], "metadata": {}},
                    {"cell_type": "code", "execution_count": 2, "metadata": {}, "outputs": [
                        {"output_type": "error", "ename": "ValueError", "evalue": "dataset='x' is not valid",
                         "traceback": ["\x1b[0;31mValueError\x1b[0m  Traceback", "\x1b[1;32m--> 3\x1b[0m f()\nline two"]}]}]}
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    err = notebook_error(tmp_path / "a.ipynb")
    assert err == {"cell": 2, "ename": "ValueError", "evalue": "dataset='x' is not valid",
                   "traceback": ["ValueError  Traceback", "--> 3 f()", "line two"]}
    assert notebook_error(tmp_path / "missing.ipynb") is None


# ---- real launches (smoke profile, through the runner; each ~10 s) -----------------------------------------

def test_a_successful_launch_shows_its_tables_and_a_summary():
    la = Launcher("01_baselines", profile="smoke")
    la.picker.value = "40_parameter_budgets"
    assert la.launch(wait=True).returncode == 0
    outs = la.output.outputs
    assert outs, "the output area stayed empty after a successful run"
    text = _text(outs)
    assert "40_parameter_budgets (smoke): ok in" in text and "1 table" in text
    assert "<h4>budgets.csv</h4><table" in text and "ExPLoRA" in text
    assert "done" in la.status.value and not la.button.disabled
    seen = la.run.progress                                  # it followed its own running notebook to the end
    assert seen and all(a[0] <= b[0] for a, b in zip(seen, seen[1:])), seen
    assert la.progress.max == seen[-1][1] > 1 and la.progress.value == la.progress.max


def test_a_failing_launch_shows_the_error_and_the_runners_log():
    la = Launcher("01_baselines", profile="smoke")
    la.widgets["dataset"].value = "no_such_dataset"
    failed = la.out_dir / "01_baselines.failed.ipynb"
    existed = failed.exists()
    try:
        assert la.launch(wait=True).returncode == 1
        outs = la.output.outputs
        assert outs, "the output area stayed empty after a failed run"
        text = _text(outs)
        assert "01_baselines (smoke): FAILED (exit 1)" in text
        errors = [o["text"] for o in outs if o.get("name") == "stderr"]
        assert errors and "ValueError: dataset='no_such_dataset' is not valid; valid values: aid" in errors[0]
        assert "of outputs/smoke/01_baselines/01_baselines.failed.ipynb" in errors[0] and "\x1b[" not in errors[0]
        assert "the runner's log (last" in text and "1 FAILED" in text
        assert "FAILED" in la.status.value and la.progress.bar_style == "danger"
    finally:
        if not existed:
            failed.unlink(missing_ok=True)
