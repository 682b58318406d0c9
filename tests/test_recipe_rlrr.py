"""RLRR's official VTAB-1k recipe (issue 13, R1-R9): the paper profile's values, the orig_in21k weights, the
per-epoch schedule with cool-down, the zero head, the per-task table and where the branch dropout sits."""

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from vitadapt import papers
from vitadapt.config import build_config
from vitadapt.eval import eval_transform, normalization
from vitadapt.experiments import rlrr as X
from vitadapt.experiments import rlrr_recipe as R
from vitadapt.finetune import TensorSet, finetune_classifier, materialize, train_transform
from vitadapt.models import WEIGHTS

TINY = dict(weights="random", arch="vit_tiny_patch16_224", img_size=32,
            arch_kwargs={"patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 2})
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class _Gray(torch.utils.data.Dataset):
    """PIL images of one grey value (64 / 255) and label 0."""
    targets = [0, 0]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return Image.fromarray(np.full((20, 20, 3), 64, np.uint8)), 0


def _ti(cfg, task, n=(16, 8, 8), classes=4):
    """A TaskInputs of random tensor images (no download)."""
    g = torch.Generator().manual_seed(0)
    part = lambda k: TensorSet(torch.randn(k, 3, cfg.img_size, cfg.img_size, generator=g), [i % classes for i in range(k)])
    from vitadapt.data import Splits
    s = Splits(task, part(n[0]), part(n[1]), part(n[2]), [str(c) for c in range(classes)], "test")
    return X.TaskInputs(task, cfg.group_of(task), s, None, classes, s.record(), 0.0)


def test_paper_recipe_has_no_label_smoothing_and_half_normalisation_in_its_transforms():
    cfg = build_config(X.RLRRConfig, "paper", "30_rlrr")
    assert cfg.label_smoothing == 0.0 and cfg.normalize == "half" and cfg.batch_size == 32
    assert normalization(cfg.normalize) == HALF and normalization("imagenet")[0] == (0.485, 0.456, 0.406)
    want = (64 / 255 - 0.5) / 0.5
    for t in (eval_transform(16, HALF), train_transform(16, HALF, crop=False)):
        assert torch.allclose(t(_Gray()[0][0]), torch.full((3, 16, 16), want), atol=1e-5)
    assert torch.allclose(materialize(_Gray(), 16, norm=HALF).x, torch.full((2, 3, 16, 16), want), atol=1e-5)
    assert not torch.allclose(eval_transform(16)(_Gray()[0][0]), torch.full((3, 16, 16), want), atol=1e-2)
    # the fine-tune kwargs of a paper-recipe arm carry both
    small = X.RLRRConfig(**TINY, tasks=("vtab1k:dtd",), groups={"natural": ["vtab1k:dtd"]}, hparams="official",
                         normalize="half", label_smoothing=0.0, drop_path=0.0)
    vit, _ = X.load_vit(small, verbose=False)
    kw = X._arm(small, vit, _ti(small, "vtab1k:dtd"), "rlrr", {})
    assert kw["norm"] == HALF and kw["label_smoothing"] == 0.0
    assert normalization("weights", vit) == tuple(map(tuple, (vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"])))
    with pytest.raises(ValueError, match="normalize='x' is not valid; valid values: 'imagenet', 'half', 'weights'"):
        normalization("x")


def test_orig_in21k_weight_source_is_the_original_google_release():
    src = WEIGHTS["vitb16_orig_in21k"]
    name = f"{src.arch}.{src.hub_tag}"
    assert name == "vit_base_patch16_224.orig_in21k" and src.kind == "hub"
    pc = timm.models.get_pretrained_cfg(name)
    assert pc.hf_hub_id == "timm/vit_base_patch16_224.orig_in21k" and tuple(pc.mean) == (0.5, 0.5, 0.5)
    for nb in ("30_rlrr", "31_rlrr_ablations"):
        assert build_config(X.RLRRConfig, "paper", nb).weights == "vitb16_orig_in21k"


def _official_loop_lrs(lr, epochs=100, warmup=10, cooldown=10, warmup_lr=1e-7, min_lr=1e-8):
    """The lr of every epoch as train_vtab.py sets it: timm's CosineLRScheduler (create_scheduler's arguments),
    step_update a no-op (per-epoch scheduler), step(epoch) after each epoch."""
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    s = CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=warmup_lr,
                          warmup_prefix=False, cycle_limit=1, t_in_epochs=True)
    out = []
    for e in range(epochs + cooldown):
        out.append(opt.param_groups[0]["lr"])
        s.step_update(num_updates=e)
        s.step(e)
    return out


def test_official_lr_schedule_per_epoch_with_warmup_from_1e7_and_cooldown():
    lr, spe = 2e-3, 31
    make = R.lr_schedule(epochs=100, warmup_epochs=10, cooldown_epochs=10, warmup_lr=1e-7, min_lr=1e-8,
                         lr_step="epoch")
    f = make(110 * spe, spe, lr)
    ours = [lr * f(e * spe + k) for e in range(110) for k in (0, spe - 1)]      # constant within an epoch
    ref = _official_loop_lrs(lr)
    assert np.allclose(ours[::2], ref, rtol=1e-12) and np.allclose(ours[1::2], ref, rtol=1e-12)
    assert ours[0] == pytest.approx(1e-7) and lr * f(spe) == pytest.approx(1e-7)           # epochs 0 and 1
    assert lr * f(2 * spe) == pytest.approx(1e-7 + (lr - 1e-7) / 10)                      # epoch 2: t = 1
    assert lr * f(11 * spe) == pytest.approx(1e-8 + 0.5 * (lr - 1e-8) * (1 + math.cos(math.pi * 0.1)))
    assert all(lr * f(e * spe) == pytest.approx(1e-8) for e in range(101, 110))          # cool-down at min_lr
    g = R.lr_schedule(epochs=100, warmup_epochs=10, lr_step="step")(100 * spe, spe, lr)
    assert g(5 * spe) == pytest.approx(0.5) and g(5 * spe + 1) > g(5 * spe)           # per step, no lag
    assert g(10 * spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    with pytest.raises(ValueError, match="lr_step='x' is not valid"):
        R.lr_schedule(epochs=1, warmup_epochs=0, lr_step="x")


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(x.flatten(1))


def test_the_schedule_reaches_fit_through_finetune_classifier():
    torch.manual_seed(0)
    model = _Linear()
    ds = TensorSet(torch.randn(20, 3, 2, 2), [i % 3 for i in range(20)])
    make = R.lr_schedule(epochs=3, warmup_epochs=1, cooldown_epochs=1, warmup_lr=1e-4, min_lr=1e-5, lr_step="epoch")
    r = finetune_classifier(model, ds, {}, num_classes=3, img_size=2, lr=1e-2, epochs=4, batch_size=8,
                            lr_schedule=make, label_smoothing=0.0)
    lrs = [h["lr"] for h in r["history"]]                 # 2 steps per epoch (20 // 8), 4 epochs
    assert r["steps"] == 8 and lrs[:4] == pytest.approx([1e-4] * 4)
    assert lrs[4:6] == pytest.approx([1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi / 3))] * 2)
    assert lrs[6:] == pytest.approx([1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(2 * math.pi / 3))] * 2)


def test_the_head_starts_at_zero():
    cfg = X.RLRRConfig(**TINY, tasks=("vtab1k:dtd",), groups={"natural": ["vtab1k:dtd"]}, head_init="zero",
                       drop_path=0.0)
    vit, _ = X.load_vit(cfg, verbose=False)
    for method in ("rlrr", "lora", "full"):
        m = X._arm(cfg, vit, _ti(cfg, "vtab1k:dtd"), method, cfg.kwargs(method))["make_model"]()
        assert m.head.weight.abs().sum() == 0 and m.head.bias.abs().sum() == 0 and m.head.weight.requires_grad
    assert build_config(X.RLRRConfig, "paper", "30_rlrr").head_init == "zero"
    random = X._arm(X.RLRRConfig(**TINY, drop_path=0.0), vit, _ti(cfg, "vtab1k:dtd"), "rlrr", {})["make_model"]()
    assert random.head.weight.abs().sum() > 0


def test_official_hparams_use_the_per_task_table_without_a_grid(monkeypatch):
    assert len(R.RLRR_VTAB_TASKS) == 19 and sum(t.flip for t in R.RLRR_VTAB_TASKS.values()) == 10
    assert R.official_task("vtab1k:kitti") == R.OfficialTask(3e-3, 5e-2, 0.3, True)
    cfg = X.RLRRConfig(**TINY, tasks=("vtab1k:dtd",), groups={"natural": ["vtab1k:dtd"]}, methods=("rlrr", "linear"),
                       hparams="official", drop_path=0.0, n_train=16, n_val=8, n_test=8, epochs=1, batch_size=8,
                       seeds=(0,), lr_multipliers=(0.5, 2.0))
    assert cfg.points("vtab1k:dtd") == [{"lr": 2e-3, "weight_decay": 5e-5}] and len(cfg.points("vtab1k:dtd", "linear")) == 2
    assert cfg.task_augment("vtab1k:dtd") == "flip" and cfg.task_augment("vtab1k:cifar") is False
    monkeypatch.setattr(X, "load_task", lambda c, task, probe=False: _ti(c, task).splits)
    df, grid = X.run_benchmark(cfg, log=lambda *a: None)
    r = df[df.method == "rlrr"].iloc[0]
    assert (r["lr"], r["weight_decay"]) == (2e-3, 5e-5) and np.isnan(r["val_acc"])          # fixed, nothing on val
    g = grid[grid.method == "rlrr"]
    assert len(g) == 1 and g["val_acc"].isna().all() and (g["steps"] == 0).all()          # no selection run
    assert len(grid[grid.method == "linear"]) == 2 and grid[grid.method == "linear"]["val_acc"].notna().all()
    with pytest.raises(ValueError, match="task 'fgvc:cub' has no official RLRR VTAB-1k setting"):
        X.RLRRConfig(tasks=("fgvc:cub",), groups={"fgvc": ["fgvc:cub"]}, hparams="official", drop_path=0.0)
    with pytest.raises(ValueError, match="set drop_path=0"):
        X.RLRRConfig(tasks=("vtab1k:dtd",), groups={"natural": ["vtab1k:dtd"]}, hparams="official")


def test_branch_dropout_sits_on_the_residual_branches_rising_over_the_blocks():
    cfg = X.RLRRConfig(**TINY, tasks=("vtab1k:clevr_count",), groups={"structured": ["vtab1k:clevr_count"]},
                       hparams="official", drop_path=0.0)
    vit, _ = X.load_vit(cfg, verbose=False)
    m = X._arm(cfg, vit, _ti(cfg, "vtab1k:clevr_count"), "rlrr", {})["make_model"]()
    want = torch.linspace(0, 0.5, 4).tolist()                    # clevr_count: 0.5 in the last block
    for blk, p in zip(m.blocks, want):
        for d in (blk.drop_path1, blk.drop_path2):
            assert type(d) is nn.Dropout and d.p == pytest.approx(p)
    # element-wise on the branch outputs, before each residual sum: x + drop(attn(norm1(x))), then the MLP's
    blk = m.blocks[-1].train()
    x = torch.randn(2, 5, 48)
    torch.manual_seed(1)
    y = blk(x)
    torch.manual_seed(1)
    a = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    assert torch.allclose(y, a + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(a)))))
    mask = blk.drop_path1(torch.ones(4, 5, 48)) == 0
    assert 0.3 < mask.float().mean() < 0.7 and not mask.all(-1).all(-1).any()     # elements, not whole samples
    tail = R.set_branch_dropout(X.TailViT(vit, 2), 0.3, depth=4)           # the last two of four blocks
    assert [b.drop_path1.p for b in tail.blocks] == pytest.approx(torch.linspace(0, 0.3, 4).tolist()[2:])
    assert X.RLRRConfig(**TINY, drop_path=0.0).recipe_model(vit, "x", 4) is vit     # ours: nothing replaced


def test_recipe_rows_name_every_value_and_their_fields():
    rows = [r for r in papers.RECIPES["RLRR"]]
    whats = " ".join(r.what for r in rows).lower()
    for w in ("optimiser", "betas", "learning rate", "weight decay", "schedule", "warm-up", "cool-down", "epochs",
              "batch", "label smoothing", "dropout", "drop-path", "normalisation", "resolution", "flip", "head",
              "weights", "scales", "trains", "evaluation"):
        assert w in whats, w
    assert all(r.source.startswith("zstarN70/RLRR: ") or r.official == "not public" for r in rows)
    cfg = build_config(X.RLRRConfig, "paper", "30_rlrr")
    fields = {n.strip() for r in rows for n in r.field.split(",") if n.strip()}
    assert all(hasattr(cfg, f) for f in fields), [f for f in fields if not hasattr(cfg, f)]
    t = papers.recipe_table("RLRR", cfg)
    assert "normalize='half'" in " ".join(t["ours (this run)"])
