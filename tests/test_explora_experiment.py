"""The ExPLoRA experiment module (notebooks 10-12) on tiny random ViTs and synthetic images: specs and config
validation, each variant's pre-training end to end (exactly the intended parts change; a plain timm ViT comes
back), evaluation rows, tables, the ablation grid, the widget action, and the paper's trainable counts."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import timm
import torch
from torch.utils.data import DataLoader, Dataset

from vitadapt import papers
from vitadapt.config import build_config
from vitadapt.data.unlabelled import Unlabelled
from vitadapt.experiments import explora as E
from vitadapt.protocol import lora_eval
from vitadapt.ssl import continued
from vitadapt.peft.common import count_trainable
from vitadapt.peft.lora import has_lora
from vitadapt.peft.qkv import SplitQKV
from vitadapt.protocol import figures, probe, setup, tables

FAST = dict(n_train_per_class=4, n_val_per_class=2, n_test_per_class=3, probe_Cs=[1.0], knn_ks=[3], pretrain_steps=2,
            pretrain_batch_size=4, pretrain_lr=0.01, seeds=[0], ft_steps=2, ft_batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread", "private_feature_cache")


def make_cfg(tmp_path, notebook="10_explora_dinov2", **kw):
    return build_config(E.ExploraConfig, "smoke", notebook, out_dir=str(tmp_path / "out"), **{**FAST, **kw})


@pytest.fixture(scope="module")
def dino_cfg(tmp_path_factory):
    return make_cfg(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def dino_base(dino_cfg):
    return E.load_base(dino_cfg, verbose=False)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------------------------- specs and config
def test_unfreeze_and_target_specs():
    assert E.parse_unfreeze("L", 24) == (23,)
    assert E.parse_unfreeze("1,L", 24) == (0, 23)
    assert E.parse_unfreeze("1,L-1,L", 24) == (0, 22, 23)
    assert E.parse_unfreeze("[1, L]", 12) == (0, 11)
    assert E.parse_unfreeze("none", 12) == () == E.parse_unfreeze("", 12)
    assert E.parse_unfreeze((-1, 0), 12) == (0, 11)
    assert E.unfreeze_label("1,L-1,L") == "[1,L-1,L]" and E.unfreeze_label("none") == "none"
    for bad in ("L+1", "0", "13", "x"):
        with pytest.raises(ValueError, match="unfreeze spec"):
            E.parse_unfreeze(bad, 12)
    assert E.parse_targets("q,v") == ("q", "v")
    assert E.parse_targets("q,k,v,proj,mlp") == ("q", "k", "v", "proj", "fc1", "fc2")
    assert E.parse_targets("none") == ()
    assert E.targets_label("q,k,v,proj,fc1,fc2") == "q,k,v,proj,mlp"
    with pytest.raises(ValueError, match="valid: q, k, v, proj, fc1, fc2, mlp"):
        E.parse_targets("q,o")


@pytest.mark.parametrize("kw, match", [
    ({"objective": "simclr"}, "objective='simclr' is not valid; valid values: 'dinov2', 'mae'"),
    ({"variants": ["explora", "lora"]}, "valid values: frozen, explora, lora_only, block_only, full"),
    ({"unfreeze": "1,M"}, "unfreeze: unfreeze spec"),
    ({"ablate_unfreeze": ["L", "L-"]}, "ablate_unfreeze"),
    ({"targets": "q,z"}, "targets: targets spec"),
    ({"ft_targets": "none"}, "ft_targets"),
    ({"ablate_rank": [8, 2.5]}, "ablate_rank"),
    ({"ablate_norms": ["no"]}, "ablate_norms"),
    ({"local_size": 32}, "local_size=32 must be smaller than img_size=32"),
    ({"pretrain_dataset": "nope"}, "pretrain_dataset='nope' is not valid"),
    ({"eval_weights": "ema"}, "valid values: 'teacher', 'student'"),
])
def test_config_rejects_bad_values_naming_the_valid_ones(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_cfg(tmp_path, **kw)


def test_profiles_build_for_every_notebook():
    for nb in ("10_explora_dinov2", "11_explora_mae", "12_explora_ablations"):
        for profile in ("smoke", "cpu", "gpu", "paper"):
            cfg = build_config(E.ExploraConfig, profile, nb)
            assert cfg.objective == ("mae" if nb.startswith("11") else "dinov2")
            assert len(cfg.seeds) >= (3 if profile == "cpu" else 1)


# ----------------------------------------------------------------------------------------------- paper counts
def test_paper_counts_on_the_meta_device():
    c = E.paper_counts()
    assert c["explora_trainable"] == 18_724_864 == papers.EXACT_COUNTS["explora_vitl14_L_r64_qv"]
    assert c["finetune_lora_trainable"] == 786_432 == papers.EXACT_COUNTS["finetune_lora_r8_qv_vitl14"]
    assert c["explora_groups"]["unfrozen_blocks"] == 12_598_272
    # the MAE ViT-L/16 has no layer-scale: the same rule gives 2 x 1024 fewer
    assert E.paper_counts("vit_large_patch16_224")["explora_trainable"] == 18_724_864 - 2048


def test_plan_table_matches_real_models(dino_cfg, dino_base):
    plan = E.plan_table(dino_cfg)
    assert list(plan.index) == list(E.VARIANTS)
    for v in E.VARIANTS:
        m = E.apply_variant(dino_cfg, copy.deepcopy(dino_base[0]), v)
        assert plan.loc[v, "trainable backbone"] == count_trainable(m)
        if v == "explora":
            obj, _, _ = E.build_objective(dino_cfg, m, 0)
            assert plan.loc[v, "objective (heads/decoder)"] == count_trainable(obj) - count_trainable(m)
    assert plan.loc["full", "trainable backbone"] == plan.loc["full", "backbone params"]
    assert plan.loc["frozen", "trainable backbone"] == 0


# ----------------------------------------------------------------------------------------------- data
class _Poison:
    """A label that fails on any use: proves it is never read."""

    def __getattr__(self, name):
        raise AssertionError(f"label read ({name})")

    def __eq__(self, other):
        raise AssertionError("label compared")

    __hash__ = None

    def __int__(self):
        raise AssertionError("label converted")

    __index__ = __int__


class _Images(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], _Poison()


def test_unlabelled_drops_labels_unread(dino_cfg):
    pool, idx = E.pretrain_pool(dino_cfg, 0)
    ds = Unlabelled(_Images(pool), idx[:8], continued.augmentation(dino_cfg, dino_cfg.img_size))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert isinstance(batch, list) and len(batch) == 2 + dino_cfg.n_local_crops
    assert batch[0].shape == (4, 3, 32, 32) and batch[2].shape == (4, 3, 16, 16)
    # n_pretrain_images: a different seed draws other images, the same seed the same ones
    c = E.ExploraConfig(**{**dino_cfg.to_dict(), "n_pretrain_images": 20})
    a = E.pretrain_pool(c, 0)[1]
    assert len(a) == 20 and E.pretrain_pool(c, 0)[1] == a != E.pretrain_pool(c, 1)[1]


# ----------------------------------------------------------------------------------------------- pre-training
def _qkv_rows(sd, block, which, dim):
    w = sd[f"blocks.{block}.attn.qkv.weight"]
    return w[{"q": 0, "k": 1, "v": 2}[which] * dim:({"q": 0, "k": 1, "v": 2}[which] + 1) * dim]


def test_explora_variant_end_to_end(dino_cfg, dino_base):
    """DinoV2 ExPLoRA: a plain timm ViT comes back; exactly the trainable set moved; the base model is untouched."""
    base, info = dino_base
    before = _state(base)
    pre = E.pretrain_variant(dino_cfg, "explora", 0, dino_base)
    m, rec = pre.model, pre.record
    assert not has_lora(m) and not any(isinstance(x, SplitQKV) for x in m.modules())
    assert getattr(m, "explora_config", None) is None and all(p.requires_grad for p in m.parameters())
    fresh = timm.create_model(dino_cfg.arch, pretrained=False, img_size=dino_cfg.img_size, num_classes=0,
                              **dino_cfg.arch_kwargs)
    fresh.load_state_dict(m.state_dict(), strict=True)
    ref = E.apply_explora(copy.deepcopy(base), unfreeze_blocks=(-1,), rank=dino_cfg.rank, targets=("q", "v"))
    obj, _, _ = E.build_objective(dino_cfg, ref, 0)
    assert rec["trainable_backbone"] == count_trainable(ref)
    assert rec["trainable_objective"] == count_trainable(obj) - count_trainable(ref) > 0
    assert rec["steps"] == dino_cfg.pretrain_steps == len(pre.history)
    assert rec["images_seen"] == dino_cfg.pretrain_steps * dino_cfg.pretrain_batch_size
    assert rec["wall_time_s"] > 0 and rec["peak_memory_mb"] > 0 and rec["memory_increment_mb"] >= 0
    assert {"dino", "ibot", "koleo"} <= set(pre.history[0])
    after, dim = _state(m), base.embed_dim
    for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
              "blocks.0.attn.qkv.bias"):
        assert torch.equal(after[k], before[k]), f"{k} must stay frozen"
    assert torch.equal(_qkv_rows(after, 0, "k", dim), _qkv_rows(before, 0, "k", dim))   # K has no LoRA
    for which in ("q", "v"):                                                             # Q, V: LoRA merged in
        assert not torch.equal(_qkv_rows(after, 0, which, dim), _qkv_rows(before, 0, which, dim))
    for k in ("blocks.1.mlp.fc1.weight", "blocks.0.norm1.weight", "norm.weight", "cls_token"):
        assert not torch.equal(after[k], before[k]), f"{k} must train"
    assert all(torch.equal(v, before[k]) for k, v in _state(base).items())              # base untouched


def test_full_frozen_and_lora_only_variants(dino_cfg, dino_base):
    base, _ = dino_base
    before = _state(base)
    full = E.pretrain_variant(dino_cfg, "full", 0, dino_base)
    assert full.record["trainable_backbone"] == full.record["backbone_params"]
    assert not torch.equal(full.model.patch_embed.proj.weight, before["patch_embed.proj.weight"])
    frozen = E.pretrain_variant(dino_cfg, "frozen", 0, dino_base)
    assert frozen.model is base and frozen.record["trainable_backbone"] == 0 and frozen.record["steps"] == 0
    lo = E.pretrain_variant(dino_cfg, "lora_only", 0, dino_base)
    after = _state(lo.model)
    assert torch.equal(after["blocks.1.mlp.fc1.weight"], before["blocks.1.mlp.fc1.weight"])   # no unfrozen block
    assert not torch.equal(_qkv_rows(after, 1, "q", base.embed_dim), _qkv_rows(before, 1, "q", base.embed_dim))
    # the same seed repeats exactly
    again = E.pretrain_variant(dino_cfg, "lora_only", 0, dino_base)
    assert all(torch.equal(v, after[k]) for k, v in _state(again.model).items())


def test_teacher_is_kept_when_asked(tmp_path, dino_base):
    cfg = make_cfg(tmp_path, eval_weights="teacher")
    base, _ = dino_base
    t = E.pretrain_variant(cfg, "block_only", 0, dino_base).model
    s = E.pretrain_variant(E.ExploraConfig(**{**cfg.to_dict(), "eval_weights": "student"}), "block_only", 0,
                           dino_base).model
    d_t = (t.blocks[-1].mlp.fc1.weight - base.blocks[-1].mlp.fc1.weight).norm()
    d_s = (s.blocks[-1].mlp.fc1.weight - base.blocks[-1].mlp.fc1.weight).norm()
    assert 0 < d_t < d_s          # the EMA teacher follows the student only part of the way


def test_mae_variant_with_warmed_decoder(tmp_path):
    cfg = make_cfg(tmp_path, "11_explora_mae", decoder_warmup_steps=2)
    base = E.load_base(cfg, verbose=False)
    assert not getattr(base[0], "dynamic_img_size", False)
    dec = E.warm_decoder(cfg, base[0], 0)
    assert dec and all(k.startswith(("decoder_embed.", "decoder.", "decoder_pred.")) for k in dec)
    before = _state(base[0])
    pre = E.pretrain_variant(cfg, "explora", 0, base, decoder_state=dec)
    assert not has_lora(pre.model) and "mse" in pre.history[0]
    after = _state(pre.model)
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert not torch.equal(after["blocks.1.mlp.fc1.weight"], before["blocks.1.mlp.fc1.weight"])
    assert "randomly initialised encoder" in E.starting_point(cfg, base[1])
    assert "NOT an MAE encoder" in E.starting_point(cfg, {"weights_used": "dinov2_vits14_imgfocus"})
    assert "fresh" in E.starting_point(cfg) and "NOT" not in E.starting_point(cfg, {"weights_used": "mae_vitb16"})
    assert E.warm_decoder(E.ExploraConfig(**{**cfg.to_dict(), "decoder_warmup_steps": 0}), base[0], 0) is None


# ----------------------------------------------------------------------------------------------- evaluation
def test_evaluate_variant_rows(dino_cfg, dino_base):
    model, info = dino_base
    rows = E.evaluate_variant(dino_cfg, model, info, 0)          # smoke 10: protocol both
    ft_name = f"LoRA-r{dino_cfg.ft_rank} fine-tune"
    assert [r["eval"] for r in rows] == ["linear probe", "kNN", "linear probe (official)",
                                         "linear probe (official harness, chosen on val)", "kNN (official)",
                                         "kNN (official settings, chosen on val)", ft_name, ft_name + " (official)"]
    assert [r["eval"] for r in rows] == E.lora_eval.eval_names(dino_cfg)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    ft, best = rows[-2], rows[-1]
    assert best["test_acc"] >= ft["test_acc"] and "best test epoch" in best["selected"]   # the same run's best epoch
    clean = E.evaluate_variant(dataclasses.replace(dino_cfg, protocol="clean"), model, info, 0)
    assert [r["eval"] for r in clean] == ["linear probe", "kNN", ft_name]
    assert [r["test_acc"] for r in clean] == [rows[0]["test_acc"], rows[1]["test_acc"], ft["test_acc"]]
    d = model.embed_dim
    n_cls = 10
    assert ft["ft_trainable"] == len(model.blocks) * 2 * dino_cfg.ft_rank * 2 * d + d * n_cls + n_cls
    assert "(fixed)" in ft["selected"] and ft["ft_steps"] == dino_cfg.ft_steps
    assert not has_lora(model)                        # the fine-tune worked on a copy


def test_probe_head_reproduces_the_probe_on_images(tmp_path, dino_base):
    """LP-FT: the folded probe head on the model's own CLS output predicts what the probe predicts on the cached
    features, and the fine-tune starts from it."""
    from vitadapt.finetune import evaluate, materialize
    from vitadapt.vit import fresh_head
    cfg = make_cfg(tmp_path, ft_head_init="probe", probe_Cs=[0.1, 1.0])
    model, info = dino_base
    splits = setup.labelled(cfg, 0)
    W, b, C = probe.probe_head(cfg, model, info, splits, 0)
    assert W.shape == (10, model.embed_dim) and C in (0.1, 1.0)
    m = fresh_head(copy.deepcopy(model), 10)
    m.head.weight.data.copy_(W)
    m.head.bias.data.copy_(b)
    val = materialize(splits.val, cfg.img_size)
    with torch.no_grad():
        cls = model.forward_features(val.x)[:, 0]
        pred_model = m(val.x).argmax(1)
    assert torch.equal(pred_model, (cls @ W.T + b).argmax(1))
    assert evaluate(m, val) == pytest.approx(float((pred_model == torch.tensor(val.targets)).float().mean()))
    r = lora_eval.lora_finetune(cfg, model, splits, 0, info=info)
    assert "head from probe" in r["selected"]


def test_finetune_grid_is_chosen_on_val(tmp_path, dino_base):
    cfg = make_cfg(tmp_path, ft_lrs=[1e-3, 1e-2])
    r = lora_eval.lora_finetune(cfg, dino_base[0], setup.labelled(cfg, 0), 0)
    assert "(on val)" in r["selected"] and r["val_acc"] is not None


def test_comparison_tables_end_to_end(tmp_path):
    """The notebook-10 pipeline on two seeds and three variants: evaluation rows, run records, tables, summary."""
    cfg = make_cfg(tmp_path, seeds=[0, 1], variants=["frozen", "explora", "full"], finetune=False, protocol="clean")
    lines = []
    res = E.run_comparison(cfg, log=lines.append)
    assert len(res.evals) == 2 * 3 * 2 and len(res.runs) == 2 * 3 and len(lines) == 6
    acc = E.accuracy_table(res.evals)
    assert list(acc.index) == ["frozen", "explora", "full"] and list(acc.columns[:2]) == ["linear probe", "kNN"]
    assert all("±" in v for v in acc["kNN"]) and set(acc["seeds"]) == {2}
    delta = tables.paired_delta(res.evals, "variant")
    assert list(delta.index) == ["explora", "full"]
    cost = E.cost_table(res.runs)
    assert cost.loc["frozen", "trainable_backbone"] == 0 and cost.loc["full", "trainable_fraction"] == 1.0
    s = E.summary(res)
    assert s["test_acc"]["explora/kNN"]["n"] == 2 and "explora" in s["cost"]
    import matplotlib
    matplotlib.use("Agg")
    figures.bars(res.evals, "variant", chance=0.1)
    figures.curves(res.history, "variant", E.LOSSES)
    assert isinstance(papers.explora_table(), pd.DataFrame)
    assert len(papers.choices_table("ExPLoRA", cfg)) == len(papers.CHOICES["ExPLoRA"])
    rows = E.result_rows(res, "ExPLoRA")
    assert {(r["table"], r["method"]) for r in rows} == {(f"ExPLoRA: {ev}", v) for v in ("frozen", "explora", "full")
                                                         for ev in ("linear probe", "kNN")}
    by = {(r["table"], r["method"]): r for r in rows}
    assert by["ExPLoRA: kNN", "explora"]["n"] == 2 and by["ExPLoRA: kNN", "frozen"]["trainable"] == 0
    assert by["ExPLoRA: kNN", "full"]["trainable"] == cost.loc["full", "trainable_backbone"]
    assert by["ExPLoRA: kNN", "full"]["wall_time_s"] > 0
    assert papers.value("ExPLoRA: linear probe", "explora") is not None      # our rows join the published ones


# ----------------------------------------------------------------------------------------------- ablations, widget
def test_ablation_variants_one_factor_at_a_time(tmp_path):
    cfg = make_cfg(tmp_path, "12_explora_ablations", ablate_unfreeze=["L", "none", "1,L", "1,L-1,L"], ablate_rank=[4, 8],
                   ablate_targets=["q,v", "q,k,v", "q,k,v,proj,mlp"], ablate_norms=[True, False])
    jobs = E.ablation_variants(cfg)
    labels = [j[0] for j in jobs]
    assert jobs[0][1] == "frozen" and jobs[1][2] == {}
    # values equal to the default are dropped (L, rank 4, q,v, norms on)
    assert labels[2:] == ["U=none", "U=[1,L]", "U=[1,L-1,L]", "r=8", "LoRA on q,k,v", "LoRA on q,k,v,proj,mlp (MLP r/4)",
                          "norms frozen"]
    plan = E.plan_table(cfg, jobs)
    assert plan.loc["U=none", "trainable backbone"] < plan.loc[labels[1], "trainable backbone"] < \
        plan.loc["U=[1,L]", "trainable backbone"] < plan.loc["U=[1,L-1,L]", "trainable backbone"]
    assert plan.loc["norms frozen", "trainable backbone"] < plan.loc[labels[1], "trainable backbone"]
    # notebook 12's result rows: table "ExPLoRA ablations: <eval>", the label as method (joins papers.py)
    evals = pd.DataFrame([{"variant": label, "seed": 0, "eval": ev, "test_acc": 0.5, "chance": 0.1}
                          for label in labels for ev in ("linear probe", "kNN")])
    runs = pd.DataFrame([{"variant": label, "seed": 0, "trainable_backbone": 7, "wall_time_s": 1.5} for label in labels])
    rows = E.result_rows(E.ExploraResults(evals, runs, pd.DataFrame()), "ExPLoRA ablations")
    assert len(rows) == 2 * len(labels) and {r["table"] for r in rows} == {"ExPLoRA ablations: linear probe",
                                                                           "ExPLoRA ablations: kNN"}
    lp = {r["method"]: r for r in rows if r["table"] == "ExPLoRA ablations: linear probe"}
    assert lp["U=[1,L-1,L]"]["mean"] == 50.0 and lp["U=[1,L-1,L]"]["trainable"] == 7
    assert papers.value("ExPLoRA ablations: linear probe", "U=[1,L-1,L]") is not None


def test_widget_panel_runs_one_configuration(tmp_path):
    from vitadapt.widgets import ablation_panel
    cfg = make_cfg(tmp_path, "12_explora_ablations", pretrain_steps=1)
    base = E.load_base(cfg, verbose=False)
    panel = ablation_panel(E.panel_fields(cfg), lambda **kw: E.run_single(cfg, base=base, **kw))
    panel.set(unfreeze="none", targets="q,k,v", rank=2, train_norms=False)
    df = panel.run()
    assert panel.last_error is None, panel.last_error
    assert list(df.index) == ["linear probe", "kNN"]
    m = E.apply_explora(copy.deepcopy(base[0]), unfreeze_blocks=(), rank=2, targets=("q", "k", "v"), train_norms=False)
    assert df["trainable"].iloc[0] == count_trainable(m)
    panel.set(unfreeze="1,L")
    panel.controls["pretrain_steps"].value = 0         # invalid: reported in the form, the kernel stays usable
    assert panel.run() is None and "pretrain_steps" in str(panel.last_error)


def test_dry_run_reason(tmp_path):
    cfg = build_config(E.ExploraConfig, "paper", "10_explora_dinov2", data_root=str(tmp_path / "missing"))
    assert "not available here" in setup.dry_run_reason(cfg)
    assert setup.dry_run_reason(make_cfg(tmp_path)) is None
