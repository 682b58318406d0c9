"""UpStep library part on tiny random ViTs: LoRA trainable set, identity at init, center vector, gate
with the project's Fabric loop (exact skip counts, skipped steps change nothing), resume, learning."""

from __future__ import annotations

import random

import pytest
import torch

timm = pytest.importorskip("timm")

from vitadapt.ssl.upstep import (RunningCenter, UpStepAugment, UpStepGate, UpStepObjective,  # noqa: E402
                                 apply_upstep_lora, center_vector, ensemble_features, spherical_kmeans,
                                 upstep_loss_fn)
from vitadapt.train import fit, make_fabric, seed_everything  # noqa: E402

SMALL = dict(lora_rank=4, head_hidden_dim=32, head_out_dim=16, n_prototypes=16)


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=0)


def make_objective(seed: int = 0, **kw) -> UpStepObjective:
    seed_everything(seed)
    return UpStepObjective(tiny_vit(), **{**SMALL, **kw})


def fixed_batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return (x, x.flip(-1) + 0.1 * torch.randn(x.shape, generator=g))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fabric():
    return make_fabric()


def params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---- LoRA, trainable set, identity at init ------------------------------------------------------

def test_only_lora_trains_in_backbone():
    obj = make_objective(head="identity")
    trainable = [n for n, p in obj.named_parameters() if p.requires_grad]
    assert trainable == [f"model.blocks.{i}.attn.qkv.lora_{ab}.default.weight" for i in range(2) for ab in "AB"]
    assert not any(p.requires_grad for p in obj.base.parameters())
    assert "prototypes" in dict(obj.named_buffers()) and "prototypes" not in dict(obj.named_parameters())
    obj.train()
    loss, _ = obj(fixed_batch())
    loss.backward()
    for n, p in obj.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    # B = 0 at init, so B gets a non-zero gradient first
    assert obj.model.blocks[0].attn.qkv.lora_B["default"].weight.grad.abs().sum() > 0

    # with a projection head: LoRA in the backbone, the head trains too
    obj = make_objective(head="mlp")
    names = [n for n, p in obj.named_parameters() if p.requires_grad]
    assert all(("lora_" in n) if n.startswith("model.") else n.startswith("head.") for n in names)
    assert sum("lora_" in n for n in names) == 4


def test_equals_base_at_init_and_lora_errors():
    obj = make_objective()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(obj.features(x, "adapted"), obj.features(x, "base"))
    obj.train()
    assert not obj.base.training
    _, logs = obj(fixed_batch())
    assert float(logs["cv_drift"]) == 0.0
    assert float(logs["cv_norm"]) == pytest.approx(float(logs["cv_norm_base"]))
    with pytest.raises(ValueError, match="already holds LoRA"):
        apply_upstep_lora(obj.model)
    with pytest.raises(ValueError, match="rank"):
        apply_upstep_lora(tiny_vit(), rank=0)


# ---- center vector ------------------------------------------------------------------------------

def test_center_vector_norms():
    v = torch.randn(1, 10)
    assert center_vector(v.repeat(7, 1)).norm().item() == pytest.approx(1.0, abs=1e-6)
    assert center_vector(3 * v.repeat(7, 1)).norm().item() == pytest.approx(1.0, abs=1e-6)
    e = torch.randn(5, 10)
    assert center_vector(torch.cat([e, -e])).norm().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        center_vector(torch.randn(10))

    rc = RunningCenter(3, momentum=0.5)
    c1, c2 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    assert torch.equal(rc(c1), c1)                     # before the first update: the batch centre
    rc.update(c1)
    rc.update(c2)
    assert torch.allclose(rc.center, torch.tensor([0.5, 0.5, 0]))
    with pytest.raises(ValueError, match="momentum"):
        RunningCenter(3, momentum=1.0)


# ---- gate with the Fabric loop ------------------------------------------------------------------

def test_alternate_gate_halves_backward_and_skips_change_nothing(fabric):
    obj = make_objective(cvr="both")
    protos = obj.prototypes.clone()
    gate = UpStepGate("alternate")
    snaps = {}
    res = fit(fabric, obj, upstep_loss_fn(obj), [fixed_batch()], steps=10, lr=1e-2, should_backward=gate,
              on_step=lambda step, m: snaps.__setitem__(step, params(m)))
    assert (res.steps, res.backward_passes, res.skipped) == (10, 5, 5)
    assert (gate.backward_passes, gate.skipped, gate.fraction_skipped) == (5, 5, 0.5)
    assert [h["backward"] for h in res.history] == [s % 2 == 0 for s in range(10)]
    for step in range(1, 10, 2):        # skipped: every parameter unchanged
        assert all(torch.equal(snaps[step][n], snaps[step - 1][n]) for n in snaps[step]), step
    for step in range(2, 10, 2):        # back-propagated: the LoRA matrices moved
        assert any(not torch.equal(snaps[step][n], snaps[step - 1][n]) for n in snaps[step] if "lora_" in n)
    assert all(torch.equal(snaps[9][n], snaps[0][n]) for n in snaps[9] if n.startswith("base."))
    assert torch.equal(obj.prototypes, protos)
    for key in ("loss_cluster", "loss_cvr", "cv_norm", "cv_norm_base", "cv_drift"):
        assert key in res.history[-1]
    assert res.history[-1]["cv_drift"] > 0


