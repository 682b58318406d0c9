"""The gpu profile: its configs, the offline fallback, the no-CUDA dry run, and the estimated time (vitadapt.plan)."""

import dataclasses

import pytest
import torch

from vitadapt.config import DeviceMissingError, ExperimentConfig, build_config
from vitadapt.experiments.baselines import BaselineConfig
from vitadapt.experiments.budgets import BudgetConfig
from vitadapt.experiments.data_backbones import DataBackboneConfig
from vitadapt.experiments.explora import ExploraConfig
from vitadapt.experiments.rlrr import RLRRConfig
from vitadapt.experiments.upstep import UpStepConfig
from vitadapt.protocol import setup
from vitadapt.runner import discover

CONFIGS = {"00": DataBackboneConfig, "01": BaselineConfig, "10": ExploraConfig, "11": ExploraConfig,
           "12": ExploraConfig, "20": UpStepConfig, "21": UpStepConfig, "30": RLRRConfig, "31": RLRRConfig,
           "40": BudgetConfig, "90": ExperimentConfig, "99": ExperimentConfig}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_torchgeo_data(tmp_path, monkeypatch):
    """RESISC45 and EuroSAT are not here (an empty folder given for each) and cannot be downloaded (offline)."""
    for name in ("resisc45", "eurosat", "ucmerced"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"VITADAPT_{name.upper()}_ROOT", str(tmp_path / name))
    monkeypatch.setenv("VITADAPT_OFFLINE", "1")


@pytest.mark.parametrize("nb", [p.stem for p in discover("")])
def test_gpu_profile_validates_for_every_notebook(nb):
    cfg = build_config(CONFIGS[nb[:2]], "gpu", nb)
    assert (cfg.profile, cfg.accelerator, cfg.devices, cfg.precision, cfg.num_workers) == \
        ("gpu", "cuda", 1, "bf16-mixed", 8)
    assert len(cfg.seeds) >= 3 and cfg.dry_run == "auto"
    for alt in cfg.fallbacks:                       # every fallback is itself a valid config
        dataclasses.replace(cfg, **alt)
    if nb[:2] in ("10", "12", "20", "21"):
        assert (cfg.weights, cfg.arch, cfg.img_size) == ("dinov2_vitb14", "vit_base_patch14_dinov2", 224)
        offline = cfg.fallbacks[-1]
        assert offline["weights"] == "dinov2_vits14_imgfocus" and (
            offline.get("dataset") == "aid" or offline.get("domains") == ["aid"])
    if nb[:2] in ("30", "31"):
        assert cfg.weights == "vitb16_in21k" and all(t.startswith("vtab1k:") for t in cfg.tasks)


def test_bad_fallbacks_name_the_valid_fields():
    with pytest.raises(ValueError, match=r"fallbacks\[0\]: unknown field\(s\) \['datset'\]; valid: .*dataset"):
        build_config(ExperimentConfig, "smoke", fallbacks=[{"datset": "aid"}])
    with pytest.raises(ValueError, match=r"fallbacks\[0\]=.* must be a non-empty mapping"):
        build_config(ExperimentConfig, "smoke", fallbacks=["aid"])


def test_fallbacks_are_tried_in_order_and_recorded(no_torchgeo_data):
    said = []
    cfg = build_config(ExperimentConfig, "smoke", dataset="resisc45",
                       fallbacks=[{"dataset": "eurosat"}, {"dataset": "synthetic"}])
    with pytest.warns(UserWarning, match="FALLBACK"):
        got, rec = setup.resolve_fallbacks(cfg, say=said.append)
    assert got.dataset == "synthetic" and rec["fallback"] == 1 and rec["dataset_used"] == ["synthetic"]
    assert "resisc45" in rec["reason"] and "fallbacks[0]" in rec["tried"][0] and "eurosat" in rec["tried"][0]
    assert said and said[0].startswith("!!!!!!!! FALLBACK") and "USING fallbacks[1]" in said[0]
    # a field given explicitly is never replaced by a fallback
    got, rec = setup.resolve_fallbacks(cfg, explicit=("dataset",), say=said.append)
    assert got.dataset == "resisc45" and rec["fallback"] is None and "given explicitly" in rec["tried"][1]


def test_without_fallbacks_nothing_changes():
    cfg = build_config(ExperimentConfig, "smoke")
    assert setup.resolve_fallbacks(cfg) == (cfg, None)          # the smoke profile is untouched (cpu: AID's
    # fallback to UCMerced, tests/test_cpu_fallback.py)


