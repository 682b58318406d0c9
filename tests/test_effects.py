"""vitadapt.protocol.effects: the words a notebook prints are computed from its own numbers."""

import math

import pandas as pd
import pytest

from vitadapt.protocol import effects


def _evals(gains, ref=0.5):
    rows = []
    for seed, g in enumerate(gains):
        rows += [{"variant": "frozen", "seed": seed, "eval": "kNN", "test_acc": ref},
                 {"variant": "explora", "seed": seed, "eval": "kNN", "test_acc": ref + g}]
    return pd.DataFrame(rows)


def test_effect_on_every_seed():
    e = effects.paired_effects(_evals([0.10, 0.12, 0.14]), "variant", "frozen")
    r = e.iloc[0]
    assert (r.variant, r["eval"], r.n, r.positive) == ("explora", "kNN", 3, 3)
    assert r["mean"] == pytest.approx(12.0) and r["std"] == pytest.approx(2.0)
    assert r.verdict == "effect"
    text = effects.effect_text(e, "variant", "frozen", paper={"kNN": "+7.3 points (fMoW)"})
    assert "+12.0 ± 2.0 points, positive on 3 of 3 seeds" in text and "the same way" in text


def test_mixed_signs_and_small_means_are_noise():
    assert effects.paired_effects(_evals([0.05, -0.01, 0.02]), "variant", "frozen").verdict[0] == "within noise"
    assert effects.paired_effects(_evals([0.03, 0.04, 0.08]), "variant", "frozen").verdict[0] == "effect"
    assert effects.paired_effects(_evals([0.001, 0.002, 0.2]), "variant", "frozen").verdict[0] == "within noise"
    one = effects.paired_effects(_evals([0.3]), "variant", "frozen")
    assert one.verdict[0] == "within noise"      # one seed is never an effect, nor are two
    assert effects.paired_effects(_evals([0.3, 0.3]), "variant", "frozen").verdict[0] == "within noise"
    zero = effects.paired_effects(_evals([0.1, 0.0, 0.2]), "variant", "frozen")
    assert zero.verdict[0] == "within noise" and (zero.positive[0], zero.negative[0]) == (2, 0)
    text = effects.effect_text(effects.paired_effects(_evals([0, 0, 0]), "variant", "frozen"), "variant", "frozen")
    assert "+0.0 ± 0.0 points, no change on 3 of 3 seeds (from +0.0 to +0.0)" in text


def test_negative_effect_and_other_direction():
    e = effects.paired_effects(_evals([-0.10, -0.12, -0.11]), "variant", "frozen")
    assert e.verdict[0] == "effect"
    text = effects.effect_text(e, "variant", "frozen", paper={"kNN": "+7.3 points"})
    assert "negative on 3 of 3 seeds" in text and "the other way" in text


def test_diverged_seed_is_lost():
    df = _evals([0.1, 0.1, 0.1])
    df.loc[(df.variant == "explora") & (df.seed == 1), "test_acc"] = float("nan")
    e = effects.paired_effects(df, "variant", "frozen")
    assert e.verdict[0] == "lost" and e.lost[0] == 1
    assert "1 of 3 seeds diverged" in effects.effect_text(e, "variant", "frozen")


def test_bad_reference_names_the_valid_ones():
    with pytest.raises(ValueError, match="'explora', 'frozen'"):
        effects.paired_effects(_evals([0.1]), "variant", "nope")


def test_loss_trends():
    rows = []
    for seed in (0, 1):
        for step in range(20):
            rows.append({"variant": "explora", "seed": seed, "step": step, "dino": 8.3 + 0.001 * step,
                         "koleo": 1.0 - 0.1 * step, "ibot": math.nan})
    t = effects.loss_trends(pd.DataFrame(rows), "variant", ["dino", "koleo", "ibot", "mse"])
    got = dict(zip(t.loss, t.trend))
    assert got == {"dino": "flat", "koleo": "falls"}
    notes = {"koleo": {"falls": "KoLeo spreads the features.", "flat": "KoLeo did nothing.", "rises": "KoLeo rose."},
             "dino": {"falls": "DINO moved.", "flat": "DINO is flat."}}
    text = effects.trend_text(t, "variant", "explora", notes)
    assert "koleo 0.8 → -0.7 (falls)" in text and "KoLeo spreads" in text and "DINO is flat." in text
    assert "did nothing" not in text and "DINO moved" not in text and "rose" not in text


def test_findings_joins_effects_and_trends():
    rows = [{"variant": "explora", "seed": s, "step": i, "koleo": 1.0 - 0.1 * i} for s in (0, 1, 2) for i in range(10)]
    text, eff = effects.findings(_evals([0.1, 0.12, 0.14]), "variant", "frozen", history=pd.DataFrame(rows),
                                 losses=["koleo"])
    assert len(eff) == 1 and "+12.0 ± 2.0" in text and "koleo" in text


def test_versus_names_each_pair():
    df = pd.concat([_evals([0.1, 0.12, 0.14]).replace({"explora": "rlrr", "frozen": "lora"}),
                    _evals([0.0, 0.0, 0.0]).query("variant == 'frozen'").replace({"frozen": "linear"}).assign(
                        test_acc=lambda d: d.test_acc - 0.2)])
    text, table = effects.versus(df, "variant", "rlrr", paper={"lora": {"kNN": "+1.0 points (VTAB-1k mean)"}})
    assert list(table.versus) == ["lora", "linear"] and table.verdict.tolist() == ["effect", "effect"]
    assert "rlrr − lora, kNN**: +12.0 ± 2.0" in text and "rlrr − linear, kNN**: +32.0 ± 2.0" in text
    assert "the same way" in text


def test_rlrr_per_seed_means_over_tasks_and_findings():
    from vitadapt.experiments import rlrr
    rows = [{"task": t, "method": m, "seed": s, "test_acc": acc + 0.01 * s}
            for s in (0, 1, 2) for t, base in (("a", 0.5), ("b", 0.3))
            for m, acc in (("rlrr", base + 0.1), ("lora", base))]
    ps = rlrr.per_seed(pd.DataFrame(rows))
    mean = ps[(ps["eval"] == rlrr.MEAN) & (ps.method == "rlrr")].sort_values("seed").test_acc.tolist()
    assert mean == pytest.approx([0.5, 0.51, 0.52])
    text, table = rlrr.findings(pd.DataFrame(rows))
    assert set(table["eval"]) == {rlrr.MEAN, "a", "b"} and (table.verdict == "effect").all()
    assert "rlrr − lora, mean over tasks**: +10.0 ± 0.0" in text and "points the same way" in text


def test_upstep_gate_saving_sentence():
    from vitadapt.experiments import upstep
    runs = pd.DataFrame([{"variant": v, "seed": s, "wall_time_s": t, "backward_passes": b, "steps": 24}
                         for s in (0, 1) for v, t, b in (("default", 30.0, 12), ("gate=none", 40.0, 24))])
    text = upstep.gate_saving(runs, "default", "gate=none")
    assert "back-propagated 12-12 of 24 iterations" in text and "0.75 x that of gate=none" in text
