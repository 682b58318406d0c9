"""The UpStep experiment (notebooks 20/21) on tiny random ViTs: config validation, labels never read during
adaptation, the forgetting and ensemble evaluation, the ablation grid, the dry-run plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from vitadapt.config import build_config
from vitadapt.data.unlabelled import Unlabelled
from vitadapt.eval import model_fingerprint
from vitadapt.experiments import upstep as U
from vitadapt.papers import CHOICES
from vitadapt.peft.common import count_trainable
from vitadapt.protocol import grid, probe
from vitadapt.protocol.setup import backbone, dry_run_reason

pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_thread", "private_feature_cache")


def tiny_cfg(**kw) -> U.UpStepConfig:
    base = dict(domains=["synthetic"], seeds=[0], steps=2, adapt_batch_size=8, n_train_per_class=4,
                n_val_per_class=2, n_test_per_class=3, forgetting_n_train_per_class=3, forgetting_n_val_per_class=2,
                forgetting_n_test_per_class=3, probe_Cs=[1.0], knn_ks=[3], n_prototypes=8, head_hidden_dim=16,
                head_out_dim=8, lora_rank=2, arch_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2})
    base.update(kw)
    return build_config(U.UpStepConfig, "smoke", None, **base)


# ---- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu", "paper"])
@pytest.mark.parametrize("notebook", ["20_upstep", "21_upstep_ablations"])
def test_profiles_build(profile, notebook):
    cfg = build_config(U.UpStepConfig, profile, notebook)
    assert cfg.domains and cfg.seeds
    if profile == "cpu":
        assert cfg.arch == "vit_small_patch14_dinov2" and cfg.img_size == 112 and len(cfg.seeds) >= 3
        assert notebook.startswith("21") or len(cfg.domains) >= 2
        # forgetting on a real set that is not saturated (the synthetic source shapes sat at 92-97 %)
        assert "synthetic" not in cfg.forgetting_dataset and "synthetic" not in cfg.forgetting_fallback
    if profile == "paper" and notebook.startswith("20"):
        assert len(cfg.domains) == 8


@pytest.mark.parametrize("bad, match", [
    (dict(domains=["nope"]), "domains: 'nope' is not valid"),
    (dict(domains=[]), "domains=\\(\\) is empty"),
    (dict(domains=["aid:x"]), "aid:x.*vtab1k:<"),
    (dict(forgetting_dataset="digits", forgetting_fallback="digits"), "equals forgetting_dataset"),
    (dict(ensemble_modes=["max"]), "ensemble_modes.*concat, average"),
    (dict(ablate_cvr=["sometimes"]), "ablate_cvr.*drift, norm, both, none"),
    (dict(ablate_gate=["never"]), "ablate_gate.*none, alternate, cv_signal"),
    (dict(cvr="l2"), "cvr='l2' is not valid"),
    (dict(gate_signal="accuracy"), "gate_signal='accuracy' is not valid"),
    (dict(steps=0), "steps=0 is out of range"),
    (dict(prototype_init="base_kmeans", n_adapt_images=4, n_prototypes=8), "base_kmeans"),
])
def test_bad_values_fail_with_valid_ones(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**bad)


def test_forgetting_set_falls_back_when_it_is_the_target():
    cfg = tiny_cfg(domains=["synthetic", "synthetic_source"])
    assert U.forgetting_dataset_for(cfg, "synthetic") == "synthetic_source"
    assert U.forgetting_dataset_for(cfg, "synthetic_source") == "digits"


def test_ablation_variants_one_factor_at_a_time():
    cfg = tiny_cfg(ablate_cvr=["none", "norm"], ablate_gate=["none", "none"], ablate_rank=[2, 16],
                   ablate_cvr_weight=[10.0])
    v = U.ablation_variants(cfg)
    assert v[0][1] == {} and v[0][0].startswith("default")
    assert [o for _, o in v[1:]] == [{"cvr": "none"}, {"cvr_weight": 10.0}, {"gate": "none"}, {"lora_rank": 16}]


def test_choices_table_names_every_switch():
    cfg = tiny_cfg()
    t = U.choices_table(cfg)
    assert len(t) == len(CHOICES["UpStep"]) and (t["this run"] != "").all()
    for _, _, _, switch in CHOICES["UpStep"]:    # every switch named in CHOICES is a config field
        first = switch.split(":")[0].split(",")[0].split(" ")[0].strip()
        assert hasattr(cfg, first), first


# ---- adaptation never sees labels ------------------------------------------------------------------

class Poison:
    """A label that raises on any use: conversion, comparison, hashing, collation attributes."""

    def _boom(self, *a, **k):
        raise AssertionError("a label was read during UpStep adaptation")

    __int__ = __index__ = __float__ = __eq__ = __lt__ = __hash__ = __bool__ = __len__ = __iter__ = _boom

    def __getattr__(self, name):
        raise AssertionError(f"a label was read during UpStep adaptation ({name})")


class PoisonedImages(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], Poison()

    @property
    def targets(self):
        raise AssertionError("dataset.targets was read during UpStep adaptation")


def test_adaptation_never_reads_labels_and_leaves_the_base_untouched():
    cfg = tiny_cfg(steps=3)
    splits = U.domain_splits(cfg, "synthetic", 0)
    model, _ = backbone(cfg, verbose=False)
    before = model_fingerprint(model)
    poisoned = PoisonedImages(splits.train.base)
    views = Unlabelled(poisoned, range(10), U.augment_for(cfg, "synthetic"))
    item = views[0]
    assert isinstance(item, tuple) and len(item) == 2 and all(t.shape == (3, 32, 32) for t in item)
    objective, fit = U.adapt(cfg, model, (poisoned, list(range(len(poisoned)))), seed=0, domain="synthetic")
    assert (fit.steps, fit.backward_passes, fit.skipped) == (3, 2, 1)              # alternate gate
    assert model_fingerprint(model) == before                                      # base copy untouched
    assert model_fingerprint(objective.model) != before                            # the adapted one moved
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert count_trainable(objective.model) == 2 * 2 * (48 + 3 * 48)              # depth x rank x (in + out)


def test_adaptation_pool_draws_without_labels():
    cfg = tiny_cfg(n_adapt_images=25)
    ds, idx = U.adaptation_pool(cfg, "synthetic", seed=1)
    assert len(idx) == 25 and len(set(idx)) == 25 and max(idx) < len(ds)
    assert U.adaptation_pool(cfg, "synthetic", seed=1)[1] == idx != U.adaptation_pool(cfg, "synthetic", seed=2)[1]
    sub = U.domain_splits(tiny_cfg(), "synthetic", 0).train
    ds0, idx0 = U.adaptation_pool(tiny_cfg(), "synthetic", 0, sub)
    assert ds0 is sub.base and idx0 == sub.indices


# ---- evaluation: ensembles and forgetting ----------------------------------------------------------

class FixedFeatures:
    """A stand-in for the feature cache: features per split by name."""

    def __init__(self, table):
        self.table = table

    def __call__(self, ds):
        return self.table[id(ds)]


def test_ensemble_eval_uses_both_feature_sets():
    rng = np.random.default_rng(0)
    y = {p: np.repeat(np.arange(3), n) for p, n in (("train", 10), ("val", 4), ("test", 6))}
    parts = {p: object() for p in y}
    splits = type("S", (), {p: parts[p] for p in y})()
    noise = {id(parts[p]): (rng.normal(size=(len(y[p]), 5)).astype(np.float32), y[p]) for p in y}
    clean = {id(parts[p]): (np.eye(3, dtype=np.float32)[y[p]] * 5 + 0.01 * rng.normal(size=(len(y[p]), 3)).astype(np.float32), y[p])
             for p in y}
    cfg = tiny_cfg(ensemble_modes=["concat"])
    out = U.evaluate_features(cfg, FixedFeatures(noise), FixedFeatures(clean), splits, seed=0)
    assert set(out) == {"base", "upstep", "ensemble-concat"}
    assert out["upstep"]["linear probe"]["test_acc"] == 1.0 and out["upstep"]["kNN"]["test_acc"] == 1.0
    assert out["ensemble-concat"]["linear probe"]["test_acc"] >= 0.8
    with pytest.raises(ValueError, match="equal widths"):       # average needs equal widths: 5 vs 3
        U.evaluate_features(tiny_cfg(ensemble_modes=["average"]), FixedFeatures(noise), FixedFeatures(clean),
                            splits, seed=0)
    assert set(U.evaluate_features(cfg, FixedFeatures(noise), None, splits, 0)) == {"base"}


def test_forgetting_is_adapted_minus_base_on_the_ood_set():
    r = lambda acc: {"linear probe": {"test_acc": acc, "val_acc": 0.5, "selected": "C=1"},
                     "kNN": {"test_acc": acc / 2, "val_acc": 0.5, "selected": "k=3"}}
    target = {"base": r(0.6), "upstep": r(0.7)}
    ood = {"base": r(0.8), "upstep": r(0.5)}
    rows = {(x["features"], x["eval"]): x for x in probe.forgetting_rows({"domain": "d"}, target, ood, "ood")}
    assert rows[("upstep", "linear probe")]["ood_delta"] == pytest.approx(0.5 - 0.8)
    assert rows[("upstep", "kNN")]["ood_delta"] == pytest.approx(0.25 - 0.4)
    assert rows[("upstep", "linear probe")]["delta_vs_base"] == pytest.approx(0.1)
    assert rows[("base", "kNN")]["ood_delta"] == 0.0


def test_run_domain_seed_end_to_end_and_tables():
    cfg = tiny_cfg(domains=["synthetic", "digits"], steps=2, seeds=[0, 1])
    res = U.run_upstep(cfg, log=None)
    ev = res.evals
    assert set(ev["features"]) == {"base", "upstep", "ensemble-concat", "ensemble-average"}
    assert set(ev["domain"]) == {"synthetic", "digits"} and len(ev) == 2 * 2 * 4 * 2
    # forgetting = adapted minus base on the same OOD set, eval and seed
    base = ev[ev["features"] == "base"].set_index(["domain", "seed", "eval"])["ood_test_acc"]
    for _, row in ev[ev["features"] != "base"].iterrows():
        assert row["ood_delta"] == pytest.approx(row["ood_test_acc"] - base[(row["domain"], row["seed"], row["eval"])])
    assert set(ev["ood_dataset"]) == {"synthetic_source"}
    assert (res.runs["backward_passes"] == 1).all() and (res.runs["skip_fraction"] == 0.5).all()
    assert {"cv_norm", "cv_norm_base", "cv_drift", "loss_cluster", "backward"} <= set(res.history.columns)
    acc, forg, cost = U.accuracy_table(ev), U.forgetting_table(ev), U.cost_table(res.runs)
    assert list(acc.columns[:4]) == ["base", "upstep", "ensemble-concat", "ensemble-average"]
    assert "base OOD acc" in forg and cost.loc["digits", "n_seeds"] == 2
    s = U.summary(res)
    assert s["test_acc"]["digits/upstep/kNN"]["n"] == 2 and "synthetic" in s["cost"]
    import matplotlib
    matplotlib.use("Agg")
    U.plot_center_vector(res.history, by="domain")
    U.plot_accuracy(ev)
    U.plot_accuracy(ev, value="ood_delta")


def test_ablations_share_one_base_and_ensemble_table():
    cfg = tiny_cfg(ablate_cvr=["none"], ablate_gate=["none"], ablate_rank=[], seeds=[0])
    res = U.run_ablations(cfg, log=None)
    assert list(dict.fromkeys(res.evals["variant"]))[-1] == "base"
    assert (res.evals[res.evals["variant"] == "base"]["features"] == "base").all()
    assert len(res.runs) == 3
    gate_none = res.runs[res.runs["variant"] == "gate=none"].iloc[0]
    assert gate_none["skipped"] == 0 and gate_none["backward_passes"] == 2
    ens = U.ensemble_table(res.evals)
    assert {"off: target", "concat: target gain", "average: OOD gain"} <= set(ens.columns)
    forg = U.forgetting_table(res.evals, by="variant")
    assert forg["base OOD acc"].notna().all()


def test_plan_counts_lora_and_head():
    cfg = tiny_cfg()
    plan = U.plan_table(cfg, ranks=(2, 4))
    assert plan.loc[4, "trainable_lora"] == 2 * 4 * (48 + 3 * 48)
    assert plan.loc[2, "trainable_total"] == plan.loc[2, "trainable_lora"] + plan.loc[2, "trainable_head"]


def test_dry_run_reason():
    assert dry_run_reason(tiny_cfg(dry_run="yes")) == "dry_run='yes'"
    assert dry_run_reason(tiny_cfg(dry_run="no")) is None
    assert dry_run_reason(tiny_cfg(dry_run="auto")) is None                 # synthetic + digits: always here
    reason = dry_run_reason(tiny_cfg(dry_run="auto", domains=["vtab1k:dtd"]))
    assert reason and "vtab1k:dtd" in reason


def test_panel_fields_are_run_single_parameters():
    cfg = tiny_cfg()
    fields = U.panel_fields(cfg)
    overrides = {k: v for k, (v, _) in fields.items() if k not in ("seed", "domain")}
    assert dataclasses.replace(cfg, **overrides) == cfg
    df = U.run_single(cfg, **{k: v for k, (v, _) in fields.items()})
    assert set(df["features"]) == {"base", "upstep", "ensemble-concat", "ensemble-average"}
    assert df.attrs["run"]["steps"] == cfg.steps


def test_result_rows_schema():
    ev = pd.DataFrame([{"domain": "d", "seed": s, "features": f, "eval": "kNN", "test_acc": 0.5 + 0.1 * s,
                        "ood_delta": 0.0 if f == "base" else -0.1} for s in (0, 1) for f in ("base", "upstep")])
    runs = pd.DataFrame([{"domain": "d", "seed": s, "trainable_params": 100, "wall_time_s": 2.0} for s in (0, 1)])
    rows = U.result_rows(grid.Results(ev, runs))
    by = {(r["table"], r["method"]): r for r in rows}
    acc = by[("UpStep: target top-1", "d / upstep / kNN")]
    assert acc["mean"] == pytest.approx(55.0) and acc["n"] == 2 and acc["trainable"] == 100
    assert by[("UpStep: forgetting", "d / upstep / kNN")]["mean"] == pytest.approx(-10.0)
    assert by[("UpStep: target top-1", "d / base / kNN")]["trainable"] == 0
    assert ("UpStep: forgetting", "d / base / kNN") not in by


def test_same_seed_same_results(tmp_path, monkeypatch):
    """Two runs with the same seed (no shared feature cache) give identical evaluations and training curves."""
    import vitadapt.eval as ev
    cfg = tiny_cfg(steps=3)
    monkeypatch.setattr(ev, "CACHE", tmp_path / "a")
    a = U.run_upstep(cfg, log=None)
    monkeypatch.setattr(ev, "CACHE", tmp_path / "b")
    b = U.run_upstep(cfg, log=None)
    pd.testing.assert_frame_equal(a.evals, b.evals)
    pd.testing.assert_frame_equal(a.history, b.history)
