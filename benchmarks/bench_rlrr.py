"""RLRR speed, as ratios measured in one run on the same model and batch.

1. Inference: the merged RLRR model (every rescaling and SSF folded into plain weights) versus the plain timm ViT.
   The ideal ratio is 1.00 (merging leaves a plain timm model); the unmerged RLRR model is shown for reference.
2. Training step (forward, backward, AdamW step): RLRR versus LoRA (r=8 on qkv) versus full fine-tuning.

Warm-up steps first (the first steps are 5-30x slower), then the variants are timed in interleaved rounds (A B C,
A B C, ...) so that a slow spell of a shared machine hits all of them; the median of the rounds is reported.
No assertion on time: this prints numbers.

    .venv/bin/python benchmarks/bench_rlrr.py [--batch 32] [--img-size 112] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn


def interleaved(fns: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of every function, timed in interleaved rounds after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant first")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import timm
    from vitadapt.peft.baselines import build
    from vitadapt.peft.common import count_trainable
    from vitadapt.peft.rlrr import apply_rlrr, merge_rlrr

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(args.arch, pretrained=False, img_size=args.img_size, num_classes=10)

    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    print(f"{args.arch} at {args.img_size} px, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.reps} interleaved rounds after {args.warmup} warm-up calls each")

    # ---- inference: plain vs merged RLRR (vs unmerged RLRR)
    plain = fresh().eval()
    rlrr = apply_rlrr(fresh()).eval()
    with torch.no_grad():   # move away from the init so that merging has something to fold
        for p in rlrr.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    merged = merge_rlrr(copy.deepcopy(rlrr)).eval()
    with torch.no_grad():
        diff = (merged(x) - rlrr(x)).abs().max().item()
    same_type = {type(m).__name__ for m in merged.modules()} <= {type(m).__name__ for m in plain.modules()}

    def infer(m):
        def f():
            with torch.no_grad():
                m(x)
        return f
    t_inf = interleaved({"plain": infer(plain), "rlrr_merged": infer(merged), "rlrr_unmerged": infer(rlrr)},
                        args.reps, args.warmup)

    # ---- training step: RLRR vs LoRA vs full
    def trainer(name: str):
        m = build(name, fresh(), **({"r": 8} if name == "lora" else {})).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, count_trainable(m)
    steps = {n: trainer(n) for n in ("rlrr", "lora", "full")}
    t_train = interleaved({n: s for n, (s, _) in steps.items()}, args.reps, args.warmup)

    ips = lambda t: args.batch / t
    print("\ninference (no grad)              ms/batch    img/s")
    for k, t in t_inf.items():
        print(f"  {k:28s} {1000 * t:9.1f} {ips(t):8.1f}")
    print(f"  merged == unmerged: max |diff| {diff:.2e}; merged model has only plain timm module types: {same_type}")
    print("\ntraining step (fwd+bwd+AdamW)    ms/step     img/s   trainable")
    for k, t in t_train.items():
        print(f"  {k:28s} {1000 * t:9.1f} {ips(t):8.1f}   {steps[k][1]:,}")
    print("\nRATIOS (time / time; 1.00 = same cost)")
    print(f"  inference, merged RLRR / plain ViT     {t_inf['rlrr_merged'] / t_inf['plain']:.2f}   (ideal 1.00)")
    print(f"  inference, unmerged RLRR / plain ViT   {t_inf['rlrr_unmerged'] / t_inf['plain']:.2f}")
    print(f"  train step, RLRR / LoRA                {t_train['rlrr'] / t_train['lora']:.2f}")
    print(f"  train step, RLRR / full fine-tuning    {t_train['rlrr'] / t_train['full']:.2f}")
    print(f"  train step, LoRA / full fine-tuning    {t_train['lora'] / t_train['full']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
