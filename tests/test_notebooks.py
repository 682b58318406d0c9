"""Static checks of the notebooks: parameters papermill can read, a header, and golden copies in sync."""

import nbformat
import pytest

from vitadapt.paths import NOTEBOOKS, REPO_ROOT

NBS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
GOLDEN = REPO_ROOT / "tests" / "golden"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_parameters_are_typed_and_documented(path):
    import papermill as pm
    params = pm.inspect_notebook(str(path))
    assert "profile" in params
    for name, p in params.items():
        assert p["help"], f"{path.name}: parameter {name} has no help comment"
        assert p["inferred_type_name"] != "None", f"{path.name}: parameter {name} has no type annotation"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_notebook_opens_with_what_it_reproduces(path):
    nb = nbformat.read(path, 4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {path.stem[:2]}")
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    assert "= start(NOTEBOOK," in nb.cells[2].source, "the second cell builds the config and the setup"
    assert nb.cells[-1].source.lstrip().startswith(("finish(S", "path = finish(S")) or \
        "\nfinish(S" in nb.cells[-1].source or "\npath = finish(S" in nb.cells[-1].source, "the last cell writes the report"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_notebooks_stay_thin(path):
    """No private library names, no reading the run record's sources, no plotting of results inline: figures come
    from the library, and the run record is written through the protocol."""
    import re
    code = "\n".join(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code")
    assert not re.search(r"\b[A-Za-z]+\._[a-z]\w*", code), re.findall(r"\b[A-Za-z]+\._[a-z]\w*", code)
    assert "run.sources" not in code and ".sources[" not in code
    assert not re.search(r"\b(sns\.|plt\.subplots|\.plot\.|\.barplot\(|\.scatter\()", code), path.name


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_golden_is_in_sync_with_its_notebook(path):
    golden = GOLDEN / path.name
    assert golden.exists(), f"no golden for {path.name}: run `make golden`"
    src = [c.source for c in nbformat.read(path, 4).cells]
    gold = [c.source for c in nbformat.read(golden, 4).cells if "injected-parameters" not in c.metadata.get("tags", [])]
    assert src == gold, f"{path.name} changed since its golden was made: run `make golden` and review the diff"
