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

A method is trained as ``(method, kwargs)`` of :func:`vitadapt.peft.baselines.build`: a baseline of 30_rlrr, or
``("rlrr", apply_rlrr kwargs)`` for a variant of 31_rlrr_ablations. The published numbers are in
:mod:`vitadapt.papers` (``rlrr_vtab``, ``rlrr_sides``, ``RLRR_OFFICIAL``).
"""

from __future__ import annotations

import copy
import time
from collections import namedtuple
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from vitadapt import papers
from vitadapt.config import ExperimentConfig, opt
from vitadapt.data import DATASETS, Splits
from vitadapt.data.vtab import FGVC_TASKS, VTAB1K_TASKS, vtab_task
from vitadapt.finetune import (embed_tokens, materialize, pooled_features, run_blocks, seed_rows,
                               select_then_test_in_job)
from vitadapt.jobs import mean_std_text
from vitadapt.peft.baselines import BASELINES, build
from vitadapt.peft.rlrr import INITS, SIDES
from vitadapt.protocol import counts, figures, report, tables
from vitadapt.protocol.grid import frames, product, run_jobs
from vitadapt.protocol.setup import backbone, brief
from vitadapt.train import fabric_from_config
from vitadapt.vit import HeadOnly, TailViT, fresh_head

DEFAULT_GROUPS = {"natural": ["fashion_mnist"], "specialized": ["aid"],
                  "structured": ["clevr_count", "dsprites_location", "dsprites_orientation"]}
DEFAULT_BASE_LR = {"linear": 1e-2, "full": 1e-4, "bitfit": 5e-3, "lora": 2e-3, "ia3": 1e-2, "ln_tuning": 5e-3,
                   "ssf": 5e-3, "rlrr": 5e-3}
ABLATIONS = ("sides_residual", "init", "rank", "layers")
LAYER_VARIANTS = ("attn", "mlp", "all", "all+ssf")
OFFICIAL = papers.RLRR_OFFICIAL


def _valid_task(name: str) -> bool:
    kind, _, task = name.rpartition(":")
    return {"vtab1k": task in VTAB1K_TASKS, "fgvc": task in FGVC_TASKS}.get(kind, not kind and name in DATASETS and
                                                                          name not in ("vtab1k", "fgvc", "sentinel2_tiles"))


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
        missing = [t for t in self.tasks if t not in [t for g in self.groups.values() for t in g]]
        if missing:
            raise ValueError(f"task(s) {missing} are in no group of groups={self.groups!r}; add them to one")
        for name, values, valid in (("methods", self.methods, BASELINES), ("ablations", self.ablations, ABLATIONS),
                                    ("ablation_inits", self.ablation_inits, INITS),
                                    ("ablation_layers", self.ablation_layers, LAYER_VARIANTS)):
            bad = [v for v in values if v not in valid]
            if bad:
                raise ValueError(f"{name}={list(values)!r}: unknown {bad}; valid values: {', '.join(valid)}")
        nolr = [m for m in self.methods if m not in self.base_lr]
        if nolr:
            raise ValueError(f"base_lr has no entry for {nolr}; give one per method")
        if not self.lr_multipliers or not self.weight_decays:
            raise ValueError("lr_multipliers and weight_decays need at least one value each")
        if self.augment and self.adapt_blocks:
            raise ValueError("augment=True needs the images at every step, so adapt_blocks must be 0 (the frozen "
                             "prefix is cached on un-augmented images); set augment=False or adapt_blocks=0")

    def needs(self) -> dict:
        """The dry-run probes (:func:`vitadapt.protocol.setup.dry_run_reason`): one per task, nothing downloaded."""
        return {f"task {t!r}": (lambda t=t: load_task(self, t, probe=True)) for t in self.tasks}

    def grid(self, method: str = "rlrr") -> list[dict]:
        base = self.base_lr[method]
        return [{"lr": float(base * m), "weight_decay": float(wd)} for m in self.lr_multipliers for wd in self.weight_decays]

    def group_of(self, task: str) -> str:
        return next(g for g, names in self.groups.items() if task in names)

    def kwargs(self, method: str) -> dict:
        """The :func:`~vitadapt.peft.baselines.build` kwargs of a baseline (LoRA: its rank)."""
        return {"r": self.lora_rank} if method == "lora" else {}


def load_task(cfg: RLRRConfig, task: str, probe: bool = False) -> Splits:
    """The VTAB-1k-style splits of ``task`` (``probe``: only check that the source is there)."""
    return vtab_task(task, cfg.data_seed, cfg=cfg, size=cfg.data_size, **(dict(n_train=1, n_val=1, n_test=1) if probe else {}))


def trainable_counts(arch: str, methods, img_size: int = 224, arch_kwargs: dict | None = None,
                     adapt_blocks: int = 0, lora_rank: int = 8) -> pd.DataFrame:
    """Trainable parameters (no head) per method on ``arch`` (built on the meta device: no memory, no weights)."""
    kw = RLRRConfig(lora_rank=lora_rank).kwargs
    return pd.DataFrame([{"method": m, "trainable": counts.trainable(
        arch, lambda model, m=m: build(m, model, **kw(m)), img_size, arch_kwargs, adapt_blocks)[0]}
        for m in methods]).set_index("method")


def paper_count_table(methods) -> pd.DataFrame:
    """ViT-B/16 counts: ours without head, + the mean VTAB-1k head (768 C + C over the 19 tasks), the paper's."""
    head = float(np.mean([769 * c for c in VTAB1K_TASKS.values()]))
    n = trainable_counts("vit_base_patch16_224", methods, 224)["trainable"]
    return pd.DataFrame([{"method": m, "ours: no head": int(n[m]), "ours: + mean VTAB head": int(n[m] + head),
                          "ours (M)": round((n[m] + head) / 1e6, 2), "paper (M)": papers.RLRR_PARAMS_M.get(m, float("nan"))}
                         for m in methods]).set_index("method")


