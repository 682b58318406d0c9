"""RLRR, SSF and the baseline registry on tiny random timm ViTs (plus a meta-device ViT-B for counts)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from vitadapt.peft.baselines import BASELINES, build
from vitadapt.peft.common import count_trainable, trainable_names
from vitadapt.peft.rlrr import (SSF, RLRRLinear, apply_rlrr, apply_ssf, merge_rlrr, merge_ssf,
                                rlrr_param_count)

ARCH = "vit_tiny_patch16_224"
KW = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5)
D, HID, DEPTH, NCLS = 192, 768, 2, 5
HEAD = D * NCLS + NCLS
N_LN = 2 * DEPTH + 1  # norm1, norm2 per block + final norm



def tiny(**kw) -> nn.Module:
    return timm.create_model(ARCH, **{**KW, **kw}).eval()


@pytest.fixture(scope="module")
def src() -> nn.Module:
    torch.manual_seed(0)
    return tiny()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _perturb(model: nn.Module, std: float = 0.1) -> None:
    """Make every trainable adapter tensor non-zero (f and beta start at 0 / near 0)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head"):
                p.add_(torch.randn_like(p) * std)


# ----------------------------------------------------------------------------------------------- counts

def test_vit_b_official_count():
    with torch.device("meta"):
        m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    apply_rlrr(m)
    assert count_trainable(m) == 288_768
    rl = sum(p.numel() for mod in m.modules() if isinstance(mod, RLRRLinear) for p in mod.parameters() if p.requires_grad)
    ssf = [mod for mod in m.modules() if isinstance(mod, SSF)]
    assert rl == 12 * (4 * (768 + 2 * 768) + (768 + 2 * 3072) + (3072 + 2 * 768)) == 248_832
    assert len(ssf) == 26  # 25 LayerNorms + patch embedding
    assert sum(2 * s.dim for s in ssf) == 25 * 1536 + 1536 == 39_936
    assert isinstance(m.patch_embed.proj, SSF) and isinstance(m.norm, SSF)


def test_vit_b_variant_counts():
    def count(**kw):
        with torch.device("meta"):
            m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        return count_trainable(apply_rlrr(m, **kw))

    ssf = 39_936
    sum_in = 12 * (3 * 768 + 768 + 768 + 3072)      # in of q, k, v, proj, fc1, fc2
    sum_out = 12 * (3 * 768 + 768 + 3072 + 768)
    assert count(ssf=False) == 248_832 == sum_in + 2 * sum_out
    assert count(sides="left") == 288_768 - sum_in == ssf + 2 * sum_out
    assert count(sides="right") == 288_768 - sum_out == ssf + sum_in + sum_out
    assert count(rank=2) == ssf + 2 * (sum_in + sum_out) + sum_out
    with torch.device("meta"):
        m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert count_trainable(apply_ssf(m)) == 205_824


@pytest.mark.parametrize("sides,rank,layers,ssf", [
    ("both", 1, "all", True), ("left", 1, "all", True), ("right", 1, "all", False),
    ("both", 3, "all", True), ("both", 1, "attn", True), ("both", 1, "mlp", False)])
def test_tiny_counts(sides, rank, layers, ssf):
    m = apply_rlrr(tiny(), sides=sides, rank=rank, layers=layers, ssf=ssf)
    shapes = {"qkv": (D, 3 * D, 3), "proj": (D, D, 1), "fc1": (D, HID, 1), "fc2": (HID, D, 1)}
    names = {"all": shapes, "attn": ["qkv", "proj"], "mlp": ["fc1", "fc2"]}[layers]
    per_block = sum(rlrr_param_count(*shapes[n][:2], sides=sides, rank=rank, n_splits=shapes[n][2]) for n in names)
    expected = DEPTH * per_block + (2 * D * (N_LN + 1) if ssf else 0) + HEAD
    assert count_trainable(m) == expected
    # the per-Linear rule: in + 2 out (both), 2 out (left: drops in), in + out (right: drops one out)
    for mod in m.modules():
        if isinstance(mod, RLRRLinear):
            i, o, n = mod.in_features, mod.out_features, mod.n_splits
            got = sum(p.numel() for p in mod.parameters() if p.requires_grad)
            assert got == {"both": rank * (n * i + o) + o, "left": 2 * o, "right": n * i + o}[sides]


# ----------------------------------------------------------------------------------------------- maths

