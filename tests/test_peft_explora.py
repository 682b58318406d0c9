"""qkv split/fuse, LoRA (peft) and the ExPLoRA trainable set on tiny random timm ViTs (+ ViT-L counts on meta)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from vitadapt.peft.common import count_trainable, trainable_names
from vitadapt.peft.explora import apply_explora, merge_explora
from vitadapt.peft.lora import LORA_TARGETS, apply_lora, has_lora, merge_lora
from vitadapt.peft.qkv import SplitQKV, fuse_qkv, split_qkv

# name -> (timm architecture, kwargs): plain ViT, no qkv bias + qk_norm, DinoV2-style (layer scale, 4 registers)
TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3, num_classes=0)),
    "vit_nobias_qknorm": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, depth=3, num_classes=0, qkv_bias=False, qk_norm=True),
    ),
    "dinov2_reg": (
        "vit_small_patch14_reg4_dinov2",
        dict(img_size=28, patch_size=7, depth=3, embed_dim=64, num_heads=2, num_classes=0, init_values=0.5),
    ),
}
DEPTH = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(key: str, seed: int = 0, **over) -> torch.nn.Module:
    arch, kw = TINY[key]
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, **{**kw, **over})
    with torch.no_grad():  # make every parameter matter (timm zero/ones-inits biases, norms, tokens)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def inputs(m: torch.nn.Module) -> torch.Tensor:
    size = m.patch_embed.img_size
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def feats(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.forward_features(x)


def perturb_trainable(m: torch.nn.Module, scale: float = 0.1) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


# ---------------------------------------------------------------------------------------------- split / fuse
@pytest.mark.parametrize("key", list(TINY))
def test_split_fuse_round_trip(key):
    m = make(key)
    x = inputs(m)
    ref, ref_sd = feats(m, x), {k: v.clone() for k, v in m.state_dict().items()}

    split_qkv(m)
    assert all(isinstance(b.attn.qkv, SplitQKV) for b in m.blocks)
    assert "blocks.0.attn.qkv.q.weight" in m.state_dict()
    assert (m.blocks[0].attn.qkv.q.bias is None) == (key == "vit_nobias_qknorm")
    torch.testing.assert_close(feats(m, x), ref, rtol=0, atol=1e-6)
    split_qkv(m)  # idempotent

    fuse_qkv(m)
    sd = m.state_dict()
    assert list(sd) == list(ref_sd)
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    torch.testing.assert_close(feats(m, x), ref, rtol=0, atol=1e-6)
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in m.blocks)


def test_split_rejects_non_vit_and_fuse_rejects_lora():
    with pytest.raises(ValueError, match="no timm.layers.Attention"):
        split_qkv(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    m = apply_lora(make("vit"), rank=2)
    with pytest.raises(ValueError, match="merge the adapters"):
        fuse_qkv(m)


# ---------------------------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("key", list(TINY))
@pytest.mark.parametrize("method", ["explora", "lora"])
def test_adapted_equals_source_at_init(key, method):
    src = make(key)
    x = inputs(src)
    ref = feats(src, x)
    m = copy.deepcopy(src)
    if method == "explora":
        apply_explora(m, unfreeze_blocks=(-1,), rank=4, targets=tuple(LORA_TARGETS))
    else:
        apply_lora(m, rank=4, targets=tuple(LORA_TARGETS))
    assert has_lora(m)
    assert all(torch.count_nonzero(p) == 0 for n, p in m.named_parameters() if ".lora_B." in n)  # B = 0
    assert all(torch.count_nonzero(p) > 0 for n, p in m.named_parameters() if ".lora_A." in n)
    torch.testing.assert_close(feats(m, x), ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("key", list(TINY))
@pytest.mark.parametrize(
    "kw",
    [
        dict(unfreeze_blocks=(-1,), rank=4),
        dict(unfreeze_blocks=(0, -1), rank=8, targets=("q", "k", "v", "proj", "fc1", "fc2")),
        dict(unfreeze_blocks=(), rank=4, targets=("v", "fc2"), mlp_rank=3, mlp_alpha=2.0),
    ],
    ids=["default", "all_targets", "no_unfrozen"],
)
def test_merge_explora_equals_unmerged_and_loads_strict(key, kw):
    m = apply_explora(make(key), **kw)
    perturb_trainable(m)  # LoRA B != 0, unfrozen block, norms, tokens all moved
    x = inputs(m)
    adapted = feats(m, x)
    assert (adapted - feats(make(key), x)).abs().max() > 1e-3  # the perturbation changed the function

    merge_explora(m)
    assert not has_lora(m) and not hasattr(m, "explora_config") and not hasattr(m, "peft_config")
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in m.blocks)
    torch.testing.assert_close(feats(m, x), adapted, rtol=1e-5, atol=1e-5)

    arch, tkw = TINY[key]
    fresh = timm.create_model(arch, pretrained=False, **tkw).eval()
    assert list(fresh.state_dict()) == list(m.state_dict())
    fresh.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(feats(fresh, x), adapted, rtol=1e-5, atol=1e-5)


def test_apply_lora_head_scaling_and_merge():
    m = make("vit", num_classes=5)
    apply_lora(m, rank=4, targets=("q", "v"))
    layer = m.blocks[0].attn.qkv.q
    assert layer.scaling["default"] == 1.0  # alpha=None -> alpha = rank
    expected = {f"blocks.{i}.attn.qkv.{t}.lora_{ab}.default.weight" for i in range(DEPTH) for t in "qv" for ab in "AB"}
    assert set(trainable_names(m)) == expected | {"head.weight", "head.bias"}
    assert count_trainable(m) == DEPTH * 2 * 4 * (192 + 192) + 5 * 192 + 5
    perturb_trainable(m)
    x = inputs(m)
    with torch.no_grad():
        adapted = m(x)
    merge_lora(m)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY["vit"][1], "num_classes": 5})
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), adapted, rtol=1e-5, atol=1e-5)

    m2 = apply_lora(make("vit", num_classes=5), rank=4, alpha=2.0, targets=("fc1",), train_head=False)
    assert m2.blocks[1].mlp.fc1.scaling["default"] == 0.5
    assert set(trainable_names(m2)) == {f"blocks.{i}.mlp.fc1.lora_{ab}.default.weight" for i in range(3) for ab in "AB"}
    assert isinstance(m2.blocks[0].attn.qkv, torch.nn.Linear)  # no q/k/v target: qkv left fused


# ---------------------------------------------------------------------------------------------- trainable set
def expected_trainable(key: str, unfreeze: tuple[int, ...], targets: tuple[str, ...], norms=True, cls=True) -> set[str]:
    """The ExPLoRA rule written out by hand: parameter names that must train."""
    plain = split_qkv(make(key))  # names of the split model, without LoRA
    unfrozen = {i % DEPTH for i in unfreeze}
    names = set()
    for n, _ in plain.named_parameters():
        if n.startswith("blocks.") and int(n.split(".")[1]) in unfrozen:
            names.add(n)  # everything in an unfrozen block
        elif norms and (".norm1." in n or ".norm2." in n or n.startswith(("norm.", "fc_norm."))
                        or ".q_norm." in n or ".k_norm." in n):
            names.add(n)  # every LayerNorm (incl. qk-norm where the model has it)
        elif cls and n in ("cls_token", "reg_token"):
            names.add(n)
    for i in range(DEPTH):
        if i not in unfrozen:
            for t in targets:
                names |= {f"blocks.{i}.{LORA_TARGETS[t]}.lora_{ab}.default.weight" for ab in "AB"}
    return names


VARIANTS = [
    ("vit", dict(unfreeze_blocks=(-1,), targets=("q", "v"))),
    ("dinov2_reg", dict(unfreeze_blocks=(-1,), targets=("q", "v"))),
    ("dinov2_reg", dict(unfreeze_blocks=(0, -2, -1), targets=("q", "v"))),
    ("dinov2_reg", dict(unfreeze_blocks=(), targets=("q", "k", "v", "proj"))),
    ("dinov2_reg", dict(unfreeze_blocks=(1,), targets=("fc1", "fc2"))),
    ("dinov2_reg", dict(unfreeze_blocks=(-1,), targets=())),  # "[L] without LoRA" ablation
    ("dinov2_reg", dict(unfreeze_blocks=(-1,), targets=("v",), train_norms=False, train_cls=False)),
    ("vit_nobias_qknorm", dict(unfreeze_blocks=(0,), targets=("q", "k", "v"))),
]


@pytest.mark.parametrize("key,kw", VARIANTS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)])
def test_exactly_intended_parameters_train_and_get_gradients(key, kw):
    m = apply_explora(make(key), rank=8, **kw)
    expected = expected_trainable(
        key, kw["unfreeze_blocks"], kw["targets"], kw.get("train_norms", True), kw.get("train_cls", True)
    )
    assert set(trainable_names(m)) == expected
    assert m.explora_config["trainable"] == count_trainable(m) == sum(m.explora_config["counts"].values())
    # never trained: patch embedding, position embedding, LoRA'd projection biases
    assert not any(n.startswith(("patch_embed.", "pos_embed")) for n in trainable_names(m))
    # LoRA ranks: r on attention, r/4 on the MLP
    for n, p in m.named_parameters():
        if ".lora_A." in n:
            assert p.shape[0] == (2 if ".mlp." in n else 8), n

    m.train()
    x = inputs(m)
    m.forward_features(x).square().mean().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == expected


def test_config_and_scaling_stored():
    m = apply_explora(make("dinov2_reg"), unfreeze_blocks=(-3, 2), rank=16, targets=("q", "fc1"))
    cfg = m.explora_config
    assert cfg["unfreeze_blocks"] == [0, 2] and cfg["lora_blocks"] == [1]
    assert cfg["mlp_rank"] == 4 and cfg["scaling"] == 1 / 16
    assert m.blocks[1].attn.qkv.q.scaling["default"] == 1 / 16  # alpha = 1 (official), scaling alpha / r
    assert m.blocks[1].mlp.fc1.scaling["default"] == 1 / 4  # same alpha on the rank-r/4 MLP LoRA
    assert cfg["lora_modules"] == ["blocks.1.attn.qkv.q", "blocks.1.mlp.fc1"]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(unfreeze_blocks=(3,)), r"3.*\[-3, 2\]"),
        (dict(unfreeze_blocks=(-4,)), r"-4.*\[-3, 2\]"),
        (dict(targets=("q", "qkv")), r"qkv.*'q', 'k', 'v', 'proj', 'fc1', 'fc2'"),
        (dict(rank=0), "rank=0"),
        (dict(alpha=0), "alpha=0"),
        (dict(mlp_rank=1.5), "mlp_rank=1.5"),
    ],
)
def test_bad_input_raises_before_any_work(kw, match):
    m = make("vit")
    before = list(m.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_explora(m, **kw)
    assert list(m.state_dict()) == before and all(p.requires_grad for p in m.parameters())


def test_lora_bad_input_and_double_application():
    with pytest.raises(ValueError, match=r"'mlp'.*valid targets"):
        apply_lora(make("vit"), targets=("mlp",))
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(make("vit"), dropout=1.0)
    m = apply_explora(make("vit"), rank=2)
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_explora(m)


# ---------------------------------------------------------------------------------------------- paper counts
def test_exact_counts_vit_large_dinov2():
    """REFERENCE.md section 1: ViT-L/14 DinoV2, U=[L], r=64, Q,V -> 18,724,864; LoRA r8 Q,V, 24 blocks -> 786,432."""
    with torch.device("meta"):  # shapes only: no 1.2 GB of weights
        m = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0)
    apply_explora(m, unfreeze_blocks=(-1,), rank=64)
    assert count_trainable(m) == 18_724_864
    assert m.explora_config["counts"] == {
        "lora": 23 * 2 * 64 * (1024 + 1024),
        "unfrozen_blocks": 12_598_272,
        "norms": 23 * 4 * 1024 + 2 * 1024,
        "tokens": 1024,
    }
    with torch.device("meta"):
        m = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0)
    apply_lora(m, rank=8, targets=("q", "v"), train_head=False)
    assert count_trainable(m) == 786_432


def test_adapted_checkpoint_round_trip_and_deepcopy():
    """A training checkpoint of the adapted model loads strictly into a freshly adapted one (and an EMA
    teacher made by deepcopy carries the same structure)."""
    m = apply_explora(make("dinov2_reg"), unfreeze_blocks=(-1,), rank=4, targets=("q", "v", "fc1"))
    perturb_trainable(m)
    teacher = copy.deepcopy(m)
    assert teacher.explora_config == m.explora_config and trainable_names(teacher) == trainable_names(m)
    other = apply_explora(make("dinov2_reg", seed=5), unfreeze_blocks=(-1,), rank=4, targets=("q", "v", "fc1"))
    other.load_state_dict(m.state_dict(), strict=True)
    x = inputs(m)
    torch.testing.assert_close(feats(other, x), feats(m, x), rtol=0, atol=0)
    torch.testing.assert_close(feats(teacher, x), feats(m, x), rtol=0, atol=0)