#: one task's inputs, prepared once and shared by every method, grid point and seed: ``splits`` as fed to the
#: models (images or cached tokens), ``features`` the pooled features of the linear probe (when tokens are cached)
TaskInputs = namedtuple("TaskInputs", "name group splits features num_classes record prep_time_s")


def prepare_task(cfg: RLRRConfig, task: str, vit: nn.Module, fabric=None) -> TaskInputs:
    """Load the task; with ``adapt_blocks`` run the frozen prefix once and cache its tokens."""
    t0, s, bs = time.perf_counter(), load_task(cfg, task), cfg.batch_size
    inputs, features = s, None
    if cfg.adapt_blocks and not cfg.augment:
        start = len(vit.blocks) - cfg.adapt_blocks
        toks = {part: run_blocks(vit.blocks[:start], embed_tokens(vit, materialize(
            getattr(s, part), cfg.img_size, bs, cfg.num_workers), bs, fabric), bs, fabric) for part in ("train", "val", "test")}
        feats = {k: pooled_features(TailViT(vit, start), v, bs, fabric) for k, v in toks.items()}
        inputs, features = (Splits(s.name, d["train"], d["val"], d["test"], s.classes, s.source, s.info) for d in (toks, feats))
    return TaskInputs(task, cfg.group_of(task), inputs, features, len(s.classes), s.record(), time.perf_counter() - t0)


def load_vit(cfg: RLRRConfig, verbose: bool = True, weights: str | None = None, arch: str | None = None):
    """The backbone (frozen copy kept as the source of every fresh model) and its info."""
    vit, info = backbone(cfg, weights, arch=arch, num_classes=1, drop_path_rate=cfg.drop_path, verbose=verbose)
    if cfg.adapt_blocks >= len(vit.blocks):
        raise ValueError(f"adapt_blocks={cfg.adapt_blocks} must be below the backbone's {len(vit.blocks)} blocks "
                         f"(0 adapts all of them)")
    return vit.eval(), info


def dry_run_build(cfg: RLRRConfig, ablation: bool = False) -> dict:
    """In a dry run: the backbone with its real weights when they can be had here, else the same architecture
    with random weights; every method (``ablation``: every distinct RLRR variant) adapts a copy and runs a forward
    pass. Returns the backbone's info."""
    from vitadapt.models import WEIGHTS, WeightsMissingError
    try:
        vit, info = load_vit(cfg)
    except WeightsMissingError as e:
        print(f"weights {cfg.weights!r} not available here ({brief(e)}); building {cfg.arch} with random weights")
        vit, info = load_vit(cfg, weights="random", arch=getattr(WEIGHTS.get(cfg.weights), "arch", None))
    arms = [("rlrr", kw) for kw in distinct_variants(cfg)] if ablation else [(m, cfg.kwargs(m)) for m in cfg.methods]
    for method, kw in arms:
        with torch.no_grad():
            out = build(method, copy.deepcopy(vit), **kw).eval()(torch.zeros(1, 3, cfg.img_size, cfg.img_size))
        assert out.shape == (1, 1), out.shape
    print(f"dry run: {info['arch']} builds at {cfg.img_size} px; each of the {len(arms)} "
          f"{'RLRR variant' if ablation else 'method'}s adapts it and runs a forward pass")
    return info


