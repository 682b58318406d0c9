"""UpStep's offline stream (ema | stop_grad | symmetric) and its CVR default (norm), on tiny random ViTs: no gradient
through the offline view, the EMA rule after each optimizer step (none on a skipped one), the EMA copy in the state
dict and an exact resume, the defaults of the objective and of the experiment's config."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from lightly.loss.swav_loss import sinkhorn  # noqa: E402

from vitadapt.experiments import upstep as U  # noqa: E402
from vitadapt.ssl.upstep import (OFFLINE_STREAMS, UpStepGate, UpStepObjective, backbone_features,  # noqa: E402
                                 upstep_loss_fn)
from vitadapt.train import fit, make_fabric, seed_everything  # noqa: E402

SMALL = dict(lora_rank=4, head_hidden_dim=32, head_out_dim=16, n_prototypes=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_objective(seed: int = 0, **kw) -> UpStepObjective:
    seed_everything(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=0)
    return UpStepObjective(vit, **{**SMALL, **kw})


def views(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return x, x.flip(-1) + 0.1 * torch.randn(x.shape, generator=g)


def trained(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def offline_pairs(obj):
    """(name, online tensor, offline tensor) of every trained tensor of the backbone and the head."""
    on = dict(obj.model.named_parameters()) | {f"head.{n}": p for n, p in obj.head.named_parameters()}
    off = dict(obj.offline_model.named_parameters()) | {f"head.{n}": p for n, p in obj.offline_head.named_parameters()}
    return [(n, p, off[n]) for n, p in on.items() if p.requires_grad]


@pytest.fixture(scope="module")
def fabric():
    return make_fabric()


def test_defaults_are_ema_stream_and_norm_cvr():
    obj = make_objective()
    assert (obj.offline_stream, obj.offline_momentum, obj.cvr, obj.cvr_weight) == ("ema", 0.99, "norm", 1.0)
    cfg = U.UpStepConfig()
    assert (cfg.offline_stream, cfg.offline_momentum, cfg.cvr, cfg.cvr_weight) == ("ema", 0.99, "norm", 1.0)
    assert OFFLINE_STREAMS == ("ema", "stop_grad", "symmetric")
    # the norm term is ||c_adapted||^2 of the step's centre vector
    obj.train()
    _, logs = obj(views())
    assert float(logs["loss_cvr"]) == pytest.approx(float(logs["cv_norm"]) ** 2, rel=1e-5)
    for bad, match in [(dict(offline_stream="target"), "ema', 'stop_grad', 'symmetric"),
                       (dict(offline_momentum=1.0), "offline_momentum"), (dict(offline_momentum=-0.1), "offline_momentum")]:
        with pytest.raises(ValueError, match=match):
            make_objective(**bad)


@pytest.mark.parametrize("stream", ["stop_grad", "ema"])
def test_no_gradient_through_the_offline_view(stream):
    obj = make_objective(offline_stream=stream)
    obj.train()
    v1, v2 = (v.requires_grad_(True) for v in views())
    loss, _ = obj((v1, v2))
    loss.backward()
    assert v2.grad is None and v1.grad is not None and v1.grad.abs().sum() > 0
    for n, p in obj.named_parameters():        # DDP: every trained tensor has a gradient, nothing frozen has one
        assert (p.grad is not None) == p.requires_grad, n
    sym = make_objective(offline_stream="symmetric")
    sym.train()
    v1, v2 = (v.requires_grad_(True) for v in views())
    sym((v1, v2))[0].backward()
    assert v2.grad is not None and v2.grad.abs().sum() > 0        # symmetric: both views back-propagate


def test_stop_grad_gradient_is_the_one_sided_gradient():
    """With stop_grad the loss's gradient equals that of CE(codes of the offline view, scores of the online view)
    with the offline view's scores computed separately without gradient."""
    obj = make_objective(offline_stream="stop_grad", cvr="none")
    obj.train()
    v1, v2 = views()
    obj((v1, v2))[0].backward()
    got = {n: p.grad.clone() for n, p in obj.named_parameters() if p.requires_grad}

    obj.zero_grad(set_to_none=True)
    score = lambda v: torch.nn.functional.normalize(obj.head(backbone_features(obj.model, v)), dim=1) @ obj.prototypes.T
    with torch.no_grad():
        codes = sinkhorn(score(v2), 3, 0.05)
    obj.loss.subloss(score(v1), codes).backward()
    for n, p in obj.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad, atol=1e-7, rtol=1e-5), n


