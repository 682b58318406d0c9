"""30_rlrr and 31_rlrr_ablations: RLRR against the PEFT baselines on a VTAB-1k-style benchmark, and its ablations.

Protocol (both notebooks): for every task, the labelled images are ``n_train`` + ``n_val`` (VTAB-1k: 800 + 200)
drawn once with ``data_seed`` (as VTAB-1k's fixed lists) and a separate test set. Every method/variant is
fine-tuned (:mod:`vitadapt.finetune`: AdamW, warm-up + cosine, label smoothing, drop-path) for each point of a
small (lr, weight decay) grid on train, scored on val; the best on val is retrained on train + val from a fresh
model for every seed and tested once. Seeds vary the head/adapter initialisation and the batch order.

``adapt_blocks > 0`` (cpu profile) adapts only the last ``adapt_blocks`` transformer blocks, the final norm and
the head: the patch embedding and the earlier blocks are frozen for every method and their outputs cached
once per image (exact, since there is no augmentation). The paper adapts all blocks (``adapt_blocks=0``).
The linear probe (head only) always trains on cached pooled features when inputs are cached.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

from vitadapt.config import ExperimentConfig, opt
from vitadapt.data import DATASETS, DataMissingError, Splits
from vitadapt.data.vtab import FGVC_TASKS, VTAB1K_TASKS, vtab_task
from vitadapt.experiments.common import brief
from vitadapt.finetune import (HeadOnly, TailViT, embed_tokens, fresh_head, materialize, pooled_features,
                               run_blocks, select_then_test)
from vitadapt.jobs import JobStore, mean_std_text
from vitadapt.models import WEIGHTS, create_backbone
from vitadapt.peft.baselines import BASELINES, build
from vitadapt.peft.common import count_trainable
from vitadapt.peft.rlrr import INITS, SIDES

# ---------------------------------------------------------------------------------------------------------
# The published numbers (REFERENCE.md section 3)

PAPER_LABEL = "paper: ViT-B/16 IN-21k, VTAB-1k"

#: Dong et al. 2024, VTAB-1k top-1 (%), group means, mean over the 19 tasks, trainable parameters (M)
PAPER_VTAB = pd.DataFrame(
    [("rlrr", 82.7, 85.8, 61.8, 74.5, 0.33), ("lora", 79.5, 84.6, 59.8, 72.3, 0.29),
     ("full", 75.9, 83.4, 47.6, 65.6, 85.8), ("linear", 68.9, 77.2, 26.9, 52.9, 0.04),
     ("ssf", 81.6, 86.6, 59.0, 73.1, 0.24)],
    columns=["method", "natural", "specialized", "structured", "mean", "params_M"]).set_index("method")
PAPER_VTAB.attrs["label"] = PAPER_LABEL
PAPER_VTAB_NOTES = ("SSF's row is its AugReg-backbone number as quoted by the RLRR paper; 'mean' is over the 19 tasks "
                    "(not the mean of the three group means). Per task, RLRR: EuroSAT 95.2, Resisc45 85.3. "
                    "FGVC mean: RLRR 90.4, LoRA 89.5, full 88.5.")

#: Table 6 pattern (FGVC mean top-1, %): rescaling sides x residual
PAPER_SIDES = pd.DataFrame({"left": [89.2, 89.5], "right": [89.3, 89.7], "both": [88.9, 90.4]},
                           index=pd.Index(["no residual", "residual"], name="paper: FGVC mean, ViT-B/16 IN-21k"))
PAPER_INIT_NOTE = "paper: normal / zero / constant / uniform initialisations all within about 1 point of Kaiming"

DEFAULT_GROUPS = {"natural": ["fashion_mnist"], "specialized": ["aid"],
                  "structured": ["clevr_count", "dsprites_location", "dsprites_orientation"]}
DEFAULT_BASE_LR = {"linear": 1e-2, "full": 1e-4, "bitfit": 5e-3, "lora": 2e-3, "ia3": 1e-2, "ln_tuning": 5e-3,
                   "ssf": 5e-3, "rlrr": 5e-3}

ABLATIONS = ("sides_residual", "init", "rank", "layers")
LAYER_VARIANTS = ("attn", "mlp", "all", "all+ssf")
OFFICIAL = {"sides": "both", "residual": True, "rank": 1, "init": "kaiming", "layers": "all", "ssf": True}


def _valid_task(name: str) -> bool:
    if name.startswith("vtab1k:"):
        return name.split(":", 1)[1] in VTAB1K_TASKS
    if name.startswith("fgvc:"):
        return name.split(":", 1)[1] in FGVC_TASKS
    return name in DATASETS and name not in ("vtab1k", "fgvc", "sentinel2_tiles")


@dataclass
class RLRRConfig(ExperimentConfig):
    tasks: tuple = opt(tuple(t for g in DEFAULT_GROUPS.values() for t in g), "Tasks (registered datasets, 'vtab1k:<task>' or 'fgvc:<task>'), each a VTAB-1k-style task.")
    groups: dict = opt(DEFAULT_GROUPS, "VTAB group -> its tasks; every task must be in one group (YAML only).", yaml_only=True)
    methods: tuple = opt(("linear", "full", "lora", "ssf", "rlrr", "ia3"), "Methods (names in vitadapt.peft.baselines.BASELINES).")
    n_train: int = opt(800, "Training images per task (VTAB-1k: 800; 0: the whole training split, as FGVC).", min=0)
    n_val: int = opt(200, "Validation images per task (VTAB-1k: 200; 0: the whole split); the grid is chosen on these.", min=0)
    n_test: int = opt(0, "Test images per task (0: the whole test split); the same images for every seed.", min=0)
    data_seed: int = opt(0, "Seed of the train/val draw (fixed across seeds, like VTAB-1k's lists).", min=0)
    bins: int = opt(16, "Classes of the dSprites tasks (x-position / orientation bins; VTAB: 16).", min=2, max=64)
    epochs: float = opt(100.0, "Training epochs over the training images (the retrain on train+val: the same epochs).", min=0.01)
    warmup: float = opt(0.1, "Warm-up, as a fraction of the steps (paper: 10 of 100 epochs).", min=0.0, max=0.99)
    base_lr: dict = opt(DEFAULT_BASE_LR, "Base learning rate per method; the grid multiplies it by lr_multipliers (YAML only).", yaml_only=True)
    lr_multipliers: tuple = opt((0.5, 2.0), "Learning-rate grid, as multiples of the method's base_lr.", min=1e-6, max=1e6)
    weight_decays: tuple = opt((1e-4,), "Weight-decay grid (AdamW, on matrices only).", min=0.0, max=10.0)
    label_smoothing: float = opt(0.1, "Label smoothing of the cross-entropy.", min=0.0, max=0.99)
    drop_path: float = opt(0.1, "Stochastic depth rate of the backbone (timm drop_path_rate; last block's rate).", min=0.0, max=0.9)
    augment: bool = opt(False, "Random resized crop + flip (the VTAB-1k recipe of the RLRR/NOAH code uses none; flips change dSprites labels).")
    adapt_blocks: int = opt(0, "Adapt only the last N blocks (+ final norm, head), caching the frozen rest; 0: all blocks (paper).", min=0)
    lora_rank: int = opt(8, "LoRA rank (on the fused qkv, alpha = rank).", min=1, max=1024)
    select_each_seed: bool = opt(False, "Search the grid for every seed (else once, with the first seed, then retrain every seed).")
    vtab1k_root: str = opt("", "Folder of the VTAB-1k task folders; '' searches $VITADAPT_VTAB1K_ROOT, data/vtab1k, ../shared/data/vtab1k.")
    fgvc_root: str = opt("", "Folder of the FGVC sets (VPT layout); '' searches $VITADAPT_FGVC_ROOT, data/fgvc, ../shared/data/fgvc.")
    interactive: bool = opt(False, "Show a form that re-runs one configuration (validation accuracy only), and progress bars; in a live kernel, not under papermill.")
    threads: int = opt(0, "torch CPU threads; 0: one per core. Tiny models run faster on 1 (and suffer less from a busy machine).", min=0, max=1024)
    # 31_rlrr_ablations
    ablations: tuple = opt(ABLATIONS, "Ablation groups to run: sides_residual, init, rank, layers.")
    ablation_inits: tuple = opt(INITS, "Initialisations of the init ablation.")
    ablation_ranks: tuple = opt((1, 2, 4), "Ranks of the rank ablation.", min=1, max=1024)
    ablation_layers: tuple = opt(LAYER_VARIANTS, "Layer variants: attn / mlp / all (RLRR only, no SSF) and all+ssf (official).")
    ablation_grid: Literal["shared", "per_variant"] = opt("shared", "shared: the grid is searched once per task for official RLRR and its choice is used by every variant; per_variant: each variant searches the grid.")

    def check(self):
        bad = [t for t in self.tasks if not _valid_task(t)]
        if bad:
            raise ValueError(f"tasks={list(self.tasks)!r}: unknown task(s) {bad}; valid: registered datasets "
                             f"({', '.join(sorted(set(DATASETS) - {'vtab1k', 'fgvc'}))}), vtab1k:<{'|'.join(VTAB1K_TASKS)}>, "
                             f"fgvc:<{'|'.join(FGVC_TASKS)}>")
        grouped = [t for g in self.groups.values() for t in g]
        missing = [t for t in self.tasks if t not in grouped]
        if missing:
            raise ValueError(f"task(s) {missing} are in no group of groups={self.groups!r}; add them to one")
        bad = [m for m in self.methods if m not in BASELINES]
        if bad:
            raise ValueError(f"methods={list(self.methods)!r}: unknown {bad}; valid values: {', '.join(BASELINES)}")
        nolr = [m for m in self.methods if m not in self.base_lr]
        if nolr:
            raise ValueError(f"base_lr has no entry for {nolr}; give one per method")
        if not self.lr_multipliers or not self.weight_decays:
            raise ValueError("lr_multipliers and weight_decays need at least one value each")
        if self.augment and self.adapt_blocks:
            raise ValueError("augment=True needs the images at every step, so adapt_blocks must be 0 (the frozen "
                             "prefix is cached on un-augmented images); set augment=False or adapt_blocks=0")
        for name, values, valid in (("ablations", self.ablations, ABLATIONS), ("ablation_inits", self.ablation_inits, INITS),
                                    ("ablation_layers", self.ablation_layers, LAYER_VARIANTS)):
            bad = [v for v in values if v not in valid]
            if bad:
                raise ValueError(f"{name}={list(values)!r}: unknown {bad}; valid values: {', '.join(valid)}")

    def grid(self, method: str = "rlrr") -> list[dict]:
        base = self.base_lr[method]
        return [{"lr": float(base * m), "weight_decay": float(wd)} for m in self.lr_multipliers for wd in self.weight_decays]

    def group_of(self, task: str) -> str:
        return next(g for g, names in self.groups.items() if task in names)


# ---------------------------------------------------------------------------------------------------------
# Dry run, counts, data

def dry_run_reason(cfg: RLRRConfig) -> str | None:
    """Why this run should stop after building (None: run for real)."""
    if cfg.dry_run == "yes":
        return "dry_run='yes'"
    if cfg.dry_run == "no":
        return None
    missing = []
    for t in cfg.tasks:
        try:
            load_task(cfg, t, probe=True)
        except (DataMissingError, FileNotFoundError) as e:
            missing.append((t, str(e)))
    if missing:
        return (f"{len(missing)} of {len(cfg.tasks)} tasks not available here ({', '.join(t for t, _ in missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}); first error: {missing[0][1][:300]}")
    src = WEIGHTS.get(cfg.weights)
    if src is not None and src.kind == "hub":
        from vitadapt.models import hub_reachable
        if not hub_reachable():
            return f"weights {cfg.weights!r} need the timm hub, which is not reachable from here"
    return None


def load_task(cfg: RLRRConfig, task: str, probe: bool = False) -> Splits:
    """The VTAB-1k-style splits of ``task`` (``probe``: only check that the source is there)."""
    kw = dict(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, size=max(cfg.img_size, 32), bins=cfg.bins,
              vtab1k_root=cfg.vtab1k_root, fgvc_root=cfg.fgvc_root)
    if probe:
        kw.update(n_train=1, n_val=1, n_test=1)
    return vtab_task(task, cfg.data_seed, **kw)


def method_kwargs(cfg: RLRRConfig, method: str) -> dict:
    return {"r": cfg.lora_rank} if method == "lora" else {}


def trainable_counts(arch: str, methods, img_size: int = 224, arch_kwargs: dict | None = None,
                     num_classes: int = 0, adapt_blocks: int = 0, lora_rank: int = 8) -> pd.DataFrame:
    """Trainable parameters per method on ``arch`` (built on the meta device: no memory, no weights)."""
    rows = []
    for m in methods:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=num_classes,
                                      **(arch_kwargs or {}))
        if adapt_blocks:
            model = TailViT(model, len(model.blocks) - adapt_blocks)
        build(m, model, **({"r": lora_rank} if m == "lora" else {}))
        rows.append({"method": m, "trainable": count_trainable(model)})
    return pd.DataFrame(rows).set_index("method")


def paper_count_table(methods) -> pd.DataFrame:
    """ViT-B/16 counts: ours without head, + the mean VTAB-1k head (768 C + C over the 19 tasks), the paper's."""
    head = float(np.mean([769 * c for c in VTAB1K_TASKS.values()]))
    counts = trainable_counts("vit_base_patch16_224", methods, 224)["trainable"]
    rows = []
    for m in methods:
        rows.append({"method": m, "ours: no head": int(counts[m]), "ours: + mean VTAB head": int(counts[m] + head),
                     "ours (M)": round((counts[m] + head) / 1e6, 2),
                     "paper (M)": PAPER_VTAB["params_M"].get(m, float("nan"))})
    return pd.DataFrame(rows).set_index("method")


