"""One extended pre-training step of ExPLoRA versus full-parameter continued pre-training.

Same objective (DinoV2 or MAE, built by ``vitadapt.experiments.explora.build_objective``), same model (random
weights of the configured architecture: the cost does not depend on the weights), same batch (fixed tensors, so data
loading is not timed), same AdamW settings; only the trainable set differs (``apply_variant``). Both are measured in
the same run of this script, each in its own subprocess so that its memory peak is its own:

* step time: ``--warmup`` untimed steps (the first steps are 5-30x slower), then ``--reps`` repetitions of ``--steps``
  timed steps; the time of a repetition is the mean of its steps, and the reported time is the median over
  repetitions (CUDA: synchronised);
* peak memory: CUDA: ``torch.cuda.max_memory_allocated`` over the timed loop (model, objective, activations,
  gradients, optimizer state). CPU: the process's resident-set high-water mark (``VmHWM``, reset before the first
  step), and its increment over the resident set before the first step (activations, gradients, optimizer state);
* optimizer state: the bytes of AdamW's state tensors after the loop (exp_avg and exp_avg_sq: 8 bytes per trainable
  parameter in fp32), and the gradient bytes.

It prints the measurements and the ratios ExPLoRA / full. No assertion: the numbers are what they are on this
machine. Examples::

    .venv/bin/python benchmarks/bench_explora.py                          # ViT-S/14, 112 px, both objectives
    .venv/bin/python benchmarks/bench_explora.py --smoke                  # tiny ViT, one repetition, seconds
    .venv/bin/python benchmarks/bench_explora.py --arch vit_large_patch14_dinov2 --img-size 224 --batch 32 \\
        --n-local 8 --local-size 98 --n-prototypes 65536 --objective dinov2   # the paper's model, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("explora", "full")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=("dinov2", "mae", "both"), default="both")
    p.add_argument("--arch", default="vit_small_patch14_dinov2", help="timm architecture (random weights)")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--n-local", type=int, default=2, help="DinoV2 local crops per image")
    p.add_argument("--local-size", type=int, default=56, help="DinoV2 local crop size")
    p.add_argument("--n-prototypes", type=int, default=4096, help="DinoV2 head prototypes (paper 65536)")
    p.add_argument("--decoder-dim", type=int, default=256, help="MAE decoder width (paper 512)")
    p.add_argument("--decoder-depth", type=int, default=2, help="MAE decoder depth (paper 8)")
    p.add_argument("--unfreeze", default="L", help="ExPLoRA unfrozen blocks, paper notation")
    p.add_argument("--rank", type=int, default=64, help="ExPLoRA LoRA rank")
    p.add_argument("--targets", default="q,v", help="ExPLoRA LoRA targets")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny random ViT, 1 warm-up step, 1 repetition of 2 steps")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=VARIANTS + ("",), default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-objective", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.arch, a.img_size, a.batch, a.n_local, a.local_size, a.n_prototypes = "vit_tiny_patch16_224", 32, 8, 2, 16, 64
        a.decoder_dim, a.decoder_depth, a.rank, a.warmup, a.steps, a.reps = 32, 1, 4, 1, 2, 1
    return a


def _config(a, objective: str):
    from vitadapt.experiments.explora import ExploraConfig
    kw = dict(profile="smoke", weights="random", arch=a.arch, img_size=a.img_size, objective=objective,
              unfreeze=a.unfreeze, rank=a.rank, targets=a.targets, n_prototypes=a.n_prototypes,
              n_local_crops=a.n_local, local_size=a.local_size, decoder_dim=a.decoder_dim,
              decoder_depth=a.decoder_depth, decoder_heads=max(1, a.decoder_dim // 32),
              pretrain_steps=a.warmup + a.steps * a.reps, pretrain_batch_size=a.batch, out_dir="/tmp/bench_explora")
    if a.smoke:
        kw.update(arch_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3}, head_hidden_dim=64,
                  head_bottleneck_dim=32)
    return ExploraConfig(**kw)


def worker(a) -> dict:
    """Build, warm up, time and measure one variant; returns a dict (printed as one JSON line)."""
    import copy

    import torch

    from vitadapt.experiments import explora as E
    from vitadapt.peft.common import count_trainable
    from vitadapt.train import reset_peak_memory, seed_everything, status_mb

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    dev = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    cfg = _config(a, a.worker_objective)
    seed_everything(0)
    base, _ = E.load_base(cfg, verbose=False)
    student = E.apply_variant(cfg, copy.deepcopy(base), a.worker)
    del base
    objective, loss_fn, on_step = E.build_objective(cfg, student, seed=0)
    objective.to(dev).train()
    g = torch.Generator().manual_seed(0)
    B, S = a.batch, a.img_size
    if cfg.objective == "dinov2":
        batch = [torch.randn(B, 3, S, S, generator=g) for _ in range(2)]
        batch += [torch.randn(B, 3, a.local_size, a.local_size, generator=g) for _ in range(a.n_local)]
        batch = [x.to(dev) for x in batch]
    else:
        batch = torch.randn(B, 3, S, S, generator=g).to(dev)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.04},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-4)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(i):
        loss, _ = loss_fn(objective, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        if on_step is not None:
            on_step(i, objective)

    sync()
    level = reset_peak_memory(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    i = 0
    for _ in range(a.warmup):
        step(i)
        i += 1
    sync()
    reps = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(i)
            i += 1
        sync()
        reps.append((time.perf_counter() - t0) / a.steps)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = status_mb("VmHWM") or 0.0
    opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t))
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return {"objective": cfg.objective, "variant": a.worker, "device": str(dev), "threads": torch.get_num_threads(),
            "trainable_backbone": count_trainable(student), "trainable_total": count_trainable(objective),
            "step_s_reps": reps, "step_s": statistics.median(reps), "peak_mb": peak,
            "level_before_mb": level, "increment_mb": (peak - level) if dev.type == "cpu" else None,
            "optimizer_state_mb": opt_bytes / 2**20, "grad_mb": grad_bytes / 2**20}


def _run_worker(a, objective: str, variant: str) -> dict:
    args = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--worker-objective", objective,
            "--arch", a.arch, "--img-size", str(a.img_size), "--batch", str(a.batch), "--n-local", str(a.n_local),
            "--local-size", str(a.local_size), "--n-prototypes", str(a.n_prototypes), "--decoder-dim",
            str(a.decoder_dim), "--decoder-depth", str(a.decoder_depth), "--unfreeze", a.unfreeze, "--rank",
            str(a.rank), "--targets", a.targets, "--warmup", str(a.warmup), "--steps", str(a.steps), "--reps",
            str(a.reps), "--threads", str(a.threads), "--device", a.device] + (["--smoke"] if a.smoke else [])
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"worker {objective}/{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x, unit="", digits=3):
    return "-" if x is None else f"{x:,.{digits}f}{unit}"


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return {}
    objectives = ("dinov2", "mae") if a.objective == "both" else (a.objective,)
    print(f"bench_explora: {a.arch} at {a.img_size} px, batch {a.batch}, ExPLoRA U={a.unfreeze} r={a.rank} "
          f"{a.targets} vs full; {a.warmup} warm-up steps, median of {a.reps} x {a.steps} steps; random weights")
    results = {}
    for obj in objectives:
        rows = {v: _run_worker(a, obj, v) for v in VARIANTS}
        e, f = rows["explora"], rows["full"]
        ratios = {"step_time": e["step_s"] / f["step_s"], "peak_memory": e["peak_mb"] / f["peak_mb"],
                  "optimizer_state": e["optimizer_state_mb"] / f["optimizer_state_mb"],
                  "trainable_backbone": e["trainable_backbone"] / f["trainable_backbone"]}
        if e["increment_mb"] and f["increment_mb"]:
            ratios["memory_increment"] = e["increment_mb"] / f["increment_mb"]
        results[obj] = {"explora": e, "full": f, "ratios": ratios}
        dev = e["device"] + (f", {e['threads']} threads" if e["device"] == "cpu" else "")
        extra = (f" (DinoV2: 2 global + {a.n_local} local crops at {a.local_size} px, {a.n_prototypes} prototypes)"
                 if obj == "dinov2" else f" (MAE: 75 % masked, decoder {a.decoder_dim}-d x {a.decoder_depth})")
        print(f"\n[{obj}] on {dev}{extra}")
        print(f"{'variant':<9} {'trainable backbone':>19} {'step s (median)':>16} {'reps':>22} {'peak MB':>10} "
              f"{'increment MB':>13} {'AdamW state MB':>15} {'grads MB':>9}")
        for v, r in rows.items():
            reps = ",".join(f"{x:.3f}" for x in r["step_s_reps"])
            print(f"{v:<9} {r['trainable_backbone']:>19,} {_fmt(r['step_s']):>16} {reps:>22} {_fmt(r['peak_mb'], '', 0):>10} "
                  f"{_fmt(r['increment_mb'], '', 0):>13} {_fmt(r['optimizer_state_mb'], '', 1):>15} "
                  f"{_fmt(r['grad_mb'], '', 1):>9}")
        print("ratios ExPLoRA / full: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in ratios.items()))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "results": results}, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