def test_ema_stream_follows_the_ema_rule_after_each_optimizer_step(fabric):
    m = 0.9
    obj = make_objective(offline_stream="ema", offline_momentum=m)
    assert all(torch.equal(p, po) for _, p, po in offline_pairs(obj))          # a copy at init (LoRA included)
    assert not any(p.requires_grad for p in [*obj.offline_model.parameters(), *obj.offline_head.parameters()])
    before = {n: po.detach().clone() for n, _, po in offline_pairs(obj)}
    snaps = []

    def on_step(step, module):
        obj.on_step(step, module)
        snaps.append(({n: p.detach().clone() for n, p, _ in offline_pairs(obj)},
                      {n: po.detach().clone() for n, _, po in offline_pairs(obj)}))

    gate = UpStepGate("alternate")
    fit(fabric, obj, upstep_loss_fn(obj), [views()], steps=4, lr=1e-2, weight_decay=0.0, should_backward=gate,
        on_step=on_step)
    assert [d for _, d in gate.decisions] == [True, False, True, False]
    for step, (online, offline) in enumerate(snaps):
        if step % 2 == 0:          # back-propagated: offline <- m * offline + (1 - m) * online (after the step)
            for n in offline:
                assert torch.allclose(offline[n], m * before[n] + (1 - m) * online[n], atol=1e-7, rtol=0), (step, n)
            assert any(not torch.equal(offline[n], online[n]) for n in offline)
        else:                      # skipped: no optimizer step, the offline stream stays
            assert all(torch.equal(offline[n], before[n]) for n in offline), step
        before = offline
    assert all(po.grad is None for _, _, po in offline_pairs(obj))
    assert any("lora_B" in n and float(before[n].abs().sum()) > 0 for n in before)   # the LoRA copy moved too


def test_ema_copy_in_state_dict_and_resume_is_exact(fabric, tmp_path):
    loader = [views(seed=1), views(seed=2)]
    kw = dict(steps=4, lr=1e-2, ckpt_every=1, config={"method": "upstep"})

    def run(obj, ckpt, **extra):
        return fit(fabric, obj, upstep_loss_fn(obj), loader, should_backward=UpStepGate("none"), on_step=obj.on_step,
                   ckpt_path=ckpt, **kw, **extra)

    ref = make_objective()
    full = run(ref, tmp_path / "full.ckpt")
    state = ref.state_dict()
    assert any(k.startswith("offline_model.") and "lora_B" in k for k in state)
    assert any(k.startswith("offline_head.") for k in state)
    copy = make_objective()
    copy.load_state_dict(state)
    assert all(torch.equal(po, qo) for (_, _, po), (_, _, qo) in zip(offline_pairs(ref), offline_pairs(copy)))

    ckpt = tmp_path / "part.ckpt"
    run(make_objective(), ckpt, stop_after=2)
    again = make_objective()
    rest = run(again, ckpt)
    assert rest.resumed_from == 2
    a, b = ref.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("offline_"))
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full.history]


def test_experiment_passes_the_stream_and_ablates_it():
    cfg = U.UpStepConfig(ablate_offline=("symmetric", "ema", "stop_grad"), ablate_cvr=(), ablate_gate=(), ablate_rank=())
    v = U.ablation_variants(cfg)
    assert v[0][0] == "default (offline=ema, cvr=norm, gate=alternate, r=8)"
    assert [o for _, o in v[1:]] == [{"offline_stream": "symmetric"}, {"offline_stream": "stop_grad"}]
    from vitadapt.vit import meta_vit
    obj = U.build_objective(U.UpStepConfig(offline_stream="stop_grad", offline_momentum=0.5),
                            meta_vit("vit_tiny_patch16_224", 32, patch_size=8, depth=2), seed=0)
    assert (obj.offline_stream, obj.offline_momentum) == ("stop_grad", 0.5) and not hasattr(obj, "offline_model")


def test_ddp_two_processes_train_with_the_ema_stream(stream="ema"):
    """DDP (two forked CPU processes, gloo): every trained tensor gets a gradient in a step that back-propagates (DDP
    without find_unused_parameters would fail at the second one), and rank 0's EMA copy comes back with the module."""
    from lightning.fabric import Fabric
    obj = make_objective(offline_stream=stream)
    start = {n: po.detach().clone() for n, _, po in offline_pairs(obj)} if stream == "ema" else {}
    res = fit(Fabric(accelerator="cpu", devices=2, strategy="ddp_fork"), obj, upstep_loss_fn(obj),
              [views(seed=1), views(seed=2)], steps=4, lr=1e-2, should_backward=UpStepGate("alternate"),
              on_step=obj.on_step)
    assert (res.backward_passes, res.skipped) == (2, 2)
    if stream == "ema":
        moved = {n: po for n, _, po in offline_pairs(obj)}
        assert any(not torch.equal(moved[n], start[n]) for n in start)