@dataclass
class TaskInputs:
    """One task's inputs, prepared once and shared by every method, grid point and seed."""
    name: str
    group: str
    splits: Splits            # train / val / test as fed to the models (images or cached tokens)
    features: Splits | None   # pooled features for the linear probe (when inputs are cached)
    num_classes: int
    record: dict
    prep_time_s: float


def prepare_task(cfg: RLRRConfig, task: str, vit: nn.Module, fabric=None) -> TaskInputs:
    """Load the task; with ``adapt_blocks`` run the frozen prefix once and cache its tokens."""
    t0 = time.perf_counter()
    s = load_task(cfg, task)
    record = s.record()
    C = len(s.classes)
    features = None
    if cfg.adapt_blocks and not cfg.augment:
        start = len(vit.blocks) - cfg.adapt_blocks
        toks = {}
        for part in ("train", "val", "test"):
            imgs = materialize(getattr(s, part), cfg.img_size, cfg.batch_size, cfg.num_workers)
            toks[part] = run_blocks(vit.blocks[:start], embed_tokens(vit, imgs, cfg.batch_size, fabric),
                                    cfg.batch_size, fabric)
        tail = TailViT(vit, start)
        feats = {k: pooled_features(tail, v, cfg.batch_size, fabric) for k, v in toks.items()}
        inputs = Splits(s.name, toks["train"], toks["val"], toks["test"], s.classes, s.source, s.info)
        features = Splits(s.name, feats["train"], feats["val"], feats["test"], s.classes, s.source, s.info)
    else:
        inputs = s
    return TaskInputs(task, cfg.group_of(task), inputs, features, C, record, time.perf_counter() - t0)


