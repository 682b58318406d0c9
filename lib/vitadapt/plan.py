"""The estimated GPU time of a profile's notebooks, before running them (``make reproduce PROFILE=gpu|paper``).

``estimate(profile, notebooks)`` counts, from each notebook's resolved config, the images its run pushes through
the backbone: **trained** (forward and backward) and **evaluated** (forward only: features, the DinoV2 teacher,
UpStep's offline view (``offline_stream`` ema / stop_grad) and gated-off iterations, the official linear harness,
validation and test: after every epoch of a fine-tune under ``protocol`` official / both). Each count is in images
at the config's ``img_size`` (a DinoV2 local crop counts as its share of the tokens, MAE as its visible quarter).
Time = images x the architecture's multiply-accumulates per image (:func:`macs_per_image`, exact for a timm ViT) /
an assumed sustained rate, times an overhead factor.

**This is an estimate, not a measurement.** Assumptions (the constants below):

* ``INFER_MACS_PER_S`` = 74e12: a bf16/fp16 tensor-core GPU's sustained rate on ViT inference, from timm's
  published benchmark ``results/benchmark-infer-amp-nchw-pt291-cu130-pro6000maxq.csv`` (RTX PRO 6000 Blackwell
  Max-Q, PyTorch 2.9.1, AMP, eager): vit_base_patch16_224 4,190 img/s x 17.58 GMACs = 73.7e12 MAC/s;
  vit_base_patch14_dinov2 at 518 px 489 img/s x 151.7 GMACs = 74.2e12. We take that card's rate for an
  H100/H200-class GPU (whose bf16 peak is higher), so the estimate errs long.
* ``TRAIN_COST`` = 3: a training image (forward + backward) costs three forward passes; timm's
  ``benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv`` vs ``benchmark-infer-amp-nchw-pt113-cu117-rtx3090.csv``:
  vit_base_patch16_224 trains at 391 img/s and infers at 1,209 (3.1x).
* ``OVERHEAD`` = 1.5: data loading and augmentation, small batches, optimiser steps, probes and kNN, Python.
* Class counts and split sizes of the datasets (:data:`CLASSES`, :data:`SPLITS`) where a config takes "all".
"""

from __future__ import annotations

import math
from functools import lru_cache

INFER_MACS_PER_S = 74e12
TRAIN_COST = 3.0
OVERHEAD = 1.5
SOURCE = ("timm results/benchmark-infer-amp-nchw-pt291-cu130-pro6000maxq.csv (74e12 MAC/s sustained, ViT inference, "
          "AMP) and the RTX 3090 train/infer ratio (3x); overhead x1.5")

#: classes of the datasets a profile names (VTAB-1k tasks: vitadapt.data.vtab.VTAB1K_TASKS)
CLASSES = {"aid": 30, "resisc45": 45, "eurosat": 10, "ucmerced": 21, "fmow": 62, "fashion_mnist": 10,
           "digits": 10, "synthetic": 10, "synthetic_source": 10, "clevr_count": 8, "dsprites_location": 16,
           "dsprites_orientation": 16}
#: (train, val, test) sizes where a config takes a whole split (0 per class)
SPLITS = {"aid": (7000, 1000, 2000), "resisc45": (18900, 6300, 6300), "eurosat": (16200, 5400, 5400),
          "ucmerced": (1260, 420, 420), "fmow": (363572, 53041, 53473), "fashion_mnist": (54000, 6000, 10000)}

#: notebook number -> (experiment module, config class name, kind)
EXPERIMENTS = {"10": ("explora", "ExploraConfig", "explora"), "11": ("explora", "ExploraConfig", "explora"),
               "12": ("explora", "ExploraConfig", "explora_ablations"), "20": ("upstep", "UpStepConfig", "upstep"),
               "21": ("upstep", "UpStepConfig", "upstep_ablations"), "30": ("rlrr", "RLRRConfig", "rlrr"),
               "31": ("rlrr", "RLRRConfig", "rlrr_ablations")}


