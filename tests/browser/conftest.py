"""The browser tests run only when asked for by path (``pytest tests/browser``, as ``make test-browser`` does).

``pytest tests`` (``make test-lib``) deselects them, so ``make test`` does not run them twice; the summary line
counts them as deselected.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _asked_for(config) -> bool:
    for arg in config.args:
        p = Path(arg.split("::")[0]).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _asked_for(config):
        return
    mine = [it for it in items if HERE in Path(str(it.path)).resolve().parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [it for it in items if it not in mine]