def dry_run_build(cfg: RLRRConfig, ablation: bool = False) -> dict:
    """In a dry run: the backbone with its real weights when they can be had here, else the same architecture
    with random weights; every method (``ablation``: every RLRR variant) adapts a copy and runs a forward pass.
    Returns the backbone's info."""
    from vitadapt.models import WeightsMissingError
    try:
        vit, info = load_vit(cfg)
    except WeightsMissingError as e:
        print(f"weights {cfg.weights!r} not available here ({brief(e)}); building {cfg.arch} with random weights")
        vit, info = create_backbone("random", WEIGHTS[cfg.weights].arch or cfg.arch if cfg.weights in WEIGHTS else cfg.arch,
                                    cfg.img_size, cfg.arch_kwargs, num_classes=1, drop_path_rate=cfg.drop_path)
    if ablation:
        adapters = {str(kw): (lambda m, kw=kw: build("rlrr", m, **kw))
                    for kw in {_key(kw): kw for _, _, kw in ablation_variants(cfg)}.values()}
    else:
        adapters = {m: (lambda model, m=m: build(m, model, **method_kwargs(cfg, m))) for m in cfg.methods}
    for adapt in adapters.values():
        with torch.no_grad():
            out = adapt(copy.deepcopy(vit)).eval()(torch.zeros(1, 3, cfg.img_size, cfg.img_size))
        assert out.shape == (1, 1), out.shape
    what = "RLRR variant" if ablation else "method"
    print(f"dry run: {info['arch']} builds at {cfg.img_size} px; each of the {len(adapters)} {what}s adapts it and "
          f"runs a forward pass")
    return info


