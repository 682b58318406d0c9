"""30_rlrr and 31_rlrr_ablations: RLRR against the PEFT baselines on a VTAB-1k-style benchmark, and its ablations.

Protocol (both notebooks): for every task, the labelled images are ``n_train`` + ``n_val`` (VTAB-1k: 800 + 200)
drawn once with ``data_seed`` (as VTAB-1k's fixed lists) and a separate test set. Every method/variant goes
through :func:`vitadapt.finetune.select_then_test` (AdamW, warm-up + cosine, label smoothing, drop-path): a small
(lr, weight decay) grid on train, scored on val; the best retrained on train + val for every seed, tested once.
Seeds vary the head/adapter initialisation and the batch order. ``hparams="official"`` follows the official
VTAB-1k code instead (:mod:`~vitadapt.experiments.rlrr_recipe`): RLRR's fixed per-task lr and weight decay (nothing
selected: trained on train + val), its branch dropout and flips; the other recipe fields (normalisation, head init,
per-epoch schedule with cool-down) are set by the profile.

``adapt_blocks > 0`` (cpu profile) adapts only the last ``adapt_blocks`` blocks, the final norm and the head; the
frozen prefix runs once per image (exact: no augmentation), and the linear probe trains on its pooled features.
The paper adapts all blocks (``adapt_blocks=0``).

A method trains as ``(method, kwargs)`` of :func:`vitadapt.peft.baselines.build`: a baseline (30), or ``("rlrr",
apply_rlrr kwargs)``, a variant (31). Published numbers: :mod:`vitadapt.papers` (``rlrr_vtab``, ``rlrr_sides``).
"""

from __future__ import annotations

import copy
import time
from collections import namedtuple
from functools import partial
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from torch import nn

from vitadapt import papers
from vitadapt.papers import RLRR_OFFICIAL as OFFICIAL
from vitadapt.config import ExperimentConfig, opt
from vitadapt.data import Splits, get_dataset
from vitadapt.data.vtab import vtab_task
from vitadapt.eval import normalization
from vitadapt.experiments import rlrr_recipe as recipe
from vitadapt.finetune import (cached_prefix, seed_rows, select_then_test_in_job, select_then_test_steps,
                               train_then_validate)
from vitadapt.jobs import mean_std_text
from vitadapt.peft.baselines import BASELINES, build
from vitadapt.peft.rlrr import INITS, SIDES
from vitadapt.protocol import counts, effects, figures, report, selection, tables
from vitadapt.protocol.grid import run_jobs
from vitadapt.protocol.setup import backbone, check_dataset, check_forward, weights_or_random
from vitadapt.train import fabric_from_config
from vitadapt.vit import HeadOnly, TailViT, fresh_head

DEFAULT_GROUPS = {"natural": ["fashion_mnist"], "specialized": ["aid"],
                  "structured": ["clevr_count", "dsprites_location", "dsprites_orientation"]}
DEFAULT_BASE_LR = {"linear": 1e-2, "full": 1e-4, "bitfit": 5e-3, "lora": 2e-3, "ia3": 1e-2, "ln_tuning": 5e-3,
                   "ssf": 5e-3, "rlrr": 5e-3}
ABLATIONS = ("sides_residual", "init", "rank", "layers")
LAYER_VARIANTS = ("attn", "mlp", "all", "all+ssf")
SHARED = "official (shared grid)"       #: the variant name of 31's grid search, shared by every variant
trainable_counts, paper_count_table = recipe.trainable_counts, recipe.paper_count_table     # 30's count tables


