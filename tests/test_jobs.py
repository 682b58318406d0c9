"""Divergence is never a result, and an interrupted run resumes: the training loop stops a diverging job with a
message naming it; grid searches lose diverged points; tables, metrics and result rows say "diverged"; finished jobs
are kept across an interruption and the running one restarts from its checkpoint, with the same final numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from vitadapt.config import build_config
from vitadapt.experiments import explora as E
from vitadapt.finetune import TensorSet, finetune_classifier, select_then_test
from vitadapt.jobs import JobStore, mean_std_text, summarize
from vitadapt.protocol.tables import paired_delta
from vitadapt.protocol.report import result_row
from vitadapt.results import Run
from vitadapt.train import Diverged, fit, job, make_fabric, set_notebook

pytestmark = pytest.mark.usefixtures("one_thread", "private_feature_cache")


def _data(n=48, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorSet(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g).tolist())


# ---- the loop ---------------------------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_job_with_a_message_naming_it(tiny_vit):
    model = tiny_vit(num_classes=4)
    set_notebook("10_explora_dinov2")
    loader = torch.utils.data.DataLoader(_data(), batch_size=8)

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y) * float("nan"), {}
    with job(variant="explora", seed=3), pytest.raises(Diverged) as err:
        fit(make_fabric(), model, loss_fn, loader, steps=5, lr=2e-3)
    msg = str(err.value)
    for part in ("notebook 10_explora_dinov2", "variant explora", "seed 3", "step 0", "lr 0.002", "non-finite loss"):
        assert part in msg, msg
    assert err.value.step == 0 and "\n" not in msg


def test_a_finite_but_exploding_loss_is_divergence_too(tiny_vit):
    """lr 10 with AdamW: the cross-entropy of a few steps stays finite but rises a hundredfold (the silent
    chance-level accuracies of issue 10)."""
    with pytest.raises(Diverged, match=r"exploded from|non-finite"):
        finetune_classifier(tiny_vit(num_classes=4), _data(), {"test": _data(seed=1)}, num_classes=4, img_size=32,
                            lr=10.0, steps=8, batch_size=8, warmup=0)
    r = finetune_classifier(tiny_vit(num_classes=4), _data(), {"test": _data(seed=1)}, num_classes=4, img_size=32,
                            lr=1e-3, steps=8, batch_size=8, warmup=0)
    assert math.isfinite(r["acc"]["test"])


def test_a_diverged_grid_point_is_lost_and_never_selected(tiny_vit):
    data = type("S", (), {"train": _data(), "val": _data(seed=1), "test": _data(seed=2), "classes": list("abcd")})()
    grid = [{"lr": 10.0, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 0.0}]
    r = select_then_test(lambda **_: tiny_vit(num_classes=4), data, grid, img_size=32, steps=8, batch_size=8,
                         warmup=0, seeds=(0, 1))
    assert r["selected"][0]["lr"] == 1e-3
    lost = [g for g in r["grid"] if g["lr"] == 10.0][0]
    assert math.isnan(lost["val_acc"]) and "diverged" in lost["diverged"]
    assert all(math.isfinite(t["test_acc"]) for t in r["test"])
    with pytest.raises(Diverged, match="every one of the 1 grid points diverged") as err:
        select_then_test(lambda **_: tiny_vit(num_classes=4), data, grid[:1], img_size=32, steps=8, batch_size=8,
                         warmup=0)
    assert len(err.value.grid) == 1 and math.isnan(err.value.grid[0]["val_acc"])


# ---- what a reader sees ---------------------------------------------------------------------------------------
def test_tables_metrics_and_result_rows_say_diverged():
    assert mean_std_text([0.5, 0.7]) == "0.600 ± 0.141"
    assert mean_std_text([float("nan")] * 3) == "diverged"
    assert mean_std_text([0.5, float("nan")]) == "0.500 ± 0.000 (1 of 2 diverged)"
    assert summarize([float("nan"), float("nan")]) == {"mean": None, "std": None, "n": 0, "diverged": 2,
                                                       "status": "diverged"}
    assert summarize([0.2, 0.4]) == pytest.approx({"mean": 0.3, "std": math.sqrt(0.02), "n": 2})
    row = result_row("t", "m", [float("nan"), 0.5])
    assert row["mean"] == 50.0 and row["diverged"] == 1 and row["status"] == "1 of 2 diverged"
    evals = pd.DataFrame([{"variant": v, "seed": s, "eval": "linear probe", "test_acc": a, "chance": 0.1}
                          for v, s, a in [("frozen", 0, 0.5), ("frozen", 1, 0.6), ("full", 0, np.nan),
                                          ("full", 1, np.nan), ("explora", 0, 0.7), ("explora", 1, np.nan)]])
    acc = E.accuracy_table(evals)
    assert acc.loc["full", "linear probe"] == "diverged"
    assert acc.loc["explora", "linear probe"].endswith("(1 of 2 diverged)")
    delta = paired_delta(evals, "variant")
    assert delta.loc["full", "linear probe"] == "diverged"
    assert delta.loc["explora", "linear probe"] == "+0.200 ± 0.000 (1 of 2 diverged)"


def test_a_diverged_pretraining_marks_every_evaluation_of_that_variant(tmp_path, monkeypatch):
    """Notebook 10 where the pre-training's loss turns NaN at its second step (as lr 10 does on AID): the rows of that
    variant say diverged, never a chance-level accuracy; the frozen rows stand."""
    cfg = build_config(E.ExploraConfig, "smoke", "10_explora_dinov2", out_dir=str(tmp_path / "out"),
                       n_train_per_class=4, n_val_per_class=2, n_test_per_class=3, probe_Cs=[1.0], knn_ks=[3],
                       pretrain_steps=3, pretrain_batch_size=4, pretrain_lr=1e-3, pretrain_warmup=0, seeds=[0],
                       variants=["frozen", "full"], finetune=False)
    real = E.build_objective

    def nan_at_step_1(*a, **k):
        objective, loss_fn, on_step = real(*a, **k)
        calls = []

        def loss(m, batch):
            value, logs = loss_fn(m, batch)
            calls.append(1)
            return (value * float("nan") if len(calls) == 2 else value), logs
        return objective, loss, on_step
    monkeypatch.setattr(E, "build_objective", nan_at_step_1)
    logs = []
    res = E.run_comparison(cfg, log=logs.append)
    full = res.evals[res.evals["variant"] == "full"]
    # smoke 10 runs both protocols: every evaluation either would have reported is marked (2 clean + 4 official)
    assert list(full["eval"]) == E.lora_eval.eval_names(cfg) and len(full) == 6
    assert full["test_acc"].isna().all() and full["diverged"].str.contains("diverged at step").all()
    assert res.evals[res.evals["variant"] == "frozen"]["test_acc"].notna().all()
    assert any("variant full" in line and "seed 0" in line and "lr " in line for line in logs), logs
    assert (E.accuracy_table(res.evals).loc["full", ["linear probe", "kNN"]] == "diverged").all()
    assert E.summary(res)["test_acc"]["full/kNN"]["status"] == "diverged"


# ---- resume ---------------------------------------------------------------------------------------------------
def test_the_job_store_keeps_finished_jobs_and_is_cleared(tmp_path):
    calls = []
    store = JobStore(tmp_path / "s", log=None)
    assert store.run({"variant": "a", "seed": 0}, lambda ckpt: calls.append(ckpt) or {"acc": 0.5}) == {"acc": 0.5}
    again = JobStore(tmp_path / "s", log=None)
    assert again.run({"variant": "a", "seed": 0}, lambda ckpt: calls.append(ckpt) or {"acc": 0.0}) == {"acc": 0.5}
    assert len(calls) == 1 and calls[0].name.endswith(".ckpt") and len(again.kept) == 1
    again.clear()
    assert not (tmp_path / "s").exists()
    assert JobStore(None).run({"a": 1}, lambda ckpt: ckpt) is None          # off: nothing kept, no checkpoint


def test_an_interrupted_grid_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Notebook 10's grid in the smoke profile: interrupted during the second variant's pre-training (after a
    checkpoint at step 2 of 4), then started again with the same config: the first variant comes from the store,
    the second restarts from its checkpoint, and every number equals an uninterrupted run's."""
    import vitadapt.train as T
    kw = dict(n_train_per_class=4, n_val_per_class=2, n_test_per_class=3, probe_Cs=[1.0], knn_ks=[3],
              pretrain_steps=4, pretrain_batch_size=4, pretrain_lr=1e-3, seeds=[0], ft_steps=2, ft_batch_size=8,
              variants=["explora", "full"])
    cfg = build_config(E.ExploraConfig, "smoke", "10_explora_dinov2", out_dir=str(tmp_path / "a"), **kw)
    whole = E.run_comparison(cfg, log=None)

    cfg2 = build_config(E.ExploraConfig, "smoke", "10_explora_dinov2", out_dir=str(tmp_path / "b"), **kw)
    monkeypatch.setenv("VITADAPT_CKPT_EVERY_S", "0")
    real_fit, calls = T.fit, []

    def interrupted_fit(*a, **k):
        calls.append(k.get("config"))
        if k.get("config", {}).get("variant") == "full" and k.get("ckpt_path") is not None:
            real_fit(*a, **{**k, "stop_after": 2})
            raise KeyboardInterrupt
        return real_fit(*a, **k)
    monkeypatch.setattr(T, "fit", interrupted_fit)
    run = Run("10_explora_dinov2", cfg2, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        E.run_comparison(cfg2, run, log=None)
    assert len(list(run.jobs.root.glob("*.pkl"))) == 1 and len(list(run.jobs.root.glob("*.ckpt"))) == 1

    monkeypatch.setattr(T, "fit", real_fit)
    resumed_from = []
    monkeypatch.setattr(T, "fit", lambda *a, **k: (lambda r: resumed_from.append(r.resumed_from) or r)(real_fit(*a, **k)))
    run2 = Run("10_explora_dinov2", cfg2, quiet=True)
    again = E.run_comparison(cfg2, run2, log=None)
    assert run2.jobs.kept and 2 in resumed_from                 # explora kept; full resumed at step 2
    cols = ["variant", "seed", "eval", "test_acc", "val_acc", "selected"]
    pd.testing.assert_frame_equal(again.evals[cols].reset_index(drop=True), whole.evals[cols].reset_index(drop=True))
    pd.testing.assert_frame_equal(again.history.reset_index(drop=True), whole.history.reset_index(drop=True))
    run2.finish({})
    assert not run2.jobs.root.exists()


def test_a_checkpoint_that_cannot_be_written_costs_the_resume_point_not_the_run(tiny_vit, tmp_path, monkeypatch,
                                                                                capsys):
    import vitadapt.train as T

    def full_disk(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(T, "save_checkpoint", full_disk)
    loader = torch.utils.data.DataLoader(_data(), batch_size=8)
    res = fit(make_fabric(), tiny_vit(num_classes=4), lambda m, b: (F.cross_entropy(m(b[0]), b[1]), {}), loader,
              steps=3, lr=1e-3, ckpt_path=tmp_path / "job.ckpt", ckpt_every_s=0)
    assert res.steps == 3 and "checkpoint" in capsys.readouterr().out and not (tmp_path / "job.ckpt").exists()


def test_a_non_finite_gradient_norm_is_divergence_not_a_clipping_error(tiny_vit):
    """pretrain_lr 10 in notebook 10 used to end in torch's "total norm is non-finite, so it cannot be clipped"."""
    loader = torch.utils.data.DataLoader(_data(), batch_size=8)

    def loss_fn(m, batch):                       # value 0, gradient NaN (d sqrt(u)/du at 0 is inf, times 0)
        return torch.sqrt((m(batch[0]) * 0).sum()), {}
    with job(variant="full", seed=1), pytest.raises(Diverged, match="variant full | seed 1 | step 0 .*gradient norm"):
        fit(make_fabric(), tiny_vit(num_classes=4), loss_fn, loader, steps=3, lr=10.0, grad_clip=3.0)


def test_rlrr_methods_whose_every_grid_point_diverges_read_diverged():
    """30_rlrr with lr_multipliers [1e6] used to print 12.5 % for every method in normal-looking tables."""
    from vitadapt.experiments import rlrr as X
    from test_rlrr_experiment import TINY
    cfg = X.RLRRConfig(**TINY, tasks=("dsprites_location",), groups={"structured": ["dsprites_location"]},
                       methods=("linear", "rlrr"), n_train=16, n_val=8, n_test=16, bins=4, epochs=1, batch_size=8,
                       adapt_blocks=1, seeds=(0, 1), drop_path=0.0, lr_multipliers=(1e6,))
    logs = []
    df, grid = X.run_benchmark(cfg, log=logs.append)
    assert df["test_acc"].isna().all() and df["diverged"].notna().all() and grid["val_acc"].isna().all()
    s = X.summary_tables(df, cfg.groups)["summary"]
    assert (s["mean"] == "diverged").all() and (s["structured"] == "diverged").all()
    rows = X.result_rows(df)
    assert all(r["status"] == "diverged" and r["mean"] is None for r in rows)
    assert sum("diverged: " in line and "method rlrr" in line for line in logs) == 1


def test_an_upstep_run_that_diverges_keeps_its_base_rows_and_marks_the_rest(monkeypatch):
    """20_upstep with lr 10 used to die with "value cannot be converted to type float without overflow"."""
    from test_upstep_experiment import tiny_cfg
    from vitadapt.experiments import upstep as U
    res = U.run_upstep(tiny_cfg(lr=10.0, steps=8, warmup_steps=0, offline_stream="symmetric", cvr="drift", cvr_weight=100.0),
                       log=None)    # the settings that overflowed (the EMA stream with CVR norm bounds the loss)
    adapted = res.evals[res.evals["features"] != "base"]
    assert len(adapted) and adapted["test_acc"].isna().all() and adapted["diverged"].str.startswith("diverged at").all()
    assert res.evals[res.evals["features"] == "base"]["test_acc"].notna().all()
    table = U.accuracy_table(res.evals)
    assert (table["upstep"] == "diverged").all() and not table["base"].str.contains("diverged").any()


def test_a_dry_run_reason_is_cut_visibly_at_a_clause():
    from vitadapt.protocol.setup import brief
    assert brief(ValueError("dataset 'fmow' not found; looked in a, b")) == "dataset 'fmow' not found"
    long = brief("x (" + "y" * 300 + ")", 50)
    assert len(long) == 50 and long.endswith("…")