@lru_cache(maxsize=None)
def _macs(arch: str, img_size: int, kwargs: tuple) -> float:
    from vitadapt.vit import meta_vit
    m = meta_vit(arch, img_size, **dict(kwargs))
    d, depth = m.embed_dim, len(m.blocks)
    n_patch = m.patch_embed.num_patches
    n = n_patch + getattr(m, "num_prefix_tokens", 1)
    p = m.patch_embed.patch_size[0]
    hidden = m.blocks[0].mlp.fc1.out_features
    return n_patch * 3 * p * p * d + depth * (n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d)


def macs_per_image(arch: str, img_size: int, arch_kwargs: dict | None = None) -> float:
    """Multiply-accumulates of one forward pass of the timm ViT ``arch`` at ``img_size`` (patch embedding, qkv,
    projection, MLP and attention; vit_base_patch16_224: 17.56e9, timm's table says 17.58e9)."""
    return _macs(arch, int(img_size), tuple(sorted((arch_kwargs or {}).items())))


def _classes(name: str) -> int:
    from vitadapt.data.vtab import VTAB1K_TASKS
    kind, _, task = name.rpartition(":")
    if kind == "vtab1k" and task in VTAB1K_TASKS:
        return VTAB1K_TASKS[task]
    return CLASSES.get(task or name, 100)


def _sizes(name: str, n: tuple[int, int, int]) -> tuple[int, int, int]:
    """(train, val, test) images of ``name`` at ``n`` = (train, val, test) per class (0: the whole split; unknown
    sizes: 1,000)."""
    whole = SPLITS.get(name, (1000, 1000, 1000))
    return tuple(k * _classes(name) if k else w for k, w in zip(n, whole))


def _labelled(name: str, n: tuple[int, int, int]) -> int:
    """Images of ``name`` at ``n`` = (train, val, test) per class, all splits together (:func:`_sizes`)."""
    return sum(_sizes(name, n))


def _explora(cfg, ablations: bool) -> tuple[float, float, str]:
    from vitadapt.experiments.explora import ablation_variants
    from vitadapt.protocol import selection
    from vitadapt.protocol.official_probe import lp_iterations
    jobs = ablation_variants(cfg) if ablations else [(v, v, {}) for v in cfg.variants]
    trained = sum(v != "frozen" for _, v, _ in jobs)
    per_step = (cfg.pretrain_steps * cfg.pretrain_batch_size * cfg.devices * cfg.num_nodes       # per-device batch
                * (cfg.pretrain_accumulate or cfg.accumulate_grad_batches))                        # x accumulation
    if cfg.objective == "dinov2":
        crops = 2 + cfg.n_local_crops * (cfg.local_size / cfg.img_size) ** 2
        train, infer = per_step * crops, per_step * 2                  # student: all crops; EMA teacher: 2 global
    else:
        train, infer = per_step * (1 - cfg.mask_ratio) * 1.5, 0.0      # visible patches + decoder (~half again)
        infer += cfg.decoder_warmup_steps * cfg.pretrain_batch_size * (1 - cfg.mask_ratio) * 1.5
    n_train, n_val, n_test = _sizes(cfg.dataset, (cfg.n_train_per_class, cfg.n_val_per_class, cfg.n_test_per_class))
    labelled, official, harness = n_train + n_val + n_test, selection.official(cfg), 0
    if official:    # the official linear harness: its (augmented) training forwards, then val and test
        its = lp_iterations(cfg.official_lp_iterations, cfg.official_lp_epochs, cfg.official_lp_batch_size, n_train)
        harness = (its * min(cfg.official_lp_batch_size, n_train) if cfg.official_lp_augment else n_train) + n_val + n_test
    ft_train = ft_eval = 0.0
    if cfg.finetune and not ablations:
        steps = cfg.ft_epochs * n_train / cfg.ft_batch_size if cfg.ft_epochs else cfg.ft_steps
        points = len(cfg.ft_lrs) * len(cfg.ft_weight_decays)
        ft_train, ft_eval = points * steps * cfg.ft_batch_size, points * labelled
        if official:    # test scored after every epoch of the run that is tested (its last pass is the test above)
            epochs = steps * cfg.ft_batch_size / (n_train + (n_val if points > 1 else 0))
            ft_eval += (math.ceil(epochs) - 1) * n_test
    seeds = len(cfg.seeds)
    train_imgs = seeds * (trained * train + len(jobs) * ft_train)
    eval_imgs = seeds * (trained * infer + len(jobs) * (labelled + harness + ft_eval))
    return train_imgs, eval_imgs, f"{len(jobs)} variants x {seeds} seeds, {cfg.pretrain_steps} steps of {cfg.pretrain_batch_size}" + \
        (f" x {cfg.devices * cfg.num_nodes} devices" if cfg.devices * cfg.num_nodes > 1 else "") + \
        (f" x {(cfg.pretrain_accumulate or cfg.accumulate_grad_batches)} accumulated" if (cfg.pretrain_accumulate or cfg.accumulate_grad_batches) > 1 else "")


