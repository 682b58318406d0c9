"""The 30/31 experiment module: config validation, the ablation variants, the tables, a tiny end-to-end run."""

import numpy as np
import pandas as pd
import pytest

from vitadapt import papers
from vitadapt.config import build_config
from vitadapt.experiments import rlrr as X
from vitadapt.protocol.setup import dry_run_reason

TINY = dict(weights="random", arch="vit_tiny_patch16_224", img_size=32,
            arch_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2})


def test_config_validation_names_valid_values():
    with pytest.raises(ValueError, match=r"tasks: 'imagenet' is not valid; valid values: aid, .*fgvc:<cub"):
        X.RLRRConfig(tasks=("imagenet",), groups={"natural": ["imagenet"]})
    for unlabelled_or_unknown in ("sentinel2_tiles", "vtab1k:imagenet", "vtab1k"):
        with pytest.raises(ValueError, match="is not valid"):
            X.RLRRConfig(tasks=(unlabelled_or_unknown,), groups={"natural": [unlabelled_or_unknown]})
    with pytest.raises(ValueError, match="in no group"):
        X.RLRRConfig(tasks=("aid",), groups={"natural": ["fashion_mnist"]})
    with pytest.raises(ValueError, match="methods=.*\\['adapter'\\] is not valid; valid values: linear, full"):
        X.RLRRConfig(methods=("adapter",))
    with pytest.raises(ValueError, match="augment=True needs the images"):
        X.RLRRConfig(augment=True, adapt_blocks=1)
    with pytest.raises(ValueError, match="ablation_layers=.*valid values: attn, mlp, all, all\\+ssf"):
        X.RLRRConfig(ablation_layers=("qkv",))
    with pytest.raises(ValueError, match="ablation_grid='x' is not valid"):
        X.RLRRConfig(ablation_grid="x")
    cfg = X.RLRRConfig(tasks=("vtab1k:eurosat", "fgvc:cub"), groups={"specialized": ["vtab1k:eurosat"],
                                                                      "fgvc": ["fgvc:cub"]})
    assert cfg.group_of("fgvc:cub") == "fgvc"


def test_grid_is_base_lr_times_multipliers():
    cfg = X.RLRRConfig(lr_multipliers=(0.5, 2.0), weight_decays=(0.0, 0.1))
    g = cfg.grid("rlrr")
    assert [p["lr"] for p in g] == [2.5e-3, 2.5e-3, 1e-2, 1e-2] and [p["weight_decay"] for p in g] == [0.0, 0.1] * 2


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu", "paper"])
def test_notebook_profiles_build(profile):
    for nb in ("30_rlrr", "31_rlrr_ablations"):
        cfg = build_config(X.RLRRConfig, profile, nb)
        assert all(any(t in g for g in cfg.groups.values()) for t in cfg.tasks)
    cpu = build_config(X.RLRRConfig, "cpu", "30_rlrr")
    assert cpu.img_size == 112 and cpu.arch == "vit_small_patch14_dinov2" and len(cpu.seeds) >= 3
    assert set(cpu.groups) == {"natural", "specialized", "structured"}


def test_ablation_variants_cover_table6_and_share_the_official_setting():
    cfg = X.RLRRConfig()
    v = X.ablation_variants(cfg)
    sides = [(label, kw) for g, label, kw in v if g == "sides_residual"]
    assert len(sides) == 6 and {(kw["sides"], kw["residual"]) for _, kw in sides} == \
        {(s, r) for s in ("left", "right", "both") for r in (False, True)}
    assert sum(kw == papers.RLRR_OFFICIAL for _, _, kw in v) == 4     # once in every group
    assert len(X.distinct_variants(cfg)) == 1 + 5 + 4 + 2 + 3 and papers.RLRR_OFFICIAL in X.distinct_variants(cfg)
    layers = {label: kw for g, label, kw in v if g == "layers"}
    assert layers["attn"]["ssf"] is False and layers["all+ssf"] == papers.RLRR_OFFICIAL
    # the labels are those the paper's Table 6 is keyed by in vitadapt.papers (so 90_results joins them)
    table6 = set(papers.numbers("RLRR", "RLRR ablations: sides_residual")["method"])
    assert {label for label, _ in sides} == table6


def test_counts_match_the_paper_table():
    t = X.paper_count_table(["rlrr", "ssf", "linear"])
    assert t.loc["rlrr", "ours: no head"] == 288_768 and t.loc["rlrr", "ours (M)"] == 0.33 == t.loc["rlrr", "paper (M)"]
    assert t.loc["ssf", "ours (M)"] == 0.24 and t.loc["linear", "ours (M)"] == 0.04
    c = X.trainable_counts("vit_base_patch16_224", ["rlrr"], adapt_blocks=1)
    assert c.loc["rlrr", "trainable"] == 20_736 + 2 * 2 * 768 + 2 * 768   # one block + its 2 LNs + final LN