@dataclass
class RLRRConfig(ExperimentConfig, selection.ProtocolSettings, recipe.RecipeSettings):
    tasks: tuple = opt(tuple(t for g in DEFAULT_GROUPS.values() for t in g), "Tasks (registered datasets, 'vtab1k:<task>' or 'fgvc:<task>'), each a VTAB-1k-style task.")
    groups: dict = opt(DEFAULT_GROUPS, "VTAB group -> its tasks; every task must be in one group (YAML only).", yaml_only=True)
    methods: tuple = opt(("linear", "full", "lora", "ssf", "rlrr", "ia3"),
                         "Methods (names in vitadapt.peft.baselines.BASELINES).", choices=lambda: list(BASELINES))
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
    ablations: tuple = opt(ABLATIONS, "Ablation groups to run: sides_residual, init, rank, layers.",
                           choices=lambda: ABLATIONS)
    ablation_inits: tuple = opt(INITS, "Initialisations of the init ablation.", choices=lambda: INITS)
    ablation_ranks: tuple = opt((1, 2, 4), "Ranks of the rank ablation.", min=1, max=1024)
    ablation_layers: tuple = opt(LAYER_VARIANTS, "Layer variants: attn / mlp / all (RLRR only, no SSF) and all+ssf "
                                 "(official).", choices=lambda: LAYER_VARIANTS)
    ablation_grid: Literal["shared", "per_variant"] = opt("shared", "shared: the grid is searched once per task for official RLRR and its choice is used by every variant; per_variant: each variant searches the grid.")

    def check(self):
        check_dataset("tasks", *self.tasks, exclude=("sentinel2_tiles",))      # unlabelled
        missing = [t for t in self.tasks if t not in [t for g in self.groups.values() for t in g]]
        if missing:
            raise ValueError(f"task(s) {missing} are in no group of groups={self.groups!r}; add them to one")
        nolr = [m for m in self.methods if m not in self.base_lr]
        if nolr:
            raise ValueError(f"base_lr has no entry for {nolr}; give one per method")
        if not self.lr_multipliers or not self.weight_decays:
            raise ValueError("lr_multipliers and weight_decays need at least one value each")
        self.check_recipe()
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
        return recipe.method_kwargs(method, self.lora_rank)


def load_task(cfg: RLRRConfig, task: str, probe: bool = False) -> Splits:
    """The VTAB-1k-style splits of ``task`` (``probe``: only check that the source is there, downloading nothing: a
    torchgeo set that a real run downloads passes where its server is reachable)."""
    if probe and ":" not in task:
        return get_dataset(task, size=cfg.data_size, bins=cfg.bins, download=False)
    n = (1, 1, 1) if probe else (cfg.n_train, cfg.n_val, cfg.n_test)
    return vtab_task(task, cfg.data_seed, n_train=n[0], n_val=n[1], n_test=n[2], size=cfg.data_size, bins=cfg.bins,
                     vtab1k_root=cfg.vtab1k_root, fgvc_root=cfg.fgvc_root)


#: a task's inputs for every method, grid point and seed: ``splits`` (images or cached tokens), ``features`` (probe)
TaskInputs = namedtuple("TaskInputs", "name group splits features num_classes record prep_time_s")


def prepare_task(cfg: RLRRConfig, task: str, vit: nn.Module, fabric=None) -> TaskInputs:
    """Load the task; with ``adapt_blocks`` run the frozen prefix once and cache its tokens."""
    t0, s = time.perf_counter(), load_task(cfg, task)
    inputs, features = cached_prefix(vit, s, cfg.adapt_blocks, cfg.img_size, cfg.batch_size, cfg.num_workers,
                                     fabric, norm=normalization(cfg.normalize, vit)) \
        if cfg.adapt_blocks and not cfg.augment else (s, None)
    return TaskInputs(task, cfg.group_of(task), inputs, features, len(s.classes), s.record(), time.perf_counter() - t0)


def load_vit(cfg: RLRRConfig, verbose: bool = True, weights: str | None = None, arch: str | None = None):
    """The backbone (frozen copy kept as the source of every fresh model) and its info."""
    vit, info = backbone(cfg, weights, arch=arch, num_classes=1, drop_path_rate=cfg.drop_path, verbose=verbose)
    if cfg.adapt_blocks >= len(vit.blocks):
        raise ValueError(f"adapt_blocks={cfg.adapt_blocks} must be below the backbone's {len(vit.blocks)} blocks "
                         f"(0 adapts all of them)")
    return vit.eval(), info