def test_cv_signal_gate_skips_about_half():
    rng = random.Random(0)
    gate = UpStepGate("cv_signal", signal="cv_drift")
    for t in range(300):
        gate(t, {"cv_drift": (1 + 0.3 * rng.gauss(0, 1)) * t / 300})
    assert 0.35 <= gate.fraction_skipped <= 0.6
    assert all(d for _, d in gate.decisions[:4])       # warm-up
    run = 0
    for _, d in gate.decisions:                          # never more than 2 skips in a row
        run = 0 if d else run + 1
        assert run <= 2
    const = UpStepGate("cv_signal", score="value", signal="loss")
    for t in range(100):
        const(t, {"loss": 1.0})
    assert 0.4 <= const.fraction_skipped <= 0.5
    restored = UpStepGate("cv_signal")
    restored.load_state_dict(gate.state_dict())
    assert restored(300, {"cv_drift": 0.5}) == gate(300, {"cv_drift": 0.5})
    with pytest.raises(ValueError, match="cv_drift"):
        UpStepGate("cv_signal")(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="alternate"):
        UpStepGate("sometimes")
    assert all(UpStepGate("none")(t, {}) for t in range(3))


# ---- resume -------------------------------------------------------------------------------------

def test_resume_is_exact(fabric, tmp_path):
    loader = [fixed_batch(seed=1), fixed_batch(seed=2)]
    kw = dict(steps=4, lr=1e-2, ckpt_every=1, config={"method": "upstep"})

    ref = make_objective()
    full = fit(fabric, ref, upstep_loss_fn(ref), loader, should_backward=UpStepGate("alternate"),
               ckpt_path=tmp_path / "full.ckpt", **kw)

    ckpt = tmp_path / "part.ckpt"
    first = make_objective()
    part = fit(fabric, first, upstep_loss_fn(first), loader, should_backward=UpStepGate("alternate"),
               ckpt_path=ckpt, stop_after=2, **kw)
    assert part.steps == 2 and ckpt.exists()
    again = make_objective()                            # a fresh process would build the same objective
    rest = fit(fabric, again, upstep_loss_fn(again), loader, should_backward=UpStepGate("alternate"),
               ckpt_path=ckpt, **kw)
    assert rest.resumed_from == 2 and rest.steps == 4
    assert (rest.backward_passes, rest.skipped) == (full.backward_passes, full.skipped) == (2, 2)
    a, b = params(ref), params(again)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full.history]


# ---- learning -----------------------------------------------------------------------------------

def test_few_steps_lower_clustering_loss(fabric):
    obj = make_objective(cvr="none")
    batch = fixed_batch()
    obj.train()
    with torch.no_grad():
        before = float(obj(batch)[1]["loss_cluster"])
    fit(fabric, obj, upstep_loss_fn(obj), [batch], steps=6, lr=1e-2, weight_decay=0.0)
    obj.train()
    with torch.no_grad():
        after = float(obj(batch)[1]["loss_cluster"])
    assert after < 0.8 * before


# ---- prototypes, evaluation, augmentation, validation ------------------------------------------

def test_base_kmeans_prototypes_and_ensemble():
    imgs = torch.randn(32, 3, 32, 32)
    obj = make_objective(prototype_init="base_kmeans", init_images=imgs, center_estimate="ema")
    assert obj.prototypes.shape == (16, 16)
    assert torch.allclose(obj.prototypes.norm(dim=1), torch.ones(16), atol=1e-5)
    assert all(float(b.running_mean.abs().sum()) == 0 for b in obj.head.modules()
               if isinstance(b, torch.nn.BatchNorm1d))       # k-means left the head's buffers alone
    with pytest.raises(ValueError, match="n_prototypes=16"):
        make_objective(prototype_init="base_kmeans", init_images=imgs[:8])
    c = spherical_kmeans(torch.cat([torch.eye(4), torch.eye(4) + 0.01]), 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(c.abs().max(1).values, torch.ones(4), atol=1e-3)

    x = torch.randn(3, 3, 32, 32)
    ens = obj.ensemble(x, "concat")
    assert ens.shape == (3, 2 * obj.dim)
    assert torch.allclose(ens[:, :obj.dim].norm(dim=1), torch.ones(3), atol=1e-5)
    b, a = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.allclose(ensemble_features(b, b, "average"), torch.nn.functional.normalize(b, dim=1))
    assert ensemble_features(b, a, "average").shape == (5, 8)
    with pytest.raises(ValueError, match="concat"):
        ensemble_features(b, a, "sum")
    with pytest.raises(ValueError, match="concat"):
        ensemble_features(b, torch.randn(5, 4), "average")


def test_augment_and_bad_values():
    from PIL import Image
    img = Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy())
    v1, v2 = UpStepAugment(size=32)(img)
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)
    with pytest.raises(ValueError, match="vflip"):
        UpStepAugment(vflip=2.0)

    model = tiny_vit()
    for bad, match in [(dict(cvr="l2"), "drift"), (dict(head="deep"), "identity"),
                       (dict(prototype_init="learned"), "base_kmeans"), (dict(center_estimate="x"), "ema"),
                       (dict(temperature=0), "temperature"), (dict(n_prototypes=1), "n_prototypes"),
                       (dict(prototype_init="base_kmeans"), "init_images")]:
        with pytest.raises(ValueError, match=match):
            UpStepObjective(model, **bad)
    obj = make_objective()
    with pytest.raises(ValueError, match="view"):
        obj(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="UpStepObjective"):
        upstep_loss_fn(model)