def test_fused_qkv_equals_three_separate_linears():
    torch.manual_seed(2)
    qkv = nn.Linear(D, 3 * D)
    fused = RLRRLinear(copy.deepcopy(qkv), rank=2, n_splits=3)
    _perturb(fused)
    assert sum(p.numel() for p in fused.parameters() if p.requires_grad) == 3 * (2 * (D + D) + D)
    tokens = torch.randn(4, 7, D)
    outs = []
    for b in range(3):
        rows = slice(b * D, (b + 1) * D)
        lin = nn.Linear(D, D)
        with torch.no_grad():
            lin.weight.copy_(qkv.weight[rows]); lin.bias.copy_(qkv.bias[rows])
        sep = RLRRLinear(lin, rank=2)
        with torch.no_grad():
            sep.s_left.copy_(fused.s_left[rows]); sep.s_right.copy_(fused.s_right[b:b + 1]); sep.f.copy_(fused.f[rows])
        outs.append(sep(tokens))
    torch.testing.assert_close(fused(tokens), torch.cat(outs, -1))


def test_elementwise_equation():
    torch.manual_seed(3)
    lin = nn.Linear(5, 4)
    m = RLRRLinear(copy.deepcopy(lin))
    _perturb(m)
    W, sl, sr = lin.weight, m.s_left[:, 0], m.s_right[0, 0]
    expect = W + torch.outer(sl, sr) * W
    torch.testing.assert_close(m.merged_weight(), expect)
    torch.testing.assert_close(m.merged_bias(), lin.bias + m.f)
    nores = RLRRLinear(copy.deepcopy(lin), residual=False, sides="left")
    _perturb(nores)
    torch.testing.assert_close(nores.merged_weight(), nores.s_left * W)
    right = RLRRLinear(copy.deepcopy(lin), sides="right")
    torch.testing.assert_close(right.merged_weight(), W + right.s_right[0] * W)


VARIANTS = [dict(), dict(rank=2), dict(sides="left"), dict(sides="right"), dict(residual=False),
            dict(residual=False, sides="right"), dict(layers="attn", init="normal"), dict(layers="mlp", ssf=False)]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "official")
def test_merge_equals_unmerged(src, x, kw):
    m = apply_rlrr(copy.deepcopy(src), **kw)
    _perturb(m)
    with torch.no_grad():
        y = m(x)
        assert not torch.allclose(y, src(x), atol=1e-3)  # the adaptation does something
        merge_rlrr(m)
        assert not any(isinstance(mod, (RLRRLinear, SSF)) for mod in m.modules())
        torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
        fresh = tiny()
        fresh.load_state_dict(m.state_dict(), strict=True)
        torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)


def test_zero_init_equals_source(src, x):
    m = apply_rlrr(copy.deepcopy(src), init="zero")
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    for mod in m.modules():
        if isinstance(mod, RLRRLinear):
            assert torch.equal(mod.merged_weight(), mod.base.weight)
            assert mod.s_right.abs().sum() > 0  # LoRA-style: only the left factor is zero
    for kw in (dict(sides="left"), dict(sides="right"), dict(rank=2)):
        m = apply_rlrr(copy.deepcopy(src), init="zero", **kw)
        with torch.no_grad():
            assert torch.equal(m(x), src(x))


def test_inits(src, x):
    m = apply_rlrr(copy.deepcopy(src), residual=False, init="constant", rank=4, ssf=False)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x), atol=1e-5, rtol=1e-5)  # Δ ≡ 1 without the residual
    k = apply_rlrr(copy.deepcopy(src))  # official: W' != W at step 0
    lin = k.blocks[0].mlp.fc1
    assert not torch.allclose(lin.merged_weight(), lin.base.weight)
    assert lin.s_left.abs().max() <= 6 ** 0.5 and lin.s_right.abs().max() <= (6 / D) ** 0.5
    assert lin.s_left.abs().max() > 1.0 and torch.count_nonzero(lin.f) == 0
    gam = torch.cat([s.gamma for s in k.modules() if isinstance(s, SSF)])
    assert abs(gam.mean() - 1) < 0.01 and 0.01 < gam.std() < 0.03
    for init in ("normal", "uniform"):
        lin = apply_rlrr(copy.deepcopy(src), init=init).blocks[0].mlp.fc1
        s = torch.cat([lin.s_left.flatten(), lin.s_right.flatten()])
        assert 0.015 < s.std() < 0.025 and s.abs().max() < 0.2


# ----------------------------------------------------------------------------------------------- training

def _grad_check(m: nn.Module, x: torch.Tensor, expect_trainable) -> None:
    names = set(trainable_names(m))
    assert names == {n for n, _ in m.named_parameters() if expect_trainable(n)}, sorted(names)
    m.train()
    m(x).logsumexp(-1).sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_rlrr_trains_exactly_intended(src, x):
    m = apply_rlrr(copy.deepcopy(src))
    leaves = ("s_left", "s_right", "f", "gamma", "beta")
    _grad_check(m, x, lambda n: n.startswith("head.") or n.split(".")[-1] in leaves)
    assert sum(isinstance(mod, RLRRLinear) for mod in m.modules()) == 4 * DEPTH
    m2 = apply_rlrr(tiny(), train_head=False, sides="right", ssf=False)
    assert all(n.endswith(("s_right", ".f")) for n in trainable_names(m2))


