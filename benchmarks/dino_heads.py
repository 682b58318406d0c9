"""Do the fresh DINO/iBOT heads learn anything at the cpu profile's scale? Measured once, by hand (not `make bench`).

Notebook 10's cpu run shows DINO near log(K) for all 20 steps, so its ExPLoRA gain comes from KoLeo and the unfrozen
block (kNN), not from DINO (the linear probe barely moves). This asks whether more head training would change that:
the heads alone train on the cpu profile's images with the backbone frozen (the source model; no LoRA, no unfrozen
block), for ``--steps`` steps of the profile's batch, under each setting of ``--try`` (config overrides, e.g.
``n_prototypes=256`` or ``centering=sinkhorn``). If the heads learned to sort the images, DINO would fall below
log(K) and stay there; if they drift to a uniform output, DINO converges to log(K) and carries no signal to the
backbone. Prints DINO and iBOT every few steps against log(K) and writes ``outputs/bench/dino_heads.csv``::

    .venv/bin/python benchmarks/dino_heads.py --steps 40 --head-lr 1e-3 \\
        --try "" "n_prototypes=256 teacher_momentum=0.9" "teacher_temp_warmup_steps=1000" "centering=sinkhorn"
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import pandas as pd

from vitadapt.config import build_config, load_yaml
from vitadapt.experiments import explora
from vitadapt.experiments.explora import ExploraConfig
from vitadapt.peft.common import freeze
from vitadapt.ssl import continued


def _overrides(text: str) -> dict:
    pairs = [t.split("=", 1) for t in text.split()]
    bad = [t for t in pairs if len(t) != 2]
    if bad:
        raise ValueError(f"--try {text!r}: each override is NAME=VALUE, got {['='.join(b) for b in bad]}")
    return {k: load_yaml(v) for k, v in pairs}


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="cpu", help="the profile whose notebook-10 settings train the heads")
    ap.add_argument("--try", dest="tries", nargs="+", default=[""], metavar="OVERRIDES",
                    help='space-separated NAME=VALUE config overrides per setting; "" = the cpu profile as it is')
    ap.add_argument("--out", default="outputs/bench/dino_heads.csv")
    a = ap.parse_args(argv)
    settings = [(t or f"{a.profile} profile", build_config(ExploraConfig, a.profile, "10_explora_dinov2", seeds=[a.seed],
                                                           finetune=False, **_overrides(t))) for t in a.tries]
    for label, cfg in settings:                                          # every bad setting before any work
        if cfg.objective != "dinov2":
            raise ValueError(f"{label}: objective={cfg.objective!r}; this measures the DINO/iBOT heads; valid: dinov2")
    from vitadapt.train import fabric_from_config, fit, seed_everything
    rows = []
    for label, cfg in settings:
        base, _ = explora.load_base(cfg, verbose=False)
        seed_everything(a.seed)
        obj, loss_fn, on_step = continued.build_objective(cfg, freeze(copy.deepcopy(base)), a.seed, a.steps)
        t0 = time.perf_counter()
        res = fit(fabric_from_config(cfg), obj, loss_fn,
                  continued.loader(cfg, explora.pretrain_pool(cfg, a.seed), cfg.img_size, a.seed),
                  steps=a.steps, lr=a.head_lr, on_step=on_step, **continued.optim(cfg))
        took, log_k = time.perf_counter() - t0, math.log(cfg.n_prototypes)
        for h in res.curves(("step", "dino", "ibot")):
            rows.append({"setting": label, "log_K": log_k, "s_per_step": took / a.steps, **h})
        curve = [r for r in rows if r["setting"] == label]
        every = max(1, a.steps // 8)
        print(f"{label}: log K = {log_k:.2f}; DINO " + " ".join(f"{r['dino']:.2f}" for r in curve[::every])
              + f" | last {curve[-1]['dino']:.2f}; iBOT last {curve[-1]['ibot']:.2f}; {took / a.steps:.1f} s/step",
              flush=True)
    df = pd.DataFrame(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    last = df.groupby("setting", sort=False).agg(log_K=("log_K", "first"), dino_min=("dino", "min"),
                                                 dino_last=("dino", "last"), ibot_last=("ibot", "last"))
    last["dino_last_minus_log_K"] = last.dino_last - last.log_K
    print(last.round(3).to_string())
    return df


if __name__ == "__main__":
    main()