def load_vit(cfg: RLRRConfig, verbose: bool = True):
    """The backbone (frozen copy kept as the source of every fresh model) and its info."""
    vit, info = create_backbone(cfg.weights, cfg.arch, cfg.img_size, cfg.arch_kwargs, num_classes=1,
                                drop_path_rate=cfg.drop_path, verbose=verbose)
    if cfg.adapt_blocks >= len(vit.blocks):
        raise ValueError(f"adapt_blocks={cfg.adapt_blocks} must be below the backbone's {len(vit.blocks)} blocks "
                         f"(0 adapts all of them)")
    return vit.eval(), info


def model_factory(cfg: RLRRConfig, vit: nn.Module, ti: TaskInputs, adapt: callable):
    """``make_model()`` for select_then_test: a fresh copy of the trainable part with a new head, adapted by
    ``adapt(model)``; the linear probe on cached features is a bare head."""
    def make(**_):
        if ti.features is not None and adapt is _linear:
            m = HeadOnly(nn.Linear(vit.num_features, ti.num_classes))
        elif cfg.adapt_blocks:
            m = copy.deepcopy(TailViT(vit, len(vit.blocks) - cfg.adapt_blocks))
        else:
            m = copy.deepcopy(vit)
        fresh_head(m, ti.num_classes)
        return adapt(m).train()
    return make


def _linear(m):
    return build("linear", m)


def _adapter(cfg, method):
    if method == "linear":
        return _linear
    kw = method_kwargs(cfg, method)
    return lambda m: build(method, m, **kw)


def _load_recorded(cfg: RLRRConfig, run=None) -> nn.Module:
    """The configured backbone, its weight source recorded in ``run`` (when given)."""
    vit, info = load_vit(cfg)
    if run is not None:
        run.use("weights", info)
    return vit


def _fabric(cfg):
    from vitadapt.train import fabric_from_config
    return fabric_from_config(cfg)


def _fit_common(cfg: RLRRConfig) -> dict:
    return dict(img_size=cfg.img_size, epochs=cfg.epochs, batch_size=cfg.batch_size, warmup=cfg.warmup,
                label_smoothing=cfg.label_smoothing, augment=cfg.augment, seeds=tuple(cfg.seeds),
                select_each_seed=cfg.select_each_seed, progress=cfg.interactive)


def _run_one(cfg, vit, ti, adapt, grid, fabric, validate_single: bool = True) -> dict:
    linear_feats = ti.features is not None and adapt is _linear
    splits = ti.features if linear_feats else ti.splits
    return select_then_test(model_factory(cfg, vit, ti, adapt), splits, grid, num_classes=ti.num_classes,
                            fabric=fabric, validate_single=validate_single, **_fit_common(cfg))


