import json

import pytest

from vitadapt.launcher import Launcher, cell_progress, notebook_path, parse_value


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
    assert cmd[1:8] == ["-m", "vitadapt.runner", "--profile", "smoke", "--nb", "01_baselines", "--force"]
    pairs = {cmd[i + 1]: json.loads(cmd[i + 2]) for i in range(8, len(cmd), 3)}
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