def _on_features(ti: TaskInputs, method: str) -> bool:
    return method == "linear" and ti.features is not None


def model_factory(cfg: RLRRConfig, vit: nn.Module, ti: TaskInputs, method: str, kw: dict):
    """``make_model()`` for select_then_test: a fresh copy of the trainable part with a new head, adapted by
    ``build(method, model, **kw)``; the linear probe on cached features is a bare head."""
    def make(**_):
        if _on_features(ti, method):
            m = HeadOnly(nn.Linear(vit.num_features, ti.num_classes))
        else:
            m = copy.deepcopy(TailViT(vit, len(vit.blocks) - cfg.adapt_blocks) if cfg.adapt_blocks else vit)
        return build(method, fresh_head(m, ti.num_classes), **kw).train()
    return make


def _fit(cfg, vit, ti, fabric, arm: tuple[str, dict], grid, validate_single: bool = True, **what) -> dict:
    """select_then_test of ``arm`` = (method, build kwargs) in a job named by the task and ``what``."""
    method, kw = arm
    return select_then_test_in_job(
        model_factory(cfg, vit, ti, method, kw), ti.features if _on_features(ti, method) else ti.splits, grid,
        what={"task": ti.name, **what}, num_classes=ti.num_classes, fabric=fabric, validate_single=validate_single,
        img_size=cfg.img_size, epochs=cfg.epochs, batch_size=cfg.batch_size, warmup=cfg.warmup,
        label_smoothing=cfg.label_smoothing, augment=cfg.augment, seeds=cfg.seeds,
        select_each_seed=cfg.select_each_seed, progress=cfg.interactive)


def _rows(cfg, ti, label: dict, r: dict) -> list[dict]:
    return [{"task": ti.name, "group": ti.group, **label, **row}
            for row in seed_rows(r, cfg.select_each_seed, chance=1.0 / ti.num_classes)]


def _grid_rows(ti, label, r, base_lr: float):
    return [{"task": ti.name, **label, **g, "lr_mult": round(g["lr"] / base_lr, 4)} for g in r["grid"]]


def _each_task(cfg: RLRRConfig, setup, vit, log):
    """``(fabric, backbone, prepared task)`` per task: the backbone loaded once unless given (its weights recorded
    in ``setup``, a :class:`~vitadapt.protocol.setup.Setup`, when given), each task's data recorded and logged."""
    fabric = fabric_from_config(cfg)
    if vit is None:
        vit, info = load_vit(cfg)
        if setup is not None:
            setup.use("weights", info)
    for task in cfg.tasks:
        ti = prepare_task(cfg, task, vit, fabric)
        if setup is not None:
            setup.use(f"data[{task}]", ti.record)
        log(f"{task} ({ti.group}): {ti.record['counts']}, {ti.num_classes} classes, prepared in {ti.prep_time_s:.1f} s")
        yield fabric, vit, ti


def plan(cfg: RLRRConfig, n_runs_per_task: int, shared_grid: bool = False) -> dict:
    """Training steps this configuration will take: ``n_runs_per_task`` methods or variants, each searching the
    grid (or, ``shared_grid``, one grid search per task) and retraining every seed."""
    if not cfg.n_train:
        return {"note": "n_train=0: the whole training split; steps depend on its size"}
    per_epoch = lambda n: max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1
    sel, re = per_epoch(cfg.n_train) * cfg.epochs, per_epoch(cfg.n_train + cfg.n_val) * cfg.epochs
    n_grid = len(cfg.lr_multipliers) * len(cfg.weight_decays) * (len(cfg.seeds) if cfg.select_each_seed else 1)
    steps = len(cfg.tasks) * ((1 if shared_grid else n_runs_per_task) * n_grid * sel + n_runs_per_task * len(cfg.seeds) * re)
    return {"selection_steps_per_run": int(sel), "retrain_steps_per_run": int(re), "grid_points": n_grid,
            "total_steps": int(steps), "total_images": int(steps * cfg.batch_size)}