def _run_or_diverge(cfg, vit, ti, adapt, grid, fabric, validate_single: bool = True, **what) -> dict:
    """:func:`_run_one` in a named job; when every grid point diverged, a result whose seeds are all lost."""
    from vitadapt.train import Diverged, job
    try:
        with job(task=ti.name, **what):
            return _run_one(cfg, vit, ti, adapt, grid, fabric, validate_single)
    except Diverged as e:
        lost = {"test_acc": float("nan"), "wall_time_s": 0.0, "steps": e.step, "trainable": None, "diverged": e.short}
        return {"diverged": e.short, "message": str(e), "selected": {}, "grid": getattr(e, "grid", []),
                "val_acc": float("nan"), "trainable": None,
                "test": [{"seed": s, **lost} for s in cfg.seeds], "wall_time_s": 0.0}


def _rows(cfg, ti, label: dict, r: dict) -> list[dict]:
    if r.get("diverged"):
        return [{"task": ti.name, "group": ti.group, **label, "seed": t["seed"], "test_acc": float("nan"),
                 "val_acc": float("nan"), "lr": float("nan"), "weight_decay": float("nan"), "trainable": None,
                 "train_time_s": 0.0, "select_time_s": 0.0, "chance": 1.0 / ti.num_classes,
                 "diverged": r["diverged"]} for t in r["test"]]
    sel = r["selected"]
    grid_time = sum(g["wall_time_s"] for g in r["grid"])
    out = []
    for t in r["test"]:
        point = sel.get(t["seed"], sel[cfg.seeds[0]])
        val = next((g["val_acc"] for g in r["grid"] if g["seed"] == (t["seed"] if cfg.select_each_seed else cfg.seeds[0])
                    and g["lr"] == point["lr"] and g["weight_decay"] == point["weight_decay"]), float("nan"))
        out.append({"task": ti.name, "group": ti.group, **label, "seed": t["seed"], "test_acc": t["test_acc"],
                    "val_acc": val, "lr": point["lr"], "weight_decay": point["weight_decay"],
                    "trainable": t["trainable"], "train_time_s": t["wall_time_s"], "select_time_s": grid_time,
                    "chance": 1.0 / ti.num_classes, **({"diverged": t["diverged"]} if t.get("diverged") else {})})
    return out


def _grid_rows(ti, label, r, base_lr: float | None = None):
    return [{"task": ti.name, **label, **g, **({"lr_mult": round(g["lr"] / base_lr, 4)} if base_lr else {})} for g in r["grid"]]


def plan(cfg: RLRRConfig, n_runs_per_task: int, shared_grid: bool = False) -> dict:
    """Training steps this configuration will take: ``n_runs_per_task`` methods or variants, each searching the
    grid (or, ``shared_grid``, one grid search per task) and retraining every seed."""
    if not cfg.n_train:
        return {"note": "n_train=0: the whole training split; steps depend on its size"}
    per_epoch = lambda n: max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1
    sel = per_epoch(cfg.n_train) * cfg.epochs
    re = per_epoch(cfg.n_train + cfg.n_val) * cfg.epochs
    n_grid = len(cfg.lr_multipliers) * len(cfg.weight_decays) * (len(cfg.seeds) if cfg.select_each_seed else 1)
    searches = 1 if shared_grid else n_runs_per_task
    steps = len(cfg.tasks) * (searches * n_grid * sel + n_runs_per_task * len(cfg.seeds) * re)
    return {"selection_steps_per_run": int(sel), "retrain_steps_per_run": int(re), "grid_points": n_grid,
            "total_steps": int(steps), "total_images": int(steps * cfg.batch_size)}


# ---------------------------------------------------------------------------------------------------------
# 30_rlrr