def dry_run_build(cfg: RLRRConfig, ablation: bool = False) -> dict:
    """In a dry run: the backbone (:func:`~vitadapt.protocol.setup.weights_or_random`); every method (``ablation``:
    RLRR variant) adapts a copy and runs a forward pass. Returns the backbone's info."""
    vit, info = weights_or_random(cfg, lambda **kw: load_vit(cfg, **kw))
    arms = [("rlrr", kw) for kw in distinct_variants(cfg)] if ablation else [(m, cfg.kwargs(m)) for m in cfg.methods]
    check_forward(vit, [partial(build, method, **kw) for method, kw in arms], cfg.img_size)
    print(f"dry run: {info['arch']} builds at {cfg.img_size} px; each of the {len(arms)} "
          f"{'RLRR variant' if ablation else 'method'}s adapts it and runs a forward pass")
    return info


def _arm(cfg: RLRRConfig, vit: nn.Module, ti: TaskInputs, method: str, kw: dict) -> dict:
    """The fine-tune kwargs of a method on a task: ``make_model()`` a fresh copy of the trainable part with a new
    head, adapted by ``build(method, model, **kw)`` (the linear probe on cached features: a bare head), ``splits``
    its inputs, and the recipe of :func:`vitadapt.finetune.finetune_classifier` (``hparams='official'``: the task's
    branch dropout and flip, :data:`~vitadapt.experiments.rlrr_recipe.RLRR_VTAB_TASKS`)."""
    on_features = method == "linear" and ti.features is not None

    def make(**_):
        m = HeadOnly(nn.Linear(vit.num_features, ti.num_classes)) if on_features else copy.deepcopy(
            TailViT(vit, len(vit.blocks) - cfg.adapt_blocks) if cfg.adapt_blocks else vit)
        return build(method, cfg.recipe_model(fresh_head(m, ti.num_classes), ti.name, len(vit.blocks)), **kw).train()
    return dict(make_model=make, splits=ti.features if on_features else ti.splits, num_classes=ti.num_classes,
                img_size=cfg.img_size, batch_size=cfg.batch_size, warmup=cfg.warmup,
                label_smoothing=cfg.label_smoothing, augment=cfg.task_augment(ti.name),
                norm=normalization(cfg.normalize, vit), lr_schedule=cfg.lr_schedule())


def _run(cfg: RLRRConfig, setup, vit, log, arms: dict[str, tuple[str, dict]], key: str,
         labels: list[tuple[dict, str]], shared: bool = False, line=None, after=None):
    """Rows (per label, task, seed) and grid rows (val accuracies) of every arm ``{name: (method, build kwargs)}`` on
    every task (sources recorded in ``setup``). An arm trains in a job named by task, ``key`` = name and grid (kept
    by the job store across an interruption), ``line(name, result)`` logged, and serves each ``(label, name)`` of
    ``labels``, ``after(label, result)`` logged. ``shared``: the grid is searched once per task for official RLRR
    and its choice used by every arm (a diverged search loses them all)."""
    run, fabric, rows, grid_rows = getattr(setup, "run", None), fabric_from_config(cfg), [], []
    use = setup.use if setup is not None else (lambda *_: None)
    if vit is None:
        vit, info = load_vit(cfg)
        use("weights", info)
    for task in cfg.tasks:
        ti = prepare_task(cfg, task, vit, fabric)
        use(f"data[{task}]", ti.record)
        log(f"{task} ({ti.group}): {ti.record['counts']}, {ti.num_classes} classes, prepared in {ti.prep_time_s:.1f} s")
        fit = lambda arm, grid, name: select_then_test_in_job(
            grid=grid, what={"task": ti.name, key: name}, fabric=fabric, epochs=cfg.epochs + cfg.cooldown_epochs,
            validate_single=not shared and cfg.hparams == "grid", seeds=cfg.seeds,
            select_each_seed=cfg.select_each_seed, progress=cfg.interactive, track_test=selection.official(cfg),
            **_arm(cfg, vit, ti, *arm))
        grids = lambda name, r, method="rlrr": [{"task": ti.name, key: name, **g, "lr_mult": round(
            g["lr"] / cfg.base_lr[method], 4)} for g in r["grid"]]
        results, grid = {}, {n: cfg.points(ti.name, method) for n, (method, _) in arms.items()}
        if shared and cfg.hparams == "grid":
            [r] = run_jobs(run, [{"task": ti.name, key: SHARED}], lambda *_: fit(("rlrr", {}), cfg.grid(), SHARED))
            grid_rows += grids(SHARED, r)
            point = None if r.get("diverged") else r["selected"][cfg.seeds[0]]
            log("  grid (official RLRR, on val): " + (
                r["message"] if point is None else f"lr {point['lr']:.0e}, wd {point['weight_decay']:g}"))
            results = {n: r for n, (_, kw) in arms.items() if point is None or kw == OFFICIAL}
            grid = {n: [point] for n in arms} if point else grid
        todo = [n for n in arms if n not in results]
        work = lambda job, _: (lambda r: {**r, "log": line(job[key], r)} if line else r)(
            fit(arms[job[key]], grid[job[key]], job[key]))
        jobs = [{"task": ti.name, key: n, "grid": str(grid[n])} for n in todo]
        for n, r in zip(todo, run_jobs(run, jobs, work, log)):
            results[n] = r
            grid_rows += [] if shared else grids(n, r, arms[n][0])
        for label, n in labels:
            rows += [{"task": ti.name, "group": ti.group, **label, **row}
                     for row in seed_rows(results[n], cfg.select_each_seed, chance=1.0 / ti.num_classes)]
            if after:
                log(after(label, results[n]))
    return selection.as_protocol(cfg, pd.DataFrame(rows)), pd.DataFrame(grid_rows)