def _upstep(cfg, ablations: bool) -> tuple[float, float, str]:
    from vitadapt.experiments.upstep import ablation_variants, forgetting_dataset_for
    variants = ablation_variants(cfg) if ablations else [("UpStep", {})]
    domains = [cfg.target_for_ablations] if ablations else list(cfg.domains)
    train = infer = 0.0
    for domain in domains:
        sets = _labelled(domain, (cfg.n_train_per_class, cfg.n_val_per_class, cfg.n_test_per_class)) + _labelled(
            forgetting_dataset_for(cfg, domain), (cfg.forgetting_n_train_per_class, cfg.forgetting_n_val_per_class,
                                                  cfg.forgetting_n_test_per_class))
        infer += sets                                                     # the base model, once per domain
        for _, over in variants:
            gate = over.get("gate", cfg.gate)
            back = {"none": 1.0, "alternate": 0.5}.get(gate, 1 - cfg.gate_target_skip)
            batch = over.get("steps", cfg.steps) * cfg.adapt_batch_size
            online = 2 if over.get("offline_stream", cfg.offline_stream) == "symmetric" else 1    # views with gradient
            train += batch * online * back
            infer += batch * (2 - online * back) + sets                   # the offline view: a forward only
    seeds = len(cfg.seeds)
    return seeds * train, seeds * infer, f"{len(variants)} variants x {len(domains)} domains x {seeds} seeds, {cfg.steps} steps of {cfg.adapt_batch_size}"


def _rlrr(cfg, ablations: bool) -> tuple[float, float, str]:
    from vitadapt.experiments.rlrr import distinct_variants
    from vitadapt.finetune import select_then_test_steps
    from vitadapt.protocol import selection
    runs = len(distinct_variants(cfg)) if ablations else len(cfg.methods)
    points = len(cfg.lr_multipliers) * len(cfg.weight_decays) * (len(cfg.seeds) if cfg.select_each_seed else 1)
    searches = cfg.grid_searches(runs, ablations)     # as rlrr._run: RLRR at an official point searches nothing
    epochs = cfg.epochs + cfg.cooldown_epochs
    tests = math.ceil(epochs) if selection.official(cfg) else 1     # test passes of a run (scored every epoch)
    train = infer = 0.0
    for task in cfg.tasks:
        whole = SPLITS.get(task.rpartition(":")[2], (1000, 1000, 1000))
        n_train, n_val, n_test = (n or w for n, w in zip((cfg.n_train, cfg.n_val, cfg.n_test), whole))
        steps = select_then_test_steps(n_train, n_val, batch_size=cfg.batch_size, epochs=epochs,
                                       grid_points=points, seeds=len(cfg.seeds), runs=runs,
                                       searches=searches)
        frac = cfg.adapt_blocks / 12 if cfg.adapt_blocks else 1.0          # only the tail trains, the prefix is cached
        train += steps["total_images"] * frac
        infer += searches * points * n_val + runs * len(cfg.seeds) * n_test * tests + (n_train + n_val + n_test) * (1 - frac)
    return train, infer, f"{runs} {'variants' if ablations else 'methods'} x {len(cfg.tasks)} tasks x {len(cfg.seeds)} seeds, {cfg.epochs:g} epochs"