# ---- 30_rlrr ------------------------------------------------------------------------------------------------

def run_benchmark(cfg: RLRRConfig, setup=None, vit=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method on every task: one row per (task, method, seed); and the grid table (val accuracies). A
    (task, method) finished by an interrupted earlier run of the same config is taken from the job store."""
    outs = []
    for fabric, vit, ti in _each_task(cfg, setup, vit, log):
        def work(job, _ckpt, ti=ti, fabric=fabric, vit=vit):
            m = job["method"]
            r = _fit(cfg, vit, ti, fabric, (m, cfg.kwargs(m)), cfg.grid(m), method=m)
            line = f"  {r['message']}" if r.get("diverged") else (
                f"  {m:10s} lr {r['selected'][cfg.seeds[0]]['lr']:.0e}  val {r['val_acc']:.3f}  "
                f"test {mean_std_text([t['test_acc'] for t in r['test']])}  "
                f"({r['trainable']:,} trainable, {r['wall_time_s']:.1f} s)")
            return {"rows": _rows(cfg, ti, {"method": m}, r), "grid": _grid_rows(ti, {"method": m}, r, cfg.base_lr[m]),
                    "log": line}
        outs += run_jobs(getattr(setup, "run", None), product(task=[ti.name], method=cfg.methods), work, log)
    df, grid = frames(outs, "rows", "grid")
    return df, grid


def summary_tables(df: pd.DataFrame, groups: dict, key: str = "method") -> dict[str, pd.DataFrame]:
    """Accuracy (%) per task and per group (mean over seeds), mean over tasks (the paper's 'mean'), its std
    over seeds and trainable parameters; and, apart (it varies from run to run), the training wall time. A task
    where a seed diverged reads "diverged", and so do the group and mean it enters."""
    per_task = tables.per_task(df, key)
    order = [t for g in groups.values() for t in g if t in per_task.columns]
    per_task = per_task[order]
    out = tables.over_tasks(df, key, per_task, pd.DataFrame({g: per_task[[t for t in names if t in order]].mean(
        1, skipna=False) for g, names in groups.items() if set(names) & set(order)}, index=per_task.index),
        "mean std (seeds)")
    by, first = (lambda d: d.groupby(key, sort=False)), df[df["seed"] == df["seed"].iloc[0]]
    timing = pd.DataFrame({"train s / run": by(df)["train_time_s"].mean()}).reindex(out.index)
    if "select_time_s" in df:
        timing["grid search s / task"] = by(first)["select_time_s"].mean().reindex(out.index)
        timing["total s"] = (by(df)["train_time_s"].sum() + by(first)["select_time_s"].sum()).reindex(out.index)
    return {"per_task": tables.show_lost(per_task.round(1), order),
            "summary": tables.show_lost(out.round(1), [*groups, "mean", "mean std (seeds)"]), "timing": timing.round(2)}


def paper_beside_ours(summary: pd.DataFrame, ours_label: str) -> pd.DataFrame:
    """The published VTAB-1k table next to ours, each row labelled with its source."""
    cols, paper = ["natural", "specialized", "structured", "mean"], papers.rlrr_vtab()
    both = pd.concat([paper[cols].assign(source=paper.attrs["label"]),
                      summary[[c for c in cols if c in summary.columns]].assign(source=ours_label)])
    both.index.name = "method"
    return both.reset_index().set_index(["source", "method"]).round(1)


def benchmark_metrics(df: pd.DataFrame, tabs: dict) -> dict:
    """metrics.json of 30_rlrr: the tables, every row and RLRR's lead over LoRA in the mean (None: either diverged)."""
    s, records = tabs["summary"], (lambda t: t.reset_index().to_dict(orient="records"))
    d = pd.to_numeric(s["mean"].reindex(["rlrr", "lora"]), errors="coerce")
    return {"summary": records(s), "timing": records(tabs["timing"]), "per_task": records(tabs["per_task"]),
            "rlrr_minus_lora_mean": None if d.isna().any() else float(d.iloc[0] - d.iloc[1]),
            "rows": df.to_dict(orient="records")}


def plot_benchmark(df: pd.DataFrame, summary: pd.DataFrame):
    """Test accuracy per task and method (dashed: chance) beside the mean over tasks against trainable parameters."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [3, 1.3]})
    figures.bars(df, x="task", panels=None, hue="method", chance=df.groupby("task", sort=False)["chance"].first(),
                 title=f"per task (dashed: chance), {df['seed'].nunique()} seeds", rotation=0, ax=axes[0])
    axes[0].legend(fontsize=7, ncol=3)
    figures.against_budget(axes[1], summary["trainable"], summary["mean"])
    fig.tight_layout()
    return fig


# ---- 31_rlrr_ablations --------------------------------------------------------------------------------------

def ablation_variants(cfg: RLRRConfig) -> list[tuple[str, str, dict]]:
    """(ablation group, variant label, apply_rlrr kwargs); the official setting appears in every group. The
    sides x residual labels are those of :func:`vitadapt.papers.rlrr_sides` ("left, no residual", ...)."""
    on = lambda group, items: [(group, label, {**OFFICIAL, **kw}) for label, kw in items] if group in cfg.ablations else []
    return (on("sides_residual", [(f"{s}, {'residual' if res else 'no residual'}", {"sides": s, "residual": res})
                                  for res in (False, True) for s in ("left", "right", "both")])
            + on("init", [(init, {"init": init}) for init in cfg.ablation_inits])
            + on("rank", [(f"rank {r}", {"rank": int(r)}) for r in cfg.ablation_ranks])
            + on("layers", [(lv, {"layers": lv.split("+")[0], "ssf": lv.endswith("+ssf")}) for lv in cfg.ablation_layers]))


def _key(kw: dict) -> tuple:
    return tuple(sorted(kw.items()))


def distinct_variants(cfg: RLRRConfig) -> list[dict]:
    """The distinct apply_rlrr settings of :func:`ablation_variants` (the official one once): what trains."""
    return list({_key(kw): kw for _, _, kw in ablation_variants(cfg)}.values())


def variant_counts(cfg: RLRRConfig, arch: str = "vit_base_patch16_224", img_size: int = 224) -> pd.DataFrame:
    """Trainable parameters (without head) of every ablation variant on ``arch`` (meta device)."""
    return pd.DataFrame([{"ablation": g, "variant": label, "trainable (no head)": counts.trainable(
        arch, lambda m, kw=kw: build("rlrr", m, **kw), img_size)[0]} for g, label, kw in ablation_variants(cfg)]
    ).set_index(["ablation", "variant"])


def run_ablations(cfg: RLRRConfig, setup=None, vit=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every RLRR variant on every task; identical variants (the official one) are trained once and shared. With
    ``ablation_grid="shared"`` the grid is searched once per task, for the official RLRR, and its choice used by
    every variant (a diverged search loses every variant of the task)."""
    run, shared, base_lr = getattr(setup, "run", None), cfg.ablation_grid == "shared", cfg.base_lr["rlrr"]
    rows, grid_rows = [], []
    for fabric, vit, ti in _each_task(cfg, setup, vit, log):
        fit = lambda kw, grid, name: _fit(cfg, vit, ti, fabric, ("rlrr", kw), grid, not shared, variant=name)
        results, grid = {}, cfg.grid("rlrr")
        if shared:
            name = "official (shared grid)"
            [r] = run_jobs(run, [{"task": ti.name, "variant": name}], lambda job, _: fit({}, grid, name), None)
            grid_rows += _grid_rows(ti, {"variant": name}, r, base_lr)
            if r.get("diverged"):
                results = {_key(kw): r for kw in distinct_variants(cfg)}
                log(f"  grid (official RLRR, on val): {r['message']}")
            else:
                grid, results = [r["selected"][cfg.seeds[0]]], {_key(OFFICIAL): r}
                log(f"  grid (official RLRR, on val): lr {grid[0]['lr']:.0e}, wd {grid[0]['weight_decay']:g}")
        todo = {str(kw): kw for kw in distinct_variants(cfg) if _key(kw) not in results}
        outs = run_jobs(run, [{"task": ti.name, "variant": v, "grid": str(grid)} for v in todo],
                        lambda job, _: fit(todo[job["variant"]], grid, job["variant"]), None)
        for (v, kw), r in zip(todo.items(), outs):
            results[_key(kw)] = r
            grid_rows += [] if shared else _grid_rows(ti, {"variant": v}, r, base_lr)
        for group, label, kw in ablation_variants(cfg):
            r = results[_key(kw)]
            rows += _rows(cfg, ti, {"ablation": group, "variant": label, "official": _key(kw) == _key(OFFICIAL)}, r)
            trainable = f"({r['trainable']:,} trainable)" if r.get("trainable") is not None else ""
            log(f"  {group:15s} {label:22s} test {mean_std_text([t['test_acc'] for t in r['test']])}  {trainable}")
    return pd.DataFrame(rows), pd.DataFrame(grid_rows)


def ablation_table(df: pd.DataFrame, group: str) -> pd.DataFrame:
    """Accuracy (%) per variant of one ablation group: per task, mean over tasks, std over seeds, params."""
    d = df[df["ablation"] == group]
    per_task = tables.per_task(d, "variant")
    out = tables.over_tasks(d, "variant", per_task, per_task.copy())
    return tables.show_lost(out.round(1), [*per_task.columns, "mean", "std (seeds)"])


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


def plot_ablations(df: pd.DataFrame):
    """One panel per ablation group: the mean test accuracy over tasks per variant (error bars: std over seeds),
    the official setting red; a seed with a diverged task has no mean (no bar, named in the panel)."""
    task_mean = (df.groupby(["ablation", "variant", "official", "seed"], sort=False)["test_acc"]
                 .agg(lambda v: v.mean(skipna=False)).reset_index())
    return figures.bars(task_mean, x="variant", panels="ablation", hue="official", dodge=False, legend=False,
                        palette={True: "tab:red", False: "tab:blue"}, ylabel="mean test accuracy over tasks",
                        ylim="data", panel_width=3.6, rotation=60, own_x=True)


# ---- rows for the results notebook (90) and the interactive panel ------------------------------------------

def result_rows(df: pd.DataFrame, ablations: bool = False) -> list[dict]:
    """Rows of the shared results schema: per method (30: "RLRR: VTAB-1k group mean", then each VTAB group) or
    variant (31: "RLRR ablations: <group>"), the mean over tasks per seed (n = seeds); with the trainable
    parameters of what trained here (None: every run diverged before it was counted) and the mean training wall
    time of one run (of the method, over all its tasks)."""
    cost = lambda d: {"trainable": None if pd.isna(d["trainable"].max()) else int(d["trainable"].max()),
                      "wall_time_s": float(d["train_time_s"].mean())}
    if ablations:
        return report.result_rows(df, lambda g, v: f"RLRR ablations: {g}", ["ablation", "variant"],
                                  method=lambda g, v: v, extra=cost)
    rows = []
    for m, d in df.groupby("method", sort=False):
        c = cost(d)
        rows += report.result_rows(d, "RLRR: VTAB-1k group mean", ["method"], extra=lambda _: c)
        rows += report.result_rows(d, lambda g: f"RLRR: VTAB-1k {g}", ["group"], method=lambda g: m, extra=lambda _: c)
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
    return {**fields, "weight_decay": (float(cfg.weight_decays[0]), None), "epochs": (float(cfg.epochs), None)}


def run_single(cfg: RLRRConfig, vit: nn.Module, cache: dict, task: str, seed: int, lr: float, weight_decay: float,
               epochs: float, method: str = "rlrr", **rlrr_kw) -> pd.DataFrame:
    """One configuration (the panel's action): train on ``train``, score **validation** only (the test split is
    kept for the selected settings of the protocol above). ``cache`` keeps the prepared tasks between calls."""
    from vitadapt.finetune import finetune_classifier
    from vitadapt.train import seed_everything
    fabric, method = fabric_from_config(cfg), "rlrr" if rlrr_kw else method
    ti = cache[task] = cache.get(task) or prepare_task(cfg, task, vit, fabric)
    seed_everything(int(seed))
    model = model_factory(cfg, vit, ti, method, rlrr_kw or cfg.kwargs(method))()
    splits = ti.features if _on_features(ti, method) else ti.splits
    r = finetune_classifier(model, splits.train, {"val": splits.val}, num_classes=ti.num_classes, img_size=cfg.img_size,
                            lr=float(lr), weight_decay=float(weight_decay), epochs=float(epochs),
                            batch_size=cfg.batch_size, warmup=cfg.warmup, label_smoothing=cfg.label_smoothing,
                            seed=int(seed), fabric=fabric)
    what = ", ".join(f"{k}={v}" for k, v in rlrr_kw.items()) if rlrr_kw else method
    return pd.DataFrame([{"task": task, "configuration": what, "seed": seed, "lr": lr, "weight_decay": weight_decay,
                          "epochs": epochs, "val_acc": r["acc"]["val"], "trainable": r["trainable"],
                          "train_s": round(r["wall_time_s"], 1)}]).set_index("task")
