"""The two selection protocols: the fine-tune's test tracked every epoch (the official recipes' best test epoch) beside
its last epoch (ours), and the tables that show both and their difference."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from vitadapt.data import Splits
from vitadapt.finetune import TensorSet, best_epoch, finetune_classifier, select_then_test, train_then_test
from vitadapt.protocol import selection

C = 4


def _tinted(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 3, 32, 32, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, c % 3] += 1.0 if c < 3 else -1.0
    return TensorSet(x, y.tolist())


@pytest.fixture(scope="module")
def data():
    return Splits("tinted", _tinted(8 * C, 0), _tinted(4 * C, 1), _tinted(6 * C, 2), list(range(C)), "tinted noise")


def test_tracking_scores_test_every_epoch_without_changing_the_training(tiny_vit, data):
    torch.manual_seed(0)
    model = tiny_vit(num_classes=C)
    kw = dict(num_classes=C, img_size=32, lr=2e-3, weight_decay=0.0, epochs=4, batch_size=8, seed=0)
    plain = finetune_classifier(copy.deepcopy(model), data.train, {"test": data.test}, **kw)
    tracked = finetune_classifier(copy.deepcopy(model), data.train, {"test": data.test}, track={"test": data.test}, **kw)
    curve = tracked["tracked"]["test"]
    assert [s for s, _ in curve] == [4, 8, 12, 16]            # 32 images / batch 8 = 4 steps an epoch, 4 epochs
    assert tracked["acc"]["test"] == curve[-1][1] == plain["acc"]["test"]   # the last point is the final model
    assert [h["loss"] for h in tracked["history"]] == [h["loss"] for h in plain["history"]]   # same trajectory
    assert all(0.0 <= a <= 1.0 for _, a in curve)


def test_best_epoch_is_the_first_maximum_of_the_test_curve():
    b = best_epoch([(4, 0.5), (8, 0.75), (12, 0.75), (16, 0.625)], steps_per_epoch=4)
    assert b == {"best_acc": 0.75, "best_step": 8, "points": 4, "best_epoch": 2}
    with pytest.raises(ValueError, match="nothing was tracked"):
        best_epoch([])


def test_official_protocol_reports_the_test_best_epoch_beside_the_clean_last_epoch(tiny_vit, data):
    make = lambda **_: tiny_vit(num_classes=C)
    kw = dict(seed=0, num_classes=C, img_size=32, batch_size=8, epochs=4)
    one = train_then_test(make, data, [{"lr": 2e-3, "weight_decay": 0.0}], track_test=True, **kw)
    assert one["test_acc_best_epoch"] >= one["test_acc"] and one["tracked_points"] == 4
    grid = [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 0.0}]
    r = select_then_test(make, data, grid, num_classes=C, img_size=32, batch_size=8, epochs=3, track_test=True)
    t = r["test"][0]
    assert t["test_acc_best_epoch"] >= t["test_acc"] and "best_step" in t
    plain = select_then_test(make, data, grid, num_classes=C, img_size=32, batch_size=8, epochs=3)
    assert plain["test"][0]["test_acc"] == t["test_acc"] and "test_acc_best_epoch" not in plain["test"][0]


def test_fine_tune_rows_follow_the_protocol():
    row = {"seed": 0, "eval": "LoRA-r8 fine-tune", "test_acc": 0.5, "val_acc": None, "selected": "lr=0.001"}
    rows = lambda p: selection.fine_tune_rows(type("C", (), {"protocol": p})(), row, 0.625, "step 8 of 16")
    assert [r["eval"] for r in rows("clean")] == ["LoRA-r8 fine-tune"]
    assert [(r["eval"], r["test_acc"]) for r in rows("official")] == [("LoRA-r8 fine-tune (official)", 0.625)]
    assert [r["eval"] for r in rows("both")] == ["LoRA-r8 fine-tune", "LoRA-r8 fine-tune (official)"]
    assert "best test epoch: step 8 of 16" in rows("both")[1]["selected"]
    with pytest.raises(ValueError, match="track_test"):
        selection.fine_tune_rows(type("C", (), {"protocol": "both"})(), row, None)


def test_compare_pairs_clean_and_official_per_seed_and_shows_the_difference():
    df = pd.DataFrame([{"variant": v, "seed": s, "eval": e + suffix, "test_acc": acc}
                       for v, base in (("frozen", 0.50), ("explora", 0.60)) for s in (0, 1)
                       for e in ("kNN", "linear probe") for suffix, acc in (("", base + 0.01 * s),
                                                                           (" (official)", base + 0.05 + 0.02 * s))]
                      + [{"variant": "frozen", "seed": 0, "eval": "LoRA-r8 fine-tune", "test_acc": 0.7}])
    t = selection.compare(df, "variant")
    assert list(t.columns) == ["clean", "official", "official - clean", "seeds"]
    assert t.loc[("explora", "kNN"), "official - clean"] == "5.5 ± 0.7"     # per seed: 5 and 6 points
    assert t.loc[("frozen", "linear probe"), "clean"] == "50.5 ± 0.7"
    assert ("frozen", "LoRA-r8 fine-tune") not in t.index                    # no official twin: no pair
    g = selection.gap_summary(df, "variant")
    assert g["explora | kNN"]["difference"] == pytest.approx(0.055) and g["explora | kNN"]["n"] == 2
    assert selection.compare(df[~df["eval"].str.endswith("(official)")], "variant").empty
    lost = df.copy()
    lost.loc[(lost.variant == "frozen") & (lost.seed == 1), "test_acc"] = np.nan     # a diverged seed drops out
    assert selection.compare(lost, "variant").loc[("frozen", "kNN"), "seeds"] == 1


def test_figure_draws_clean_beside_official_only_where_both_exist():
    import matplotlib
    matplotlib.use("Agg")
    df = pd.DataFrame([{"variant": v, "seed": s, "eval": e, "test_acc": 0.5 + 0.1 * s}
                       for v in ("frozen", "explora") for s in (0, 1)
                       for e in ("kNN", "kNN (official)", "linear probe", "LoRA-r8 fine-tune")])
    fig = selection.figure(df, "variant")
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["kNN"]
    assert selection.figure(df[df["eval"] == "kNN"], "variant") is None


def test_compare_adds_the_official_evaluator_chosen_on_val_when_it_was_scored():
    df = pd.DataFrame([{"variant": "explora", "seed": s, "eval": e, "test_acc": a}
                       for s in (0, 1) for e, a in (("linear probe", 0.50), ("linear probe (official)", 0.60 + 0.01 * s),
                                                    ("linear probe (official harness, chosen on val)", 0.56))])
    assert selection.family("linear probe (official harness, chosen on val)") == "linear probe"
    assert selection.kind("kNN (official settings, chosen on val)") == selection.VAL
    t = selection.compare(df, "variant")
    assert list(t.columns) == ["clean", "official", selection.VAL, "official - clean", "official - official on val",
                               "seeds"]
    assert t.loc[("explora", "linear probe"), "official - official on val"] == "4.5 ± 0.7"
    assert selection.gap_summary(df, "variant")["explora | linear probe"]["official_on_val"] == pytest.approx(0.56)


def test_compare_keeps_the_order_of_the_rows():
    df = pd.DataFrame([{"variant": v, "seed": 0, "eval": e, "test_acc": 0.5}
                       for v in ("frozen", "explora", "block_only") for e in ("kNN", "kNN (official)")])
    assert [v for v, _ in selection.compare(df, "variant").index] == ["frozen", "explora", "block_only"]
