import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.eval import Transformed, eval_transform
from vitadapt.train import cosine_lr, fit, make_fabric, seed_everything


def _setup(tiny_vit):
    seed_everything(0)
    model = tiny_vit(num_classes=10, depth=1)
    data = Transformed(SyntheticShapes(2, size=32), eval_transform(32))
    loader = DataLoader(data, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    crit = torch.nn.CrossEntropyLoss()
    return model, loader, lambda m, b: (crit(m(b[0]), b[1]), {})


def test_fit_lowers_the_loss(tiny_vit):
    model, loader, loss_fn = _setup(tiny_vit)
    res = fit(make_fabric(), model, loss_fn, loader, steps=30, lr=3e-3, weight_decay=0.0)
    losses = [h["loss"] for h in res.history]
    assert res.steps == 30 and res.backward_passes == 30 and res.skipped == 0
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_resume_continues_from_the_same_step_and_matches_an_uninterrupted_run(tiny_vit, tmp_path):
    cfg = {"arch": "tiny", "lr": 1e-3}
    model, loader, loss_fn = _setup(tiny_vit)
    full = fit(make_fabric(), model, loss_fn, loader, steps=6, lr=1e-3)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    ck = tmp_path / "run.ckpt"
    model, loader, loss_fn = _setup(tiny_vit)
    part = fit(make_fabric(), model, loss_fn, loader, steps=6, lr=1e-3, ckpt_path=ck, ckpt_every=1, config=cfg,
               stop_after=3)
    assert part.steps == 3 and ck.exists()
    # a fresh process rebuilds the model and the loader from scratch: step 3 is the middle of the
    # second epoch (2 batches per epoch), so the loop must rebuild that epoch's order and skip a batch
    model, loader, loss_fn = _setup(tiny_vit)
    torch.manual_seed(1234)            # whatever the new process's RNG is, the checkpoint's wins
    res = fit(make_fabric(), model, loss_fn, loader, steps=6, lr=1e-3, ckpt_path=ck, ckpt_every=1, config=cfg)
    assert res.resumed_from == 3 and res.steps == 6 and res.backward_passes == 6
    assert [h["step"] for h in res.history] == list(range(6))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert [round(h["loss"], 5) for h in res.history] == [round(h["loss"], 5) for h in full.history]


def test_resume_refuses_a_checkpoint_of_another_config(tiny_vit, tmp_path):
    model, loader, loss_fn = _setup(tiny_vit)
    ck = tmp_path / "run.ckpt"
    fit(make_fabric(), model, loss_fn, loader, steps=2, lr=1e-3, ckpt_path=ck, ckpt_every=1, config={"lr": 1})
    with pytest.raises(ValueError, match="another config"):
        fit(make_fabric(), model, loss_fn, loader, steps=4, lr=1e-3, ckpt_path=ck, config={"lr": 2})


def test_skipped_backward_leaves_parameters_unchanged(tiny_vit):
    model, loader, loss_fn = _setup(tiny_vit)
    snaps = []
    res = fit(make_fabric(), model, loss_fn, loader, steps=4, lr=1e-2,
              should_backward=lambda step, logs: step % 2 == 0,
              on_step=lambda step, m: snaps.append({k: v.clone() for k, v in m.state_dict().items()}))
    assert res.backward_passes == 2 and res.skipped == 2
    assert all(torch.equal(snaps[1][k], snaps[0][k]) for k in snaps[0])      # step 1 skipped
    assert not all(torch.equal(snaps[2][k], snaps[1][k]) for k in snaps[0])  # step 2 trained


def test_nothing_to_train_is_an_error(tiny_vit):
    model, loader, loss_fn = _setup(tiny_vit)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the module requires grad"):
        fit(make_fabric(), model, loss_fn, loader, steps=1, lr=1e-3)


def test_cosine_schedule_warms_up_and_decays():
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup=10) == pytest.approx(0.0)


@pytest.mark.slow
def test_two_process_cpu_ddp_ends_with_identical_parameters(tmp_path):
    """2 ranks (gloo), different batches each, all-reduced gradients: identical parameters at the end."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "vitadapt.ddp_check", str(out), "--devices", "2", "--steps", "3"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == 3
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # and they trained: the parameters moved away from the seeded initialisation
    import timm
    torch.manual_seed(0)
    init = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=48, num_heads=2, num_classes=10).state_dict()
    assert not torch.equal(init["head.weight"], r0["params"]["head.weight"])


def test_fit_recipe_hooks_scale_groups_schedule_wd_and_log_on_step():
    """param_groups' lr_scale/wd_scale, lr_schedule, wd_schedule, before_step and on_step's logged dict all reach the
    optimizer and the history (the official recipes' layer-wise decay, weight-decay schedule and frozen layers)."""
    import torch
    from torch import nn

    from vitadapt.train import fit, make_fabric, optimizer_groups
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    seen = []

    def groups(m):
        return [{"params": list(m[0].parameters()), "lr_scale": 0.5, "wd_scale": 1.0},
                {"params": list(m[1].parameters()), "lr_scale": 1.0, "wd_scale": 0.0}]

    def before(step, m):                        # freeze the last layer for the first 2 steps
        if step < 2:                            # m is Fabric's wrapper: reach the layers through the model
            for p in model[1].parameters():
                p.grad = None

    def on_step(step, m):
        seen.append(step)
        return {"tracked": float(step) * 10}

    loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
    w1 = model[1].weight.detach().clone()
    loss_fn = lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), {})
    res = fit(make_fabric(), model, loss_fn, loader, steps=2, lr=0.1, weight_decay=0.04, param_groups=groups,
              lr_schedule=lambda s: 1.0 if s == 0 else 0.5, wd_schedule=lambda s: 0.04 + 0.1 * s,
              before_step=before, on_step=on_step)
    assert torch.equal(model[1].weight, w1)                   # no gradient reached it inside the window
    assert [h["lr"] for h in res.history] == [0.1, 0.05]
    assert [round(h["wd"], 6) for h in res.history] == [0.04, 0.14]
    assert [h["tracked"] for h in res.history] == [0.0, 10.0] and seen == [0, 1]
    with pytest.raises(ValueError, match="exactly one group"):
        optimizer_groups(model, lambda m: [{"params": list(m[0].parameters())}])
