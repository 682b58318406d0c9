"""The official ExPLoRA / DINOv2 evaluators (protocol/official_probe.py): the 28-classifier linear harness and the
kNN over k in {10, 20, 100, 200}, each reported as the official code picks (best on test) and as we pick (on val)."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from vitadapt.config import ExperimentConfig
from vitadapt.data import Splits
from vitadapt.eval import knn_predict
from vitadapt.protocol.official_probe import (OFFICIAL_BLOCKS, OFFICIAL_KNN, OFFICIAL_KNN_KS, OFFICIAL_KNN_T,
                                              OFFICIAL_KNN_VAL, OFFICIAL_LP, OFFICIAL_LP_VAL, OFFICIAL_LRS,
                                              ClassifierBank, OfficialProbeSettings, block_features, feature_slice,
                                              lp_iterations, official_knn, official_rows, probe_grid, scaled_lr,
                                              train_probe_bank)

pytestmark = pytest.mark.usefixtures("one_thread")


class Colors(torch.utils.data.Dataset):
    """4 classes of noisy solid colours: linearly separable even through a random ViT."""
    COLS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 220], [230, 220, 40]])

    def __init__(self, n, seed):
        self.targets, self.seed = [i % 4 for i in range(n)], seed

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        y = self.targets[i]
        return Image.fromarray(np.clip(self.COLS[y] + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)), y


def _splits():
    return Splits("colors", Colors(64, 0), Colors(24, 1), Colors(40, 2), ["r", "g", "b", "y"], "test colours")


def test_grid_is_the_official_28_classifiers_with_their_widths(tiny_vit):
    grid = probe_grid()
    assert len(grid) == 28 == len(OFFICIAL_BLOCKS) * 2 * len(OFFICIAL_LRS)
    assert OFFICIAL_LRS == (1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1) and OFFICIAL_BLOCKS == (1, 4)
    assert {(g["blocks"], g["avgpool"]) for g in grid} == {(1, False), (1, True), (4, False), (4, True)}
    assert sorted({g["lr"] for g in grid}) == list(OFFICIAL_LRS)
    D = 48
    bank = ClassifierBank(grid, D, num_classes=5)
    widths = {(g["blocks"], g["avgpool"]): h.in_features for g, h in zip(grid, bank.heads)}
    assert widths == {(1, False): D, (1, True): 2 * D, (4, False): 4 * D, (4, True): 5 * D}
    assert all(h.out_features == 5 for h in bank.heads)
    # the slices read the right tokens: 1 block = the last block's CLS, avgpool = the patch mean after it
    m = tiny_vit(depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = block_features(m, x, 4)
        tokens = m.forward_features(x)                    # after the final norm
    assert f.shape == (2, 5 * D)
    torch.testing.assert_close(f[:, feature_slice(1, False, D, 4)], tokens[:, 0])
    torch.testing.assert_close(f[:, feature_slice(1, True, D, 4)][:, D:], tokens[:, m.num_prefix_tokens:].mean(1))
    assert scaled_lr(0.1, 256) == 0.1 and scaled_lr(0.1, 128) == 0.05


@pytest.mark.parametrize("augment", [False, True])
def test_harness_learns_picks_and_leaves_the_backbone_alone(tiny_vit, augment):
    m = tiny_vit(depth=4).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = _splits()
    r = train_probe_bank(m, s.train, s.val, s.test, 4, img_size=32, batch_size=32, iterations=40, augment=augment)
    rows = r["rows"]
    assert len(rows) == 28 and r["batch_size"] == 32 and r["iterations"] == 40
    assert r["best_test"]["test_acc"] == max(x["test_acc"] for x in rows)
    best_val = max(rows, key=lambda x: x["val_acc"])
    assert r["best_val"] is best_val and r["best_val"]["test_acc"] == best_val["test_acc"]
    assert r["best_val"]["val_acc"] >= 0.9 and r["best_val"]["test_acc"] >= 0.9          # chance: 0.25
    assert sum(x["test_acc"] >= 0.9 for x in rows) >= 14
    assert {x["width"] for x in rows} == {48, 96, 192, 240}
    assert all(x["scaled_lr"] == x["lr"] * 32 / 256 for x in rows)
    # the backbone: same weights, no gradient, its mode restored
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters()) and m.training


def test_bad_inputs_fail_before_work(tiny_vit):
    s = _splits()
    with pytest.raises(ValueError, match="blocks=4 is not valid for a model of depth 2"):
        train_probe_bank(tiny_vit(depth=2), s.train, s.val, s.test, 4, img_size=32, iterations=1)
    with pytest.raises(ValueError, match="lrs="):
        probe_grid(lrs=())
    with pytest.raises(ValueError, match="iterations=0"):
        train_probe_bank(tiny_vit(depth=4), s.train, s.val, s.test, 4, img_size=32, iterations=0)
    with pytest.raises(ValueError, match="ks="):
        official_knn(np.eye(2), [0, 1], np.eye(2), [0, 1], np.eye(2), [0, 1], ks=(0,))


def test_official_knn_picks_k_by_test_and_we_by_val():
    rng = np.random.default_rng(0)
    Xtr, ytr = rng.normal(size=(60, 8)), rng.integers(0, 3, 60)
    Xq = rng.normal(size=(40, 8))
    p1, p5 = knn_predict(Xtr, ytr, Xq, 1), knn_predict(Xtr, ytr, Xq, 5)
    assert (p1 != p5).any()
    # val labels are k=1's predictions, test labels k=5's: test picks k=5, val picks k=1
    r = official_knn(Xtr, ytr, Xq, p1, Xq, p5, ks=(1, 5))
    assert r["best_test"]["k"] == 5 and r["best_test"]["test_acc"] == 1.0
    assert r["best_val"]["k"] == 1 and r["best_val"]["val_acc"] == 1.0 and r["best_val"]["test_acc"] < 1.0
    assert [x["k"] for x in r["rows"]] == [1, 5]
    assert OFFICIAL_KNN_KS == (10, 20, 100, 200) and OFFICIAL_KNN_T == 0.07


@dataclass
class _Cfg(ExperimentConfig, OfficialProbeSettings):
    pass


def test_settings_default_to_the_official_grid_and_iterations_follow_epochs():
    cfg = _Cfg()
    assert cfg.official_lp_lrs == OFFICIAL_LRS and cfg.official_lp_blocks == (1, 4)
    assert cfg.official_knn_ks == (10, 20, 100, 200) and cfg.official_knn_temperature == 0.07
    assert cfg.official_lp_batch_size == 256 and cfg.official_lp_augment and cfg.official_lp_eval_crop == 0.875
    assert lp_iterations(15000, 10.0, 256, 363_000) == 15000
    assert lp_iterations(0, 10.0, 256, 1000) == 30 and lp_iterations(0, 2.0, 256, 64) == 2
    with pytest.raises(ValueError, match="official_lp_lrs"):
        _Cfg(official_lp_lrs=(0.0,))


def test_official_rows(tiny_vit, private_feature_cache):
    cfg = _Cfg(official_lp_iterations=20, official_lp_batch_size=32, official_lp_augment=False,
               official_knn_ks=(1, 5), img_size=32)
    rows = official_rows(cfg, tiny_vit(depth=4), {"weights_used": "random", "arch": "tiny"}, _splits(), seed=3)
    assert [r["eval"] for r in rows] == [OFFICIAL_LP, OFFICIAL_LP_VAL, OFFICIAL_KNN, OFFICIAL_KNN_VAL]
    assert OFFICIAL_LP == "linear probe (official)" and OFFICIAL_KNN == "kNN (official)"
    assert all(r["seed"] == 3 and 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in rows)
    assert rows[0]["selected"].endswith("(best of 28 on test)") and "lr " in rows[0]["selected"]
    assert rows[1]["selected"].endswith("(best of 28 on val)")
    assert rows[2]["selected"].endswith("(best of 2 on test)") and rows[3]["selected"].startswith("k=")
    assert rows[0]["test_acc"] >= rows[1]["test_acc"] and rows[2]["test_acc"] >= rows[3]["test_acc"]


def test_recipe_rows_name_existing_fields_and_sources():
    from vitadapt import papers
    rows = [r for r in papers.RECIPES["ExPLoRA"] if r.part in ("linear probe (official harness)", "kNN (official)")]
    assert {r.part for r in rows} == {"linear probe (official harness)", "kNN (official)"} and len(rows) >= 15
    cfg = _Cfg()
    for r in rows:
        assert r.source.startswith("samar-khanna/ExPLoRA: "), r.what
        for f in filter(None, (n.strip() for n in r.field.split(","))):
            assert hasattr(cfg, f), (r.what, f)
    t = papers.recipe_table("ExPLoRA", cfg, ["linear probe (official harness)", "kNN (official)"])
    assert "official_lp_lrs=(0.0001, 0.001" in t.to_string()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_harness_on_cuda_in_bf16(tiny_vit):
    m = tiny_vit(depth=4)
    s = _splits()
    r = train_probe_bank(m, s.train, s.val, s.test, 4, img_size=32, batch_size=32, iterations=40, augment=True,
                         device="cuda", precision="bf16-mixed")
    assert len(r["rows"]) == 28 and r["best_val"]["test_acc"] >= 0.9
    assert next(m.parameters()).device.type == "cpu"                   # the backbone goes back where it was


def test_harness_is_deterministic_by_seed(tiny_vit):
    s = _splits()
    run = lambda seed: train_probe_bank(tiny_vit(depth=4), s.train, s.val, s.test, 4, img_size=32, batch_size=16,
                                        iterations=5, augment=True, seed=seed, blocks=(1, 2), lrs=(0.1, 1.0))["rows"]
    assert run(0) == run(0)