def run_benchmark(cfg: RLRRConfig, run=None, vit=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method on every task: one row per (task, method, seed); and the grid table (val accuracies). A
    (task, method) finished by an interrupted earlier run of the same config is taken from ``run.jobs``."""
    fabric, vit = _fabric(cfg), vit if vit is not None else _load_recorded(cfg, run)
    store = getattr(run, "jobs", None) or JobStore(None)
    rows, grid_rows = [], []
    for task in cfg.tasks:
        ti = prepare_task(cfg, task, vit, fabric)
        if run is not None:
            run.use(f"data[{task}]", ti.record)
        log(f"{task} ({ti.group}): {ti.record['counts']}, {ti.num_classes} classes, prepared in {ti.prep_time_s:.1f} s")
        for method in cfg.methods:
            r = store.run({"task": task, "method": method},
                          lambda _ckpt, method=method: _run_or_diverge(cfg, vit, ti, _adapter(cfg, method),
                                                                        cfg.grid(method), fabric, method=method))
            rows += _rows(cfg, ti, {"method": method}, r)
            grid_rows += _grid_rows(ti, {"method": method}, r, cfg.base_lr[method])
            if r.get("diverged"):
                log(f"  {r['message']}")
                continue
            log(f"  {method:10s} lr {r['selected'][cfg.seeds[0]]['lr']:.0e}  val {r['val_acc']:.3f}  "
                f"test {mean_std_text([t['test_acc'] for t in r['test']])}  "
                f"({r['trainable']:,} trainable, {r['wall_time_s']:.1f} s)")
    return pd.DataFrame(rows), pd.DataFrame(grid_rows)


def _mean_or_lost(v) -> float:
    """Mean over seeds; NaN (shown "diverged") when any seed's training diverged: a partial mean is no result."""
    return float(np.mean(v)) if len(v) else float("nan")


def _show_lost(table: pd.DataFrame, cols) -> pd.DataFrame:
    """``table`` with the NaN of ``cols`` written "diverged" (only where a run diverged; else unchanged)."""
    cols = [c for c in cols if c in table.columns and table[c].isna().any()]
    if not cols:
        return table
    out = table.astype({c: object for c in cols})
    for c in cols:
        out[c] = out[c].where(table[c].notna(), "diverged")
    return out


def summary_tables(df: pd.DataFrame, groups: dict, key: str = "method") -> dict[str, pd.DataFrame]:
    """Accuracy (%) per task and per group (mean over seeds), mean over tasks (the paper's 'mean'), its std
    over seeds and trainable parameters; and, apart (it varies from run to run), the training wall time. A task
    where a seed diverged reads "diverged", and so do the group and mean it enters."""
    per_task = df.pivot_table(index=key, columns="task", values="test_acc", aggfunc=_mean_or_lost, sort=False,
                              dropna=False) * 100
    order = [t for g in groups.values() for t in g if t in per_task.columns]
    per_task = per_task[order]
    out = pd.DataFrame(index=per_task.index)
    for g, names in groups.items():
        cols = [t for t in names if t in per_task.columns]
        if cols:
            out[g] = per_task[cols].mean(1, skipna=False)
    out["mean"] = per_task.mean(1, skipna=False)
    seed_means = df.groupby([key, "seed"], sort=False)["test_acc"].agg(_mean_or_lost).unstack() * 100
    out["mean std (seeds)"] = seed_means.std(1, ddof=1).reindex(out.index).fillna(0.0).where(out["mean"].notna())
    out["trainable"] = df.groupby(key, sort=False)["trainable"].max().reindex(out.index)
    timing = pd.DataFrame(index=out.index)
    timing["train s / run"] = df.groupby(key, sort=False)["train_time_s"].mean().reindex(out.index)
    if "select_time_s" in df:
        first = df[df["seed"] == df["seed"].iloc[0]]
        timing["grid search s / task"] = first.groupby(key, sort=False)["select_time_s"].mean().reindex(out.index)
        timing["total s"] = (df.groupby(key, sort=False)["train_time_s"].sum()
                             + first.groupby(key, sort=False)["select_time_s"].sum()).reindex(out.index)
    acc_cols = [*groups, "mean", "mean std (seeds)"]
    return {"per_task": _show_lost(per_task.round(1), order), "summary": _show_lost(out.round(1), acc_cols),
            "timing": timing.round(2)}


def paper_beside_ours(summary: pd.DataFrame, ours_label: str) -> pd.DataFrame:
    """The published VTAB-1k table next to ours, each row labelled with its source."""
    cols = ["natural", "specialized", "structured", "mean"]
    paper = PAPER_VTAB[cols].copy()
    paper.insert(0, "source", PAPER_LABEL)
    ours = summary[[c for c in cols if c in summary.columns]].copy()
    ours.insert(0, "source", ours_label)
    both = pd.concat([paper, ours])
    both.index.name = "method"
    return both.reset_index().set_index(["source", "method"]).round(1)


def _diff(s: pd.DataFrame, a: str, b: str) -> float | None:
    if not {a, b} <= set(s.index):
        return None
    d = pd.to_numeric(pd.Series([s.loc[a, "mean"], s.loc[b, "mean"]]), errors="coerce")
    return None if d.isna().any() else float(d[0] - d[1])        # None when either diverged


def benchmark_metrics(df: pd.DataFrame, tables: dict) -> dict:
    s = tables["summary"]
    return {"summary": s.reset_index().to_dict(orient="records"),
            "timing": tables["timing"].reset_index().to_dict(orient="records"),
            "per_task": tables["per_task"].reset_index().to_dict(orient="records"),
            "rlrr_minus_lora_mean": _diff(s, "rlrr", "lora"),
            "rows": df.to_dict(orient="records")}


# ---------------------------------------------------------------------------------------------------------
# 31_rlrr_ablations

def ablation_variants(cfg: RLRRConfig) -> list[tuple[str, str, dict]]:
    """(ablation group, variant label, apply_rlrr kwargs); the official setting appears in every group."""
    out = []
    if "sides_residual" in cfg.ablations:
        for res in (False, True):
            for sides in ("left", "right", "both"):
                out.append(("sides_residual", f"{sides}, {'residual' if res else 'no residual'}",
                            {**OFFICIAL, "sides": sides, "residual": res}))
    if "init" in cfg.ablations:
        for init in cfg.ablation_inits:
            out.append(("init", init, {**OFFICIAL, "init": init}))
    if "rank" in cfg.ablations:
        for r in cfg.ablation_ranks:
            out.append(("rank", f"rank {r}", {**OFFICIAL, "rank": int(r)}))
    if "layers" in cfg.ablations:
        for lv in cfg.ablation_layers:
            layers, ssf = (lv.split("+")[0], lv.endswith("+ssf"))
            out.append(("layers", lv, {**OFFICIAL, "layers": layers, "ssf": ssf}))
    return out


def variant_counts(cfg: RLRRConfig, arch: str = "vit_base_patch16_224", img_size: int = 224) -> pd.DataFrame:
    """Trainable parameters (without head) of every ablation variant on ``arch`` (meta device)."""
    rows = []
    for group, label, kw in ablation_variants(cfg):
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0)
        rows.append({"ablation": group, "variant": label, "trainable (no head)": count_trainable(build("rlrr", m, **kw))})
    return pd.DataFrame(rows).set_index(["ablation", "variant"])