def test_state_dict_round_trip(src, x):
    m = apply_rlrr(copy.deepcopy(src), rank=2)
    _perturb(m)
    other = apply_rlrr(tiny(), rank=2)
    other.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(x), m(x))


@pytest.mark.parametrize("kw,bad", [(dict(sides="top"), "'top'"), (dict(init="xavier"), "'xavier'"),
                                    (dict(layers="ffn"), "'ffn'"), (dict(rank=0), "rank=0"),
                                    (dict(rank=2.0), "rank=2.0"), (dict(rank=2, sides="left"), "sides='left'")])
def test_bad_args(kw, bad):
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=bad):
        apply_rlrr(m, **kw)
    assert not any(isinstance(mod, (RLRRLinear, SSF)) for mod in m.modules())
    assert all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="'both', 'left', 'right'"):
        apply_rlrr(m, sides="top")
    with pytest.raises(ValueError, match="already adapted"):
        apply_rlrr(apply_rlrr(tiny()))
    with pytest.raises(ValueError, match="identity"):
        apply_ssf(m, init="zeros")


# ----------------------------------------------------------------------------------------------- SSF

def test_ssf_merge_and_count(src, x):
    m = apply_ssf(copy.deepcopy(src))
    per_block = 2 * (3 * D + D + HID + D) + 2 * 2 * D
    assert count_trainable(m) == DEPTH * per_block + 2 * D * 2 + HEAD  # + patch embed and final norm
    _grad_check(m, x, lambda n: n.startswith("head.") or n.split(".")[-1] in ("gamma", "beta"))
    m.eval()
    with torch.no_grad():
        y = m(x)
        merge_ssf(m)
        torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
        fresh = tiny()
        fresh.load_state_dict(m.state_dict(), strict=True)
    ident = apply_ssf(copy.deepcopy(src), init="identity", linears=False)
    with torch.no_grad():
        assert torch.equal(ident(x), src(x))
    assert count_trainable(ident) == 2 * D * (N_LN + 1) + HEAD


# ----------------------------------------------------------------------------------------------- baselines

EXPECT = {
    "linear": lambda n: n.startswith("head."),
    "full": lambda n: True,
    "bitfit": lambda n: n.startswith("head.") or n.endswith("bias"),
    "lora": lambda n: n.startswith("head.") or ".lora_A." in n or ".lora_B." in n,
    "ia3": lambda n: n.startswith("head.") or ".ia3_l." in n,
    "ln_tuning": lambda n: n.startswith("head.") or ".ln_tuning_layers." in n,
    "ssf": lambda n: n.startswith("head.") or n.split(".")[-1] in ("gamma", "beta"),
    "rlrr": lambda n: n.startswith("head.") or n.split(".")[-1] in ("s_left", "s_right", "f", "gamma", "beta"),
}
COUNTS = {  # trainable parameters of the tiny model (head 965 included)
    "linear": HEAD,
    "bitfit": HEAD + D + DEPTH * (D + 3 * D + D + D + HID + D) + D,
    "lora": HEAD + DEPTH * 8 * (D + 3 * D),
    "ia3": HEAD + DEPTH * (3 * D + HID),
    "ln_tuning": HEAD + 2 * D * N_LN,
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_builders(src, x, name):
    assert set(BASELINES) >= {"linear", "full", "lora", "ssf", "rlrr", "ia3", "ln_tuning"}
    m = build(name, copy.deepcopy(src))
    if name in ("lora", "ia3", "ln_tuning", "linear"):  # these start as the identity of the source
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(x), src(x))
    if name == "lora":
        assert m.blocks[0].attn.qkv.scaling["default"] == 1.0  # alpha = r
    if name in COUNTS:
        assert count_trainable(m) == COUNTS[name]
    if name == "lora":  # B = 0 at init gives A no gradient; make the smoke test meaningful
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    _grad_check(m, x, EXPECT[name])
    # an optimiser step changes the output
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.eval()
    with torch.no_grad():
        y0 = m(x)
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(m(x), y0)


def test_baseline_no_head():
    m = build("lora", tiny(num_classes=0))
    assert all("lora_" in n for n in trainable_names(m))
    with pytest.raises(ValueError, match="'linear'"):
        build("prompt", tiny())