def _fake_rows():
    rows = []
    rng = np.random.default_rng(0)
    for task, group in (("a", "natural"), ("b", "structured"), ("c", "structured")):
        for method in ("rlrr", "lora"):
            for seed in (0, 1):
                rows.append({"task": task, "group": group, "method": method, "seed": seed,
                             "test_acc": 0.5 + 0.1 * (method == "rlrr") + 0.01 * rng.random(), "trainable": 10,
                             "train_time_s": 1.0})
    return pd.DataFrame(rows)


def test_summary_means_are_over_tasks_and_labelled_beside_the_paper():
    df = _fake_rows()
    t = X.summary_tables(df, {"natural": ["a"], "structured": ["b", "c"]})
    s = t["summary"]
    assert list(t["per_task"].columns) == ["a", "b", "c"]
    assert s.loc["rlrr", "mean"] == pytest.approx(t["per_task"].loc["rlrr"].mean(), abs=0.06)
    assert s.loc["rlrr", "structured"] == pytest.approx(t["per_task"].loc["rlrr", ["b", "c"]].mean(), abs=0.06)
    both = X.paper_beside_ours(s, "ours: test")
    label = papers.NOTES["RLRR label"]
    assert set(both.index.get_level_values(0)) == {label, "ours: test"}
    assert both.loc[(label, "rlrr"), "mean"] == 74.5


def test_sides_grid_layout():
    rows = []
    for res in ("no residual", "residual"):
        for sides in ("left", "right", "both"):
            for seed in (0, 1):
                rows.append({"ablation": "sides_residual", "variant": f"{sides}, {res}", "task": "a", "seed": seed,
                             "test_acc": 0.5 + 0.1 * (sides == "both") + 0.2 * (res == "residual"), "trainable": 1})
    g = X.sides_grid(pd.DataFrame(rows))
    assert g.loc["residual", "both"] == 80.0 and g.loc["no residual", "left"] == 50.0


def test_tiny_end_to_end_benchmark_and_ablation():
    cfg = X.RLRRConfig(**TINY, tasks=("dsprites_location",), groups={"structured": ["dsprites_location"]},
                       methods=("linear", "rlrr"), n_train=16, n_val=8, n_test=16, bins=4, epochs=1, batch_size=8,
                       adapt_blocks=1, seeds=(0, 1), ablations=("sides_residual",), drop_path=0.0)
    df, grid = X.run_benchmark(cfg, log=lambda *a: None)
    assert len(df) == 2 * 2 and set(df["method"]) == {"linear", "rlrr"} and len(grid) == 2 * 2
    assert df["test_acc"].between(0, 1).all() and (df["chance"] == 0.25).all()
    assert df[df.method == "linear"]["trainable"].iloc[0] == 48 * 4 + 4
    dfa, grida = X.run_ablations(cfg, log=lambda *a: None)
    assert len(dfa) == 6 * 2 and dfa["official"].sum() == 2 and len(grida) == 2     # one shared grid search
    assert set(dfa["lr"]) == {grida.loc[grida["val_acc"].idxmax(), "lr"]}


def test_dry_run_builds_every_method_and_variant(capsys):
    cfg = X.RLRRConfig(**TINY, dry_run="auto", tasks=("vtab1k:cifar",), groups={"natural": ["vtab1k:cifar"]},
                       vtab1k_root="", ablation_ranks=(1, 2))
    assert "not available here: task 'vtab1k:cifar' (" in dry_run_reason(cfg)
    X.dry_run_build(cfg)
    X.dry_run_build(cfg, ablation=True)
    out = capsys.readouterr().out
    assert "each of the 6 methods" in out and "each of the 14 RLRR variants" in out


def test_result_rows_and_the_interactive_panel():
    df = _fake_rows()
    rows = X.result_rows(df)
    main = [r for r in rows if r["table"] == "RLRR: VTAB-1k group mean"]
    assert {r["method"] for r in main} == {"rlrr", "lora"} and all(r["n"] == 2 for r in main)
    assert {r["table"] for r in rows} == {"RLRR: VTAB-1k group mean", "RLRR: VTAB-1k natural", "RLRR: VTAB-1k structured"}
    cfg = X.RLRRConfig(**TINY, tasks=("dsprites_location",), groups={"structured": ["dsprites_location"]},
                       methods=("linear", "rlrr"), n_train=16, n_val=8, n_test=8, bins=4, epochs=1, batch_size=8,
                       adapt_blocks=1, drop_path=0.0)
    from vitadapt.widgets import ablation_panel
    vit, _ = X.load_vit(cfg, verbose=False)
    cache = {}
    panel = ablation_panel(X.panel_fields(cfg, ablation=True), lambda **kw: X.run_single(cfg, vit, cache, **kw))
    out = panel.set(sides="left", rank=1, layers="mlp", ssf=False).run()
    assert panel.last_error is None and "test_acc" not in out and 0 <= out["val_acc"].iloc[0] <= 1
    assert "sides=left" in out["configuration"].iloc[0]
    panel30 = ablation_panel(X.panel_fields(cfg), lambda **kw: X.run_single(cfg, vit, cache, **kw))
    assert panel30.set(method="linear").run()["configuration"].iloc[0] == "linear" and len(cache) == 1