def plan(cfg: RLRRConfig, n_runs_per_task: int, ablations: bool = False) -> dict:
    """Optimizer steps (of batch x devices x accumulation images): ``n_runs_per_task`` per task (30: ``methods``;
    31, ``ablations``: RLRR variants), with as many grid searches as :func:`_run` makes
    (:meth:`~vitadapt.experiments.rlrr_recipe.RecipeSettings.grid_searches`)."""
    if not cfg.n_train:
        return {"note": "n_train=0: the whole training split; steps depend on its size"}
    n_grid = len(cfg.lr_multipliers) * len(cfg.weight_decays) * (len(cfg.seeds) if cfg.select_each_seed else 1)
    per_step = cfg.batch_size * cfg.devices * cfg.num_nodes * cfg.accumulate_grad_batches
    return select_then_test_steps(cfg.n_train, cfg.n_val, batch_size=per_step, epochs=cfg.epochs + cfg.cooldown_epochs,
                                  grid_points=n_grid, seeds=len(cfg.seeds), runs=n_runs_per_task, tasks=len(cfg.tasks),
                                  searches=cfg.grid_searches(n_runs_per_task, ablations))


# ---- 30_rlrr ------------------------------------------------------------------------------------------------

def run_benchmark(cfg: RLRRConfig, setup=None, vit=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method on every task: one row per (task, method, seed); and the grid table (val accuracies)."""
    def line(m, r):
        return f"  {r['message']}" if r.get("diverged") else (
            f"  {m:10s} lr {r['selected'][cfg.seeds[0]]['lr']:.0e}  val {r['val_acc']:.3f}  "
            f"test {mean_std_text([t['test_acc'] for t in r['test']])}  "
            f"({r['trainable']:,} trainable, {r['wall_time_s']:.1f} s)")
    return _run(cfg, setup, vit, log, {m: (m, cfg.kwargs(m)) for m in cfg.methods}, "method",
                [({"method": m}, m) for m in cfg.methods], line=line)


def summary_tables(df: pd.DataFrame, groups: dict, key: str = "method") -> dict[str, pd.DataFrame]:
    """Accuracy (%) per task and per group (mean over seeds), mean over tasks (the paper's 'mean'), its std
    over seeds and trainable parameters; and, apart (it varies from run to run), the training wall time. A task
    where a seed diverged reads "diverged", and so do the group and mean it enters."""
    order = [t for g in groups.values() for t in g if t in set(df["task"])]
    per_task = tables.per_task(df, key)[order]
    out = tables.over_tasks(df, key, per_task, pd.DataFrame({g: per_task[[t for t in names if t in order]].mean(
        1, skipna=False) for g, names in groups.items() if set(names) & set(order)}, index=per_task.index),
        "mean std (seeds)")
    return {"per_task": tables.show_lost(per_task.round(1), order),
            "summary": tables.show_lost(out.round(1), [*groups, "mean", "mean std (seeds)"]),
            "timing": tables.timing(df, key, out.index)}


#: RLRR minus each baseline in the published VTAB-1k mean (ViT-B/16 IN-21k, 19 tasks; REFERENCE.md section 3)
PAPER_GAPS = {"ssf": "+1.4 points (VTAB-1k mean: RLRR 74.5, SSF 73.1)", "lora": "+2.2 points (RLRR 74.5, LoRA 72.3)",
              "full": "+8.9 points (RLRR 74.5, full 65.6)", "linear": "+21.6 points (RLRR 74.5, linear 52.9)"}
MEAN = "mean over tasks"


def per_seed(df: pd.DataFrame, key: str = "method") -> pd.DataFrame:
    """Rows {key, seed, eval, test_acc}: each task's test accuracy (eval = the task) and, per seed, their mean over
    tasks (eval = "mean over tasks"; NaN when a task diverged), the rows :mod:`vitadapt.protocol.effects` pairs."""
    rows = df.drop_duplicates([key, "seed", "task"])[[key, "seed", "task", "test_acc"]].rename(columns={"task": "eval"})
    mean = rows.groupby([key, "seed"], sort=False)["test_acc"].agg(tables.mean_or_lost).reset_index().assign(eval=MEAN)
    return pd.concat([mean, rows], ignore_index=True)


def findings(df: pd.DataFrame, key: str = "method", focus: str = "rlrr") -> tuple[str, pd.DataFrame]:
    """``(markdown, table)``: ``focus`` against every other ``key`` value, per task and over tasks, paired per seed,
    with the published gap where the paper has one (notebook 30: :data:`PAPER_GAPS`; 31: the residual's gain)."""
    paper = {m: {MEAN: g} for m, g in PAPER_GAPS.items()} if key == "method" else {
        v: {MEAN: "+ (FGVC: the residual gains 0.3 to 1.5 points on each side)"} for v in set(df[key]) if "no residual" in v}
    return effects.versus(per_seed(df, key), key, focus, paper=paper)


def paper_beside_ours(summary: pd.DataFrame, ours_label: str) -> pd.DataFrame:
    """The published VTAB-1k table next to ours, each row labelled with its source."""
    return report.beside(papers.rlrr_vtab(), summary, ours_label, ["natural", "specialized", "structured", "mean"],
                         "method")


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


def distinct_variants(cfg: RLRRConfig) -> list[dict]:
    """The distinct apply_rlrr settings of :func:`ablation_variants` (the official one once): what trains."""
    return list({tuple(sorted(kw.items())): kw for _, _, kw in ablation_variants(cfg)}.values())


def variant_counts(cfg: RLRRConfig, arch: str = "vit_base_patch16_224", img_size: int = 224) -> pd.DataFrame:
    """Trainable parameters (without head) of every ablation variant on ``arch`` (meta device)."""
    adapts = {(g, label): partial(build, "rlrr", **kw) for g, label, kw in ablation_variants(cfg)}
    return counts.table(arch, adapts, img_size, index=["ablation", "variant"], column="trainable (no head)")


def run_ablations(cfg: RLRRConfig, setup=None, vit=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every RLRR variant on every task; identical variants (the official one) are trained once and shared; the
    grid as ``ablation_grid`` says."""
    after = lambda label, r: (f"  {label['ablation']:15s} {label['variant']:22s} test "
                              f"{mean_std_text([t['test_acc'] for t in r['test']])}  "
                              + (f"({r['trainable']:,} trainable)" if r.get("trainable") is not None else ""))
    labels = [({"ablation": g, "variant": v, "official": kw == OFFICIAL}, str(kw))
              for g, v, kw in ablation_variants(cfg)]
    return _run(cfg, setup, vit, log, {str(kw): ("rlrr", kw) for kw in distinct_variants(cfg)}, "variant", labels,
                cfg.ablation_grid == "shared", after=after)


def ablation_table(df: pd.DataFrame, group: str) -> pd.DataFrame:
    """Accuracy (%) per variant of one ablation group: per task, mean over tasks, std over seeds, params."""
    d = df[df["ablation"] == group]
    per_task = tables.per_task(d, "variant")
    out = tables.over_tasks(d, "variant", per_task, per_task.copy())
    return tables.show_lost(out.round(1), [*per_task.columns, "mean", "std (seeds)"])


def sides_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Our sides x residual means in the paper's Table 6 layout (a column with a "diverged" cell is text)."""
    t, sides, res = ablation_table(df, "sides_residual")["mean"], ["left", "right", "both"], ["no residual", "residual"]
    out = pd.DataFrame([[t.get(f"{s}, {r}", np.nan) for s in sides] for r in res], columns=sides,
                       index=pd.Index(res, name="ours: mean over tasks"))
    return out if out.dtypes.eq(object).any() else out.round(1)


def plot_ablations(df: pd.DataFrame):
    """One panel per ablation group: the mean test accuracy over tasks per variant (error bars: std over seeds),
    the official setting red; a seed with a diverged task has no mean (no bar, named in the panel)."""
    task_mean = (df.groupby(["ablation", "variant", "official", "seed"], sort=False)["test_acc"]
                 .agg(lambda v: v.mean(skipna=False)).reset_index())
    return figures.bars(task_mean, x="variant", panels="ablation", hue="official", dodge=False, legend=False,
                        palette={True: "tab:red", False: "tab:blue"}, ylabel="mean test accuracy over tasks",
                        ylim="data", panel_width=3.6, rotation=60, own_x=True)


def result_rows(df: pd.DataFrame, ablations: bool = False) -> list[dict]:
    """Rows of the shared results schema per method (30: "RLRR: VTAB-1k group mean", then each group) or variant
    (31: "RLRR ablations: <group>"): the mean over tasks per seed (n = seeds), the trainable parameters (None: all
    diverged before the count) and the mean training wall time of one run (of the method, over all its tasks)."""
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
    """The interactive panel's knobs: {name: (default, options or None)} (:func:`vitadapt.widgets.ablation_panel`)."""
    m = "rlrr" if ablation or "rlrr" in cfg.methods else cfg.methods[0]
    options = {"sides": list(SIDES), "rank": [1, 2, 4, 8, 16], "init": list(INITS), "layers": ["all", "attn", "mlp"]}
    arm = {k: (v, options.get(k)) for k, v in OFFICIAL.items()} if ablation else {"method": (m, list(cfg.methods))}
    return {"task": (cfg.tasks[0], list(cfg.tasks)), "seed": (cfg.seeds[0], list(cfg.seeds)), **arm,
            "lr": (float(cfg.base_lr[m]), None), "weight_decay": (float(cfg.weight_decays[0]), None),
            "epochs": (float(cfg.epochs), None)}


def run_single(cfg: RLRRConfig, vit: nn.Module, cache: dict, task: str, seed: int, lr: float, weight_decay: float,
               epochs: float, method: str = "rlrr", **rlrr_kw) -> pd.DataFrame:
    """One configuration (the panel's action), scored on **validation** only
    (:func:`~vitadapt.finetune.train_then_validate`); ``cache`` keeps the prepared tasks between calls."""
    fabric, method = fabric_from_config(cfg), "rlrr" if rlrr_kw else method
    ti = cache[task] = cache.get(task) or prepare_task(cfg, task, vit, fabric)
    r = train_then_validate(seed=int(seed), lr=float(lr), weight_decay=float(weight_decay), epochs=float(epochs),
                            fabric=fabric, **_arm(cfg, vit, ti, method, rlrr_kw or cfg.kwargs(method)))
    what = ", ".join(f"{k}={v}" for k, v in rlrr_kw.items()) if rlrr_kw else method
    return pd.DataFrame([{"task": task, "configuration": what, "seed": seed, "lr": lr, "weight_decay": weight_decay,
                          "epochs": epochs, "val_acc": r["acc"]["val"], "trainable": r["trainable"],
                          "train_s": round(r["wall_time_s"], 1)}]).set_index("task")