def _key(kw: dict) -> tuple:
    return tuple(sorted(kw.items()))


def run_ablations(cfg: RLRRConfig, run=None, vit=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every RLRR variant on every task; identical variants (the official one) are trained once and shared."""
    fabric, vit = _fabric(cfg), vit if vit is not None else _load_recorded(cfg, run)
    store = getattr(run, "jobs", None) or JobStore(None)
    variants = ablation_variants(cfg)
    unique: dict[tuple, dict] = {}
    for _, _, kw in variants:
        unique.setdefault(_key(kw), kw)
    rows, grid_rows = [], []
    for task in cfg.tasks:
        ti = prepare_task(cfg, task, vit, fabric)
        if run is not None:
            run.use(f"data[{task}]", ti.record)
        log(f"{task} ({ti.group}): {ti.record['counts']}, {ti.num_classes} classes, prepared in {ti.prep_time_s:.1f} s")
        shared = None
        if cfg.ablation_grid == "shared":   # choose (lr, wd) once on val for the official RLRR
            r = store.run({"task": task, "variant": "official (shared grid)"},
                          lambda _ckpt: _run_or_diverge(cfg, vit, ti, _adapter(cfg, "rlrr"), cfg.grid("rlrr"), fabric,
                                                        variant="official (shared grid)"))
            grid_rows += _grid_rows(ti, {"variant": "official (shared grid)"}, r, cfg.base_lr["rlrr"])
            if r.get("diverged"):                    # the shared choice is lost, so is every variant that uses it
                results = {k: r for k in unique}
                log(f"  grid (official RLRR, on val): {r['message']}")
            else:
                shared = [r["selected"][cfg.seeds[0]]]
                results = {_key(OFFICIAL): r}
                log(f"  grid (official RLRR, on val): lr {shared[0]['lr']:.0e}, wd {shared[0]['weight_decay']:g}")
        else:
            results = {}
        for k, kw in unique.items():
            if k not in results:
                grid = shared or cfg.grid("rlrr")
                adapt = (lambda m, kw=kw: build("rlrr", m, **kw))
                results[k] = store.run({"task": task, "variant": str(kw), "grid": str(grid)},
                                       lambda _ckpt, adapt=adapt, grid=grid, kw=kw: _run_or_diverge(
                                           cfg, vit, ti, adapt, grid, fabric, validate_single=shared is None,
                                           variant=str(kw)))
                if shared is None:
                    grid_rows += _grid_rows(ti, {"variant": str(kw)}, results[k], cfg.base_lr["rlrr"])
        for group, label, kw in variants:
            r = results[_key(kw)]
            rows += _rows(cfg, ti, {"ablation": group, "variant": label, "official": _key(kw) == _key(OFFICIAL)}, r)
            trainable = f"({r['trainable']:,} trainable)" if r.get("trainable") is not None else ""
            log(f"  {group:15s} {label:22s} test {mean_std_text([t['test_acc'] for t in r['test']])}  {trainable}")
    return pd.DataFrame(rows), pd.DataFrame(grid_rows)


def ablation_table(df: pd.DataFrame, group: str) -> pd.DataFrame:
    """Accuracy (%) per variant of one ablation group: per task, mean over tasks, std over seeds, params."""
    d = df[df["ablation"] == group]
    per_task = d.pivot_table(index="variant", columns="task", values="test_acc", aggfunc=_mean_or_lost, sort=False,
                             dropna=False) * 100
    out = per_task.copy()
    out["mean"] = per_task.mean(1, skipna=False)
    seed_means = d.groupby(["variant", "seed"], sort=False)["test_acc"].agg(_mean_or_lost).unstack() * 100
    out["std (seeds)"] = seed_means.std(1, ddof=1).reindex(out.index).fillna(0.0).where(out["mean"].notna())
    out["trainable"] = d.groupby("variant", sort=False)["trainable"].max().reindex(out.index)
    return _show_lost(out.round(1), [*per_task.columns, "mean", "std (seeds)"])


def sides_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Our sides x residual means in the paper's Table 6 layout."""
    t = ablation_table(df, "sides_residual")["mean"]
    out = pd.DataFrame(index=pd.Index(["no residual", "residual"], name="ours: mean over tasks"),
                       columns=["left", "right", "both"], dtype=float)
    if any(isinstance(v, str) for v in t):              # "diverged"
        out = out.astype(object)
    for label, v in t.items():
        sides, res = label.split(", ")
        out.loc[res, sides] = v
    return out if out.dtypes.eq(object).any() else out.round(1)


# ---------------------------------------------------------------------------------------------------------
# Rows for the results notebook (90) and the interactive panel

def _int_or_none(v) -> int | None:
    return None if pd.isna(v) else int(v)          # None: every run diverged before it was counted


def result_rows(df: pd.DataFrame, groups: dict, notebook: str = "30") -> list[dict]:
    """Rows of the shared results schema (:func:`vitadapt.results.result_row`): per method (30) or variant (31),
    the mean over tasks per seed (n = seeds), and for 30 each VTAB group's mean; with the trainable parameters
    of what trained here and the mean training wall time of one run."""
    from vitadapt.results import result_row
    rows = []
    if notebook == "30":
        for method, d in df.groupby("method", sort=False):
            extra = {"trainable": _int_or_none(d["trainable"].max()), "wall_time_s": float(d["train_time_s"].mean())}
            rows.append(result_row("RLRR: VTAB-1k group mean", method, d.groupby("seed")["test_acc"].mean(), **extra))
            for g, names in groups.items():
                dg = d[d["task"].isin(names)]
                if len(dg):
                    rows.append(result_row(f"RLRR: VTAB-1k {g}", method, dg.groupby("seed")["test_acc"].mean(), **extra))
    else:
        for (group, variant), d in df.groupby(["ablation", "variant"], sort=False):
            rows.append(result_row(f"RLRR ablations: {group}", variant, d.groupby("seed")["test_acc"].mean(),
                                   trainable=_int_or_none(d["trainable"].max()), wall_time_s=float(d["train_time_s"].mean())))
    return rows


def panel_fields(cfg: RLRRConfig, ablation: bool = False) -> dict:
    """The knobs of the interactive panel: {name: (default, options or None)} (see :func:`vitadapt.widgets.ablation_panel`)."""
    fields = {"task": (cfg.tasks[0], list(cfg.tasks)), "seed": (cfg.seeds[0], list(cfg.seeds))}
    if ablation:
        fields.update(sides=("both", list(SIDES)), residual=(True, None), rank=(1, [1, 2, 4, 8, 16]),
                      init=("kaiming", list(INITS)), layers=("all", ["all", "attn", "mlp"]), ssf=(True, None),
                      lr=(float(cfg.base_lr["rlrr"]), None))
    else:
        m = "rlrr" if "rlrr" in cfg.methods else cfg.methods[0]
        fields.update(method=(m, list(cfg.methods)), lr=(float(cfg.base_lr[m]), None))
    fields.update(weight_decay=(float(cfg.weight_decays[0]), None), epochs=(float(cfg.epochs), None))
    return fields


def run_single(cfg: RLRRConfig, vit: nn.Module, cache: dict, task: str, seed: int, lr: float, weight_decay: float,
               epochs: float, method: str = "rlrr", **rlrr_kw) -> pd.DataFrame:
    """One configuration (the panel's action): train on ``train``, score **validation** only (the test split is
    kept for the selected settings of the protocol above). ``cache`` keeps the prepared tasks between calls."""
    from vitadapt.finetune import finetune_classifier
    from vitadapt.train import seed_everything
    if task not in cache:
        cache[task] = prepare_task(cfg, task, vit, _fabric(cfg))
    ti = cache[task]
    adapt = (lambda m: build("rlrr", m, **rlrr_kw)) if rlrr_kw else _adapter(cfg, method)
    seed_everything(int(seed))
    model = model_factory(cfg, vit, ti, adapt)()
    splits = ti.features if (ti.features is not None and adapt is _linear) else ti.splits
    r = finetune_classifier(model, splits.train, {"val": splits.val}, num_classes=ti.num_classes, img_size=cfg.img_size,
                            lr=float(lr), weight_decay=float(weight_decay), epochs=float(epochs),
                            batch_size=cfg.batch_size, warmup=cfg.warmup, label_smoothing=cfg.label_smoothing,
                            seed=int(seed), fabric=_fabric(cfg))
    what = ", ".join(f"{k}={v}" for k, v in rlrr_kw.items()) if rlrr_kw else method
    return pd.DataFrame([{"task": task, "configuration": what, "seed": seed, "lr": lr, "weight_decay": weight_decay,
                          "epochs": epochs, "val_acc": r["acc"]["val"], "trainable": r["trainable"],
                          "train_s": round(r["wall_time_s"], 1)}]).set_index("task")
