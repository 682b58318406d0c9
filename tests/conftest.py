import os

import pytest
import torch

os.environ.setdefault("VITADAPT_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# trained products (vitadapt.protocol.products) are not shared between tests: a test that trains twice trains twice;
# tests/test_product_cache.py turns them on in a temporary VITADAPT_CACHE
os.environ.setdefault("VITADAPT_PRETRAIN_CACHE", "0")
os.environ.setdefault("VITADAPT_UPSTEP_CACHE", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_vit():
    import timm

    def make(num_classes=0, depth=2, **kw):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                                 embed_dim=48, num_heads=2, num_classes=num_classes, **kw)
    return make


@pytest.fixture
def shared_aid():
    from vitadapt.data import DataMissingError, find_root
    try:
        return find_root("aid")
    except DataMissingError as e:  # the CI machine and every developer have ../shared/data/aid
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is ~10x faster than two on a shared 2-core machine, and deterministic.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def private_feature_cache(tmp_path, monkeypatch):
    """Frozen-feature caches of a test go to a temporary folder, not outputs/cache."""
    monkeypatch.setattr("vitadapt.eval.CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def write_notebook(path, params="profile = 'cpu'", code="pass"):
    """A two-cell notebook: a ``parameters``-tagged cell, then ``code`` (what the runner tests execute)."""
    import nbformat
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """The runner pointed at an empty notebooks/ and outputs/ under tmp_path, as rank 0: (notebooks, outputs)."""
    from vitadapt import paths, runner
    nbs, outs = tmp_path / "notebooks", tmp_path / "outputs"
    nbs.mkdir()
    monkeypatch.setattr(runner, "NOTEBOOKS", nbs)
    monkeypatch.setattr(paths, "OUTPUTS", outs)
    for var in ("RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    return nbs, outs