def _config(profile: str, notebook: str, params: dict):
    import importlib
    from dataclasses import fields
    from vitadapt.config import build_config
    module, name, kind = EXPERIMENTS[notebook[:2]]
    cls = getattr(importlib.import_module(f"vitadapt.experiments.{module}"), name)
    names = {f.name for f in fields(cls)}
    return build_config(cls, profile, notebook, **{k: v for k, v in params.items() if k in names}), kind


def estimate(profile: str, notebooks, params: dict | None = None) -> list[dict]:
    """One row per notebook (names or paths; e.g. ``["10_explora_dinov2", "30_rlrr"]``; ``params``: values laid over
    each notebook's config where it has the field, as the runner's ``-p``): arch, img_size, images
    trained and evaluated, the assumed img/s and the estimated seconds on one H100-class GPU (an estimate from
    the config, not a measurement; see the module docstring). Notebooks without training get 0 s and a note.
    A bad profile or config raises ValueError."""
    from vitadapt.config import PROFILES
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not valid; valid values: {', '.join(PROFILES)}")
    rows = []
    for nb in notebooks:
        name = getattr(nb, "stem", str(nb))
        if name[:2] not in EXPERIMENTS:
            rows.append({"notebook": name, "arch": "", "img_size": 0, "train_images": 0, "eval_images": 0,
                         "infer_img_s": 0.0, "train_img_s": 0.0, "est_s": 0.0, "work": "no training (seconds)"})
            continue
        cfg, kind = _config(profile, name, params or {})
        fn = {"explora": _explora, "upstep": _upstep, "rlrr": _rlrr}[kind.split("_")[0]]
        train, infer, work = fn(cfg, kind.endswith("ablations"))
        macs = macs_per_image(cfg.arch, cfg.img_size, cfg.arch_kwargs)
        infer_rate = INFER_MACS_PER_S / macs
        seconds = OVERHEAD * (train * TRAIN_COST + infer) / infer_rate
        rows.append({"notebook": name, "arch": cfg.arch, "img_size": cfg.img_size, "train_images": int(train),
                     "eval_images": int(infer), "infer_img_s": round(infer_rate, 1),
                     "train_img_s": round(infer_rate / TRAIN_COST, 1), "est_s": round(seconds, 1),
                     "devices": cfg.devices, "work": work})
    return rows


def format_estimate(rows: list[dict], profile: str) -> str:
    """The rows as a plain table with the total, saying what the numbers are."""
    fmt = lambda s: f"{s:.0f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"
    lines = [f"estimated GPU time of the {profile} profile on H100-class GPUs (an ESTIMATE from the configs, "
             f"not a measurement; assumptions: {SOURCE}; see vitadapt.plan):"]
    for r in rows:
        if not r["train_images"] and not r["eval_images"]:
            lines.append(f"  {r['notebook']:<26} {'-':>9}  {r['work']}")
            continue
        lines.append(f"  {r['notebook']:<26} {fmt(r['est_s']):>9}  {r['arch']} @ {r['img_size']} px: "
                     f"{r['train_images']:,} images trained (~{r['train_img_s']:,.0f} img/s), {r['eval_images']:,} "
                     f"evaluated (~{r['infer_img_s']:,.0f} img/s); {r['work']}")
    total = sum(r["est_s"] for r in rows)
    lines.append(f"  {'total':<26} {fmt(total):>9}")
    return "\n".join(lines)


__all__ = ["estimate", "format_estimate", "macs_per_image", "INFER_MACS_PER_S", "TRAIN_COST", "OVERHEAD"]
