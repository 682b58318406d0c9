"""ExPLoRA's DinoV2 extended pre-training recipe (issue 13): KoLeo summed over the two global crops, DINOv2's
layer-wise LR decay and weight-decay rules, the prototype layer frozen for a window, the mask token frozen (or loaded
from a local DINOv2 checkpoint), per-module gradient clipping, student drop-path, and the paper profile's values."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
from torch.utils.data import DataLoader, Dataset

from vitadapt.config import build_config
from vitadapt.experiments.explora import ExploraConfig
from vitadapt.ssl import continued, recipe
from vitadapt.ssl.dinov2 import DinoV2Augment, DinoV2Objective
from vitadapt.train import Diverged, fit, make_fabric, seed_everything

IMG, PATCH, LOCAL, B = 32, 8, 16, 4
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=2,
                             embed_dim=64, num_heads=2, num_classes=0, dynamic_img_size=True)


def settings(**kw) -> continued.PretrainSettings:
    """Small DinoV2 pre-training settings (heads of 32 prototypes)."""
    base = dict(objective="dinov2", pretrain_steps=3, pretrain_batch_size=B, pretrain_lr=1e-3, pretrain_warmup=0,
                n_prototypes=32, head_hidden_dim=32, head_bottleneck_dim=16, n_local_crops=2, local_size=LOCAL)
    return continued.PretrainSettings(**{**base, **kw})


class _Views(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 40, 40, generator=g)
        self.t = DinoV2Augment(global_size=IMG, local_size=LOCAL, n_local=2)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from torchvision.transforms.functional import to_pil_image
        return self.t(to_pil_image(self.x[i])), 0


@pytest.fixture(scope="module")
def batch():
    seed_everything(0)
    return next(iter(DataLoader(_Views(B), batch_size=B)))


def test_koleo_is_the_sum_over_the_two_global_crops(batch):
    from lightly.loss import KoLeoLoss
    obj = DinoV2Objective(tiny_vit(), total_steps=3, n_prototypes=32, hidden_dim=32, bottleneck_dim=16, seed=0)
    seen = []
    obj.koleo_loss.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    _, logs = obj.loss(batch)
    assert len(seen) == 2 and seen[0].shape == (B, 64)
    by_hand = sum(float(KoLeoLoss()(x)) for x in seen)
    assert float(logs["koleo"]) == pytest.approx(by_hand, rel=1e-5)      # the old code logged by_hand / 2


def test_layer_ids_and_multipliers_follow_dinov2():
    L = 24
    assert recipe.layer_id("blocks.3.attn.q.lora_A.default.weight", L) == 4
    assert recipe.layer_id("base_model.model.blocks.23.mlp.fc1.weight", L) == 24
    assert recipe.layer_id("cls_token", L) == recipe.layer_id("patch_embed.proj.weight", L) == 0
    assert recipe.layer_id("norm.weight", L) == L + 1
    assert recipe.lr_multiplier("blocks.0.attn.qkv.weight", L, 0.9) == pytest.approx(0.9 ** 24)
    assert recipe.lr_multiplier("blocks.23.attn.qkv.weight", L, 0.9) == pytest.approx(0.9)
    assert recipe.lr_multiplier("patch_embed.proj.weight", L, 0.9, 0.2) == pytest.approx(0.9 ** 25 * 0.2)
    assert [recipe.wd_multiplier(n) for n in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.ls1.gamma",
                                              "blocks.0.attn.qkv.weight", "cls_token")] == [0, 0, 0, 1, 1]


def test_param_groups_of_the_objective():
    vit = tiny_vit().requires_grad_(True)
    obj = DinoV2Objective(vit, total_steps=3, n_prototypes=32, hidden_dim=32, bottleneck_dim=16, seed=0)
    kw = continued.fit_hooks(settings(layer_decay=0.9, patch_embed_lr_mult=0.2), obj)
    groups = kw["param_groups"](obj)
    scale = {id(p): (g["lr_scale"], g["wd_scale"]) for g in groups for p in g["params"]}
    n = dict(vit.named_parameters())
    L = 2                                                   # official: decay ** (L + 1 - layer id)
    assert scale[id(n["blocks.0.attn.qkv.weight"])] == pytest.approx((0.9 ** L, 1.0))      # first block: id 1
    assert scale[id(n["blocks.1.attn.qkv.weight"])] == pytest.approx((0.9 ** 1, 1.0))      # last block: id L
    assert scale[id(n["blocks.1.norm1.weight"])] == pytest.approx((0.9, 0.0))
    assert scale[id(n["patch_embed.proj.weight"])] == pytest.approx((0.9 ** (L + 1) * 0.2, 1.0))
    assert scale[id(n["cls_token"])] == pytest.approx((0.9 ** (L + 1), 1.0))
    assert scale[id(n["norm.weight"])] == pytest.approx((1.0, 0.0))
    head = dict(obj.dino_head.named_parameters())
    assert scale[id(head["last_layer.weight_v"])] == pytest.approx((1.0, 1.0))
    assert scale[id(head["layers.0.bias"])] == pytest.approx((1.0, 0.0))
    assert scale[id(obj.mask_token)][0] == pytest.approx(0.9 ** (L + 1))
    assert len(scale) == sum(p.requires_grad for p in obj.parameters())


def test_schedules_follow_dinov2():
    lr = recipe.dinov2_lr(10, 2, 1e-3)
    assert [lr(0), lr(1), lr(2)] == pytest.approx([0.0, 0.5, 1.0])
    assert lr(10) == pytest.approx(1e-3)
    assert recipe.cosine_value(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert recipe.cosine_value(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert recipe.cosine_value(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    kw = continued.fit_hooks(settings(pretrain_weight_decay_end=0.4, pretrain_steps=100), DinoV2Objective(
        tiny_vit(), total_steps=3, n_prototypes=32, hidden_dim=32, bottleneck_dim=16))
    assert kw["wd_schedule"](100) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="layer_decay"):
        recipe.dinov2_param_groups(DinoV2Objective(tiny_vit(), total_steps=1, n_prototypes=32, hidden_dim=32,
                                                   bottleneck_dim=16), layer_decay=0.0)


def test_last_layer_frozen_inside_the_window_only():
    seed_everything(0)
    s = settings(freeze_last_layer_steps=2, pretrain_steps=4)
    obj, loss_fn, on_step = continued.build_objective(s, tiny_vit(), 0)
    kw = continued.fit_hooks(s, obj)
    last = recipe.last_layers(obj)
    assert len(last) == 2                                   # weight_g, weight_v of the shared DINO/iBOT head
    grads, values = [], [[p.detach().clone() for p in last]]
    inner = kw.pop("before_step")

    def before_step(step, module):
        inner(step, module)
        grads.append(all(p.grad is None for p in last))

    def record(step, module):
        on_step(step, module)
        values.append([p.detach().clone() for p in last])
    fit(make_fabric("cpu"), obj, loss_fn, DataLoader(_Views(2 * B), batch_size=B), steps=4, lr=1e-2,
        on_step=record, before_step=before_step, **kw)
    assert grads == [True, True, False, False]
    moved = [any(not torch.equal(a, b) for a, b in zip(values[i], values[i + 1])) for i in range(4)]
    assert moved == [False, False, True, True]


def test_per_module_clipping_clips_each_part_to_the_norm():
    obj = DinoV2Objective(tiny_vit().requires_grad_(True), total_steps=1, n_prototypes=32, hidden_dim=32,
                          bottleneck_dim=16)
    before_step = continued.fit_hooks(settings(grad_clip=1.0, grad_clip_mode="per_module"), obj)["before_step"]
    assert continued.fit_hooks(settings(grad_clip=1.0, grad_clip_mode="per_module"), obj)["grad_clip"] is None
    parts = recipe.student_parts(obj)
    for scale, params in zip((100.0, 0.001), parts):        # backbone far above the norm, head far below
        for p in params:
            p.grad = torch.full_like(p, scale)
    small = [p.grad.clone() for p in parts[1]]
    before_step(0, obj)
    norm = lambda ps: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps))   # noqa: E731
    assert norm(parts[0]) == pytest.approx(1.0, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(small, parts[1]))         # a global clip would scale these
    parts[1][0].grad.fill_(float("nan"))
    with pytest.raises(Diverged, match="non-finite gradient norm"):
        before_step(1, obj)


def test_mask_token_frozen_or_loaded_from_a_local_checkpoint(tmp_path):
    obj, _, _ = continued.build_objective(settings(mask_token="frozen"), tiny_vit(), 0)
    assert not obj.mask_token.requires_grad and not obj.mask_token.any()
    token = torch.randn(1, 64)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save({"mask_token": token, "cls_token": torch.zeros(1, 1, 64)}, path)
    s = settings(mask_token="frozen")
    s.weights = str(path)
    obj, _, _ = continued.build_objective(s, tiny_vit(), 0)
    assert torch.equal(obj.mask_token.detach(), token.flatten()) and not obj.mask_token.requires_grad
    assert "the checkpoint's mask token" in continued.starting_point(s, str(path), "vit_tiny")
    assert "zeros" in continued.starting_point(settings(), "dinov2_vitl14", "vit_large_patch14_dinov2")


def test_student_drop_path_and_teacher_without(batch):
    from timm.layers import DropPath
    obj, _, _ = continued.build_objective(settings(pretrain_drop_path=0.3), tiny_vit(), 0)
    assert isinstance(obj.student.blocks[1].drop_path1, DropPath)
    assert [b.drop_path1.drop_prob for b in obj.student.blocks] == [0.3] * len(obj.student.blocks)  # uniform (DINOv2)
    obj.train()
    assert obj.student.training and not obj.teacher.training
    kept = continued.kept_backbone(obj, settings(pretrain_drop_path=0.3))
    assert not any(isinstance(m, DropPath) for m in kept.modules())


@pytest.mark.parametrize("notebook", ["10_explora_dinov2", "12_explora_ablations"])
def test_paper_profile_has_the_official_values(notebook):
    cfg = build_config(ExploraConfig, "paper", notebook, dry_run="yes")
    assert cfg.pretrain_batch_size * cfg.devices * cfg.pretrain_accumulate == 1024 and cfg.accumulate_grad_batches == 1
    assert (cfg.pretrain_batch_size, cfg.devices, cfg.pretrain_accumulate) == (8, 4, 32)
    assert (cfg.pretrain_lr, cfg.pretrain_min_lr) == (1e-3, 1e-6)
    assert (cfg.pretrain_weight_decay, cfg.pretrain_weight_decay_end) == (0.04, 0.4)
    assert (cfg.layer_decay, cfg.patch_embed_lr_mult) == (0.9, 0.2)
    assert (cfg.grad_clip, cfg.grad_clip_mode) == (3.0, "per_module")
    assert cfg.freeze_last_layer_steps == 3 * 1250
    assert (cfg.mask_token, cfg.pretrain_drop_path) == ("frozen", 0.3)
    assert (cfg.rank, cfg.unfreeze, cfg.teacher_momentum, cfg.n_prototypes) == (64, "L", 0.992, 65536)
    assert cfg.eval_weights == "teacher"


def test_defaults_keep_the_plain_loop():
    kw = continued.fit_hooks(settings(), DinoV2Objective(tiny_vit(), total_steps=1, n_prototypes=32, hidden_dim=32,
                                                         bottleneck_dim=16))
    assert set(kw) == {"weight_decay", "warmup", "grad_clip", "betas", "min_lr_ratio"} and kw["min_lr_ratio"] == 0


def test_recipe_rows_name_real_config_fields():
    from vitadapt.papers import RECIPES, recipe_table
    rows = [r for r in RECIPES["ExPLoRA"] if r.part == "pre-training (DinoV2)"]
    assert len(rows) >= 30
    fields = {f.name for f in dataclasses.fields(ExploraConfig)}
    assert not [n for r in rows for n in r.field.split(", ") if n and n not in fields]
    cfg = build_config(ExploraConfig, "paper", "10_explora_dinov2", dry_run="yes")
    assert "layer_decay=0.9" in recipe_table("ExPLoRA", cfg, ["pre-training (DinoV2)"]).to_string()


def test_pretraining_accumulates_alone_and_the_fine_tune_keeps_the_official_batch():
    """The official DinoV2 run accumulates 32 batches (accum_iter) in pre-training only: the paper profile's fine-tune
    stays at 32 per device x 4 devices = 128 (a run-wide accumulate_grad_batches would have made it 4,096)."""
    from vitadapt.config import build_config
    from vitadapt.experiments.explora import ExploraConfig
    from vitadapt.ssl import continued
    cfg = build_config(ExploraConfig, "paper", "10_explora_dinov2", dry_run="yes")
    assert cfg.ft_batch_size * cfg.devices * cfg.accumulate_grad_batches == 128
    assert cfg.pretrain_accumulate == 32
    small = build_config(ExploraConfig, "smoke", "10_explora_dinov2")
    assert "accumulate" not in continued.fit_hooks(small, torch.nn.Linear(2, 2), steps=10)
    assert continued.fit_hooks(dataclasses.replace(small, pretrain_accumulate=32), torch.nn.Linear(2, 2),
                               steps=10)["accumulate"] == 32