def test_gpu_profile_offline_falls_back_to_aid_and_imgfocus_saying_so(no_torchgeo_data, no_cuda, shared_aid,
                                                                     tmp_path, capsys):
    with pytest.warns(UserWarning, match="FALLBACK"):
        S = setup.start("10_explora_dinov2", ExploraConfig, "gpu", out_dir=str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "FALLBACK" in out and "'aid'" in out and "dinov2_vits14_imgfocus" in out
    assert (S.cfg.dataset, S.cfg.weights, S.cfg.arch) == ("aid", "dinov2_vits14_imgfocus", "vit_small_patch14_dinov2")
    rec = S.run.record()["sources"]["fallback"]
    assert rec["dataset_used"] == ["aid"] and rec["weights_used"] == "dinov2_vits14_imgfocus"
    assert rec["configured"]["data"] == ["resisc45"] and "resisc45" in rec["reason"]
    assert S.dry and "no CUDA device" in S.dry                  # planned, not run, on a machine without CUDA


def test_no_cuda_is_a_dry_run_reason_with_auto_and_an_error_with_no(no_cuda, tmp_path):
    cfg = build_config(ExperimentConfig, "gpu", dataset="synthetic", weights="random", fallbacks=[])
    reason = setup.dry_run_reason(cfg, needs={})
    assert reason.startswith("not available here: no CUDA device") and "accelerator='cuda'" in reason
    assert setup.dry_run_reason(dataclasses.replace(cfg, accelerator="cpu"), needs={}) is None
    with pytest.raises(DeviceMissingError, match=r"no CUDA device .*dry_run='no'"):
        setup.start("01_baselines", BaselineConfig, "gpu", dry_run="no", out_dir=str(tmp_path / "out"))


def test_estimate_scales_with_the_budget():
    from vitadapt.plan import estimate, macs_per_image
    assert round(macs_per_image("vit_base_patch16_224", 224) / 1e9, 1) == 17.6     # timm's table: 17.58 GMACs
    base, more = (estimate("gpu", ["10_explora_dinov2"], {"pretrain_steps": s})[0] for s in (200, 400))
    crops = 2 + 8 * (98 / 224) ** 2                                                 # 2 global + 8 local crops
    assert more["train_images"] - base["train_images"] == round(4 * 3 * 200 * 32 * crops)
    assert more["est_s"] > base["est_s"]
    r10, r20 = (estimate("gpu", ["30_rlrr"], {"epochs": e})[0] for e in (10, 20))
    assert r20["train_images"] == 2 * r10["train_images"] and r20["est_s"] > 1.9 * r10["est_s"]
    with pytest.raises(ValueError, match="profile='tpu' is not valid"):
        estimate("tpu", ["30_rlrr"])


def test_the_gpu_suite_is_planned_for_about_an_hour():
    from vitadapt.plan import estimate, format_estimate
    from vitadapt.runner import plan_text
    rows = estimate("gpu", discover(""))
    total = sum(r["est_s"] for r in rows)
    assert 40 * 60 <= total <= 80 * 60, total
    assert {r["notebook"] for r in rows if r["est_s"]} >= {"10_explora_dinov2", "20_upstep", "30_rlrr"}
    text = plan_text("gpu", discover(""))
    assert text == format_estimate(rows, "gpu") and "ESTIMATE" in text and "total" in text


def test_rlrr_gpu_profile_offline_falls_back_to_the_stand_ins(no_torchgeo_data, shared_aid, tmp_path, monkeypatch):
    monkeypatch.setenv("VITADAPT_VTAB1K_ROOT", str(tmp_path / "no_vtab1k"))
    cfg = build_config(RLRRConfig, "gpu", "30_rlrr")
    with pytest.warns(UserWarning, match="FALLBACK"):
        got, rec = setup.resolve_fallbacks(cfg, say=lambda _: None)
    assert got.tasks == ("fashion_mnist", "aid", "clevr_count") and got.weights == "dinov2_vits14_imgfocus"
    assert rec["fallback"] == 1 and rec["dataset_used"] == ["fashion_mnist", "aid", "clevr_count"]
    assert "vtab1k:dtd" in rec["reason"] and "vitb16_in21k" in rec["tried"][0]   # stand-ins with IN-21k: no hub


def test_upstep_estimate_backpropagates_only_the_online_view_with_an_offline_stream():
    from vitadapt.plan import OVERHEAD, TRAIN_COST, estimate
    ema, stop, sym = (estimate("gpu", ["20_upstep"], {"offline_stream": s})[0] for s in ("ema", "stop_grad", "symmetric"))
    assert ema == stop                                   # both: the offline view is a forward without gradient
    assert sym["train_images"] == 2 * ema["train_images"]                    # symmetric: both views back-propagate
    assert ema["eval_images"] - sym["eval_images"] == ema["train_images"]    # ema: the other view a forward only
    backward = OVERHEAD * (TRAIN_COST - 1) * ema["train_images"] / ema["infer_img_s"]   # one view's backward share
    assert sym["est_s"] - ema["est_s"] == pytest.approx(backward, abs=0.2)
    abl = {s: estimate("gpu", ["21_upstep_ablations"], {"offline_stream": s, "ablate_offline": ()})[0]
           for s in ("ema", "symmetric")}                # the default variant's stream counts too
    assert abl["symmetric"]["train_images"] == 2 * abl["ema"]["train_images"]


def test_rlrr_official_hparams_search_no_grid_for_rlrr_and_count_the_cooldown():
    from vitadapt.experiments import rlrr
    from vitadapt.finetune import select_then_test_steps
    from vitadapt.plan import estimate
    cfg = build_config(RLRRConfig, "paper", "30_rlrr")
    assert cfg.hparams == "official" and "rlrr" in cfg.methods and cfg.cooldown_epochs == 10
    runs, n_grid, epochs = len(cfg.methods), len(cfg.lr_multipliers) * len(cfg.weight_decays), cfg.epochs + 10
    steps = lambda searches: select_then_test_steps(800, 200, batch_size=32, epochs=epochs, grid_points=n_grid,
                                                    seeds=3, runs=runs, searches=searches)["total_images"]
    official, grid = (estimate("paper", ["30_rlrr"], {"hparams": h})[0] for h in ("official", "grid"))
    assert official["train_images"] == len(cfg.tasks) * steps(runs - 1)      # every method but RLRR searches its grid
    assert grid["train_images"] == len(cfg.tasks) * steps(runs)
    assert rlrr.plan(cfg, runs)["total_steps"] * 32 == official["train_images"]   # what 30 prints agrees
    assert rlrr.plan(cfg, 4, ablations=True)["total_steps"] == len(cfg.tasks) * 4 * 3 * 31 * epochs  # 31: no search
    searched = build_config(RLRRConfig, "paper", "30_rlrr", hparams="grid")
    assert rlrr.plan(searched, 4, ablations=True)["total_steps"] == len(cfg.tasks) * (n_grid * 25 + 4 * 3 * 31) * epochs


def test_protocol_official_adds_the_harness_and_per_epoch_test_scoring():
    from vitadapt.plan import estimate
    aug = {"official_lp_augment": True, "official_lp_iterations": 0}       # the augmented harness, 10 passes
    clean, both = (estimate("gpu", ["10_explora_dinov2"], {"protocol": p, **aug})[0] for p in ("clean", "both"))
    assert clean["train_images"] == both["train_images"]
    n_train, n_val, n_test = 20 * 45, 10 * 45, 40 * 45                       # RESISC45 at 20 / 10 / 40 per class
    harness = 10 * (n_train // 256) * 256 + n_val + n_test                  # official_lp_epochs 10 of batch 256
    tracked = (-(-150 * 64 // n_train) - 1) * n_test                         # 150 steps of 64: a test pass per epoch
    assert both["eval_images"] - clean["eval_images"] == 5 * 3 * (harness + tracked) and both["est_s"] > clean["est_s"]
    a, b = (estimate("gpu", ["10_explora_dinov2"], {"official_lp_iterations": i, "official_lp_augment": True})[0]
            for i in (100, 200))
    assert b["eval_images"] - a["eval_images"] == 5 * 3 * 100 * 256          # iterations x batch augmented forwards
    once = estimate("gpu", ["10_explora_dinov2"], {"protocol": "both"})[0]     # the gpu profile: features once
    assert once["eval_images"] - clean["eval_images"] == 5 * 3 * (n_train + n_val + n_test + tracked)
    abl = {p: estimate("gpu", ["12_explora_ablations"], {"protocol": p})[0] for p in ("clean", "both")}
    assert abl["both"]["est_s"] > abl["clean"]["est_s"]                        # the harness, no fine-tune there
    r_clean, r_both = (estimate("gpu", ["30_rlrr"], {"protocol": p})[0] for p in ("clean", "both"))
    assert r_both["eval_images"] - r_clean["eval_images"] == 3 * 5 * 3 * 2000 * (10 - 1)   # RLRR: test every epoch


def test_pretraining_accumulation_counts_in_the_estimate():
    """The paper profile's DinoV2 pre-training accumulates 32 batches per step (pretrain_accumulate): 32x the images."""
    import dataclasses

    from vitadapt.config import build_config
    from vitadapt.experiments.explora import ExploraConfig
    from vitadapt.plan import _explora
    cfg = build_config(ExploraConfig, "paper", "10_explora_dinov2", dry_run="yes")
    one = dataclasses.replace(cfg, pretrain_accumulate=1, finetune=False, protocol="clean")
    full = dataclasses.replace(cfg, finetune=False, protocol="clean")
    assert _explora(full, False)[0] == pytest.approx(32 * _explora(one, False)[0], rel=0.01)
