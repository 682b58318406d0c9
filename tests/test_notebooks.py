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


TOP_MAX_WORDS = 160     # title + three-line abstract + the at-a-glance table; the reasoning goes below, by the results
GLANCE_ROWS = ("model", "data", "budget", "evaluation", "comparable")


def _words(text: str) -> list[str]:
    """Words as a reader counts them: tokens with a letter or digit (table pipes and rules are not words)."""
    import re
    return [w for w in text.split() if re.search(r"\w", w)]


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text``: its rows (the header first, the |---| rule dropped) as lists of cells."""
    import re
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.strip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                rows.append(cells)
            elif len(rows) == 1:
                rows.append(None)            # the rule under the header: marks a real table
        else:
            if len(rows) >= 2 and rows[1] is None:
                tables.append([rows[0]] + rows[2:])
            rows = []
    return tables


def check_notebook_top(top: str, number: str) -> list[str]:
    """What is wrong with a notebook's first cell: ``# NN · Title``, an abstract of at most three lines, then an
    at-a-glance table with a paper and a here column and rows for model, data, budget, evaluation and what is
    comparable; at most TOP_MAX_WORDS words in all. An empty list when the top is fine."""
    problems = []
    if not top.startswith(f"# {number}"):
        problems.append(f"it does not start with '# {number} · Title'")
    n = len(_words(top))
    if n > TOP_MAX_WORDS:
        problems.append(f"it has {n} words (at most {TOP_MAX_WORDS}): move the reasoning below, into a markdown "
                        f"cell next to the results it explains")
    glance = [t for t in _md_tables(top)
              if any(c.lower().startswith("paper") for c in t[0]) and any(c.lower().startswith("here") for c in t[0])]
    if not glance:
        problems.append("it has no at-a-glance table (a markdown table with a 'paper' and a 'here' column)")
    else:
        labels = [r[0].strip("* ").lower() for r in glance[0][1:] if r]
        missing = [want for want in GLANCE_ROWS if not any(label.startswith(want) or
                                                             (want == "comparable" and "comparable" in label)
                                                             for label in labels)]
        if missing:
            problems.append(f"its at-a-glance table lacks the rows {missing} (has {labels})")
        body = top.split("\n", 1)[1] if "\n" in top else ""
        abstract = [ln for ln in body.split("\n|", 1)[0].splitlines() if ln.strip()]
        if not abstract or len(abstract) > 3:
            problems.append(f"the abstract between the title and the table has {len(abstract)} lines (1 to 3)")
    return problems


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_notebook_top_is_short_and_has_an_at_a_glance_table(path):
    """A notebook opens on its title, a short abstract and a paper-vs-here table, then the parameters, so that a
    reader sees what it shows and how far it is comparable without scrolling past a wall of text."""
    nb = nbformat.read(path, 4)
    assert nb.cells[0].cell_type == "markdown"
    problems = check_notebook_top(nb.cells[0].source, path.stem[:2])
    assert not problems, f"{path.name}, cell 0: " + "; ".join(problems)


def test_the_top_check_rejects_a_wall_of_text_and_a_missing_table():
    good = ("# 10 · Title\n\nWhat it shows.\nThe answer.\n\n| | paper | here |\n|---|---|---|\n| model | a | b |\n"
            "| data | a | b |\n| budget | a | b |\n| evaluation | a | b |\n| comparable / not | a | b |")
    assert check_notebook_top(good, "10") == []
    assert any("words" in p for p in check_notebook_top(good + "\n\n" + "word " * 200, "10"))
    assert any("no at-a-glance table" in p for p in check_notebook_top("# 10 · Title\n\nJust prose.", "10"))
    no_rule = good.replace("|---|---|---|\n", "")
    assert any("no at-a-glance table" in p for p in check_notebook_top(no_rule, "10"))
    assert any("'budget'" in p for p in check_notebook_top(good.replace("| budget | a | b |\n", ""), "10"))
    assert any("abstract" in p for p in check_notebook_top(good.replace("The answer.", "a\nb\nc"), "10"))
    assert any("'# 11" in p for p in check_notebook_top(good, "11"))
