"""Supervised fine-tuning of a classifier, and the validation-selected protocol around it.

:func:`finetune_classifier` trains whatever parameters of ``model`` require grad (a PEFT builder from
:mod:`vitadapt.peft.baselines` decides which) with :func:`vitadapt.train.fit` on Lightning Fabric: AdamW (weight
decay on matrices only), linear warm-up then cosine decay, cross-entropy with label smoothing on the model's head,
drop-path inside the blocks, optional light augmentation (random resized crop + horizontal flip). It then scores
each evaluation set once.

Drop-path is a property of the timm model: the caller sets it when the model is created, i.e.
``create_backbone(..., num_classes=C, drop_path_rate=0.1)``, or later with :func:`vitadapt.vit.set_drop_path`;
it is active in ``model.train()`` only.

:func:`select_then_test` is the VTAB-1k protocol without test leakage: every (lr, weight decay) of a small grid
is trained on ``train`` and scored on ``val``; the best on val (ties: the first in grid order) is retrained from
a fresh model on train + val and scored once on ``test``. Test labels play no part in the choice.

Speed, for small CPU runs (all exact, no approximation):

- Datasets of PIL images are turned into tensors once (:func:`materialize`, the evaluation transform) and
  reused by every grid point and seed, unless ``augment`` needs the images or they would not fit in memory.
- :func:`embed_tokens` / :func:`run_blocks` / :class:`vitadapt.vit.TailViT` split a timm ViT into a frozen
  prefix (patch embedding and the first blocks, run once per image, outputs cached) and a trainable tail (the
  last blocks, the final norm and the head). With no augmentation and the prefix frozen, training the tail on
  cached tokens gives exactly what training the whole model with those blocks frozen would. Callers that adapt
  only the last blocks (a departure from the papers: say so) save the prefix's forward and backward cost.
- The linear probe only trains the head: its inputs can be the cached pooled features (:func:`pooled_features`,
  :class:`vitadapt.vit.HeadOnly`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from vitadapt import distributed
from vitadapt.eval import IMAGENET_MEAN, IMAGENET_STD, Transformed, eval_transform
from vitadapt.peft.common import count_trainable
from vitadapt.train import Diverged, fit, job, make_fabric, seed_everything
from vitadapt.vit import TailViT, fresh_head, set_drop_path

__all__ = ["TensorSet", "materialize", "train_transform", "finetune_classifier", "select_then_test", "evaluate",
           "embed_tokens", "run_blocks", "pooled_features", "concat", "train_then_test", "lora_classifier", "decoded",
           "best_epoch"]

MATERIALIZE_LIMIT_BYTES = 2 * 2**30
#: what a retrain's row adds when test was tracked every epoch (:func:`_with_best`)
BEST_KEYS = ("test_acc_best_epoch", "best_step", "tracked_points")


# ---------------------------------------------------------------------------------------------------------
# Data as tensors

class TensorSet(Dataset):
    """Pre-computed inputs (images after the evaluation transform, tokens or features) with integer labels."""

    def __init__(self, x: torch.Tensor, targets: Sequence[int], kind: str = "images"):
        if len(x) != len(targets):
            raise ValueError(f"{len(x)} inputs but {len(targets)} labels")
        self.x, self.targets, self.kind = x, [int(t) for t in targets], kind
        self._y = torch.as_tensor(self.targets, dtype=torch.long)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self._y[i]


class _Augmented(Dataset):
    """Light augmentation on tensor images: random resized crop (scale 0.5-1; ``crop=False``: none) and horizontal
    flip."""

    def __init__(self, base: TensorSet, img_size: int, crop: bool = True):
        from torchvision.transforms import v2
        self.base, self.targets = base, base.targets
        self.t = v2.Compose([*([v2.RandomResizedCrop(img_size, scale=(0.5, 1.0), antialias=True)] if crop else []),
                             v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.t(x), y


def train_transform(img_size: int, norm: tuple[tuple, tuple] | None = None, crop: bool = True):
    """PIL -> tensor with light augmentation (random resized crop, scale 0.5-1, and horizontal flip; ``crop=False``:
    a square resize, as :func:`~vitadapt.eval.eval_transform`, then the flip), normalised with ``norm`` = (mean,
    std) (default ImageNet's)."""
    from torchvision import transforms as T
    mean, std = norm or (IMAGENET_MEAN, IMAGENET_STD)
    size = T.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                               antialias=True) if crop else \
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    return T.Compose([size, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def materialize(ds: Dataset, img_size: int, batch_size: int = 64, num_workers: int = 0,
                norm: tuple[tuple, tuple] | None = None) -> TensorSet:
    """Every image of ``ds`` through :func:`vitadapt.eval.eval_transform` (``norm``: its (mean, std)), stacked (a
    :class:`TensorSet`)."""
    if isinstance(ds, TensorSet):
        return ds
    loader = DataLoader(Transformed(ds, eval_transform(img_size, norm)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y))
    x = torch.cat(xs) if xs else torch.zeros(0, 3, img_size, img_size)
    return TensorSet(x, torch.cat(ys).tolist() if ys else [], "images")


def _fits_in_memory(ds: Dataset, img_size: int) -> bool:
    return len(ds) * 3 * img_size * img_size * 4 <= MATERIALIZE_LIMIT_BYTES


def concat(a: Dataset, b: Dataset) -> Dataset:
    """Two datasets as one, keeping ``targets`` (tensor sets stay tensor sets)."""
    if isinstance(a, TensorSet) and isinstance(b, TensorSet):
        return TensorSet(torch.cat([a.x, b.x]), a.targets + b.targets, a.kind)
    ds = ConcatDataset([a, b])
    ds.targets = list(a.targets) + list(b.targets)
    return ds


# ---------------------------------------------------------------------------------------------------------
# Frozen prefix of a timm ViT on cached tensors (the trainable tail: vitadapt.vit.TailViT)

_device = distributed.work_device
_shared = distributed.shares_work


@torch.no_grad()
def _map(fn: Callable, ds: TensorSet, kind: str, batch_size: int, fabric=None) -> TensorSet:
    dev = _device(fabric)
    outs = []
    for i in range(0, len(ds), batch_size):
        x = ds.x[i:i + batch_size].to(dev)
        with fabric.autocast() if fabric is not None else contextlib.nullcontext():
            outs.append(fn(x).float().cpu())
    return TensorSet(torch.cat(outs) if outs else ds.x[:0], ds.targets, kind)


def embed_tokens(vit: nn.Module, images: TensorSet, batch_size: int = 64, fabric=None) -> TensorSet:
    """Patch embedding, position embedding and ``norm_pre`` of a timm ViT (frozen, eval mode) on every image."""
    vit.eval().to(_device(fabric))

    def fn(x):
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    return _map(fn, images, "tokens", batch_size, fabric)


def run_blocks(blocks: nn.Module, tokens: TensorSet, batch_size: int = 64, fabric=None) -> TensorSet:
    """Frozen blocks (eval mode) on cached tokens."""
    blocks.eval().to(_device(fabric))
    return _map(blocks, tokens, "tokens", batch_size, fabric)


def pooled_features(tail: TailViT, tokens: TensorSet, batch_size: int = 64, fabric=None) -> TensorSet:
    """The frozen tail's pre-logits (final norm, pooling, ``fc_norm``): the inputs of a linear probe."""
    tail.eval().to(_device(fabric))
    return _map(tail.pre_logits, tokens, "features", batch_size, fabric)


def cached_prefix(vit: nn.Module, splits, tail_blocks: int, img_size: int, batch_size: int = 64,
                  num_workers: int = 0, fabric=None, norm: tuple[tuple, tuple] | None = None) -> tuple:
    """``(tokens, features)``: ``splits`` (train, val, test) as the inputs of the last ``tail_blocks`` blocks of
    ``vit`` (its frozen patch embedding and earlier blocks run once per image: exact without augmentation), and as
    the frozen ViT's pooled features (a linear probe's inputs); both :class:`~vitadapt.data.Splits`."""
    import dataclasses
    start = len(vit.blocks) - tail_blocks
    toks = {part: run_blocks(vit.blocks[:start], embed_tokens(vit, materialize(
        getattr(splits, part), img_size, batch_size, num_workers, norm), batch_size, fabric), batch_size, fabric)
        for part in ("train", "val", "test")}
    feats = {k: pooled_features(TailViT(vit, start), v, batch_size, fabric) for k, v in toks.items()}
    return tuple(dataclasses.replace(splits, **d) for d in (toks, feats))


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation

def _head_out(model: nn.Module) -> int | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if head is None or isinstance(head, nn.Identity):
        return None
    return getattr(head, "out_features", None)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 128, fabric=None, img_size: int | None = None,
             norm: tuple[tuple, tuple] | None = None) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``ds`` (a :class:`TensorSet`, or PIL images with ``img_size``,
    normalised with ``norm`` = (mean, std), default ImageNet's)."""
    if not isinstance(ds, TensorSet):
        if img_size is None:
            raise ValueError("evaluate on PIL images needs img_size=")
        ds = Transformed(ds, eval_transform(img_size, norm))
    if len(ds) == 0:
        return float("nan")
    dev = _device(fabric)
    was_training = model.training
    model.eval().to(dev)
    correct = 0
    r, w = (fabric.global_rank, fabric.world_size) if _shared(fabric) else (0, 1)     # this rank's share: r, r+w, ...
    if isinstance(ds, TensorSet):      # slices, not a DataLoader stacking one item at a time
        xs, ys = ds.x[r::w], ds._y[r::w]
        batches = ((xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(ys), batch_size))
    else:
        batches = DataLoader(Subset(ds, range(r, len(ds), w)), batch_size=batch_size, shuffle=False)
    for x, y in batches:
        with fabric.autocast() if fabric is not None else contextlib.nullcontext():
            logits = model(x.to(dev, non_blocking=True))
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(y)).sum())
    if _shared(fabric):           # each rank scored its share of the set: the sum is the whole set's
        correct = int(fabric.all_reduce(torch.tensor(correct, device=fabric.device), reduce_op="sum"))
    model.train(was_training)
    return correct / len(ds)


def _steps(n: int, batch_size: int, steps: int | None, epochs: float | None, fabric=None) -> int:
    """Optimizer steps: ``steps``, or ``epochs`` over ``n`` items counted once across the ranks (an optimizer step
    consumes batch x world size x accumulation items)."""
    if fabric is not None:
        batch_size *= fabric.world_size * int(getattr(fabric, "run_settings", {}).get("accumulate", 1))
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        return int(steps)
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    return max(1, int(round(epochs * per_epoch)))


def _warmup_steps(warmup: float, steps: int) -> int:
    if isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be >= 0 (a fraction < 1 of the steps, or a number of steps)")
    return int(round(warmup * steps)) if isinstance(warmup, float) and warmup < 1 else int(warmup)


def finetune_classifier(model: nn.Module, train_ds: Dataset, eval_sets: dict[str, Dataset], *, num_classes: int,
                        img_size: int, lr: float, weight_decay: float = 0.0, steps: int | None = None,
                        epochs: float | None = None, batch_size: int = 32, warmup: float = 0.1,
                        label_smoothing: float = 0.1, augment: bool | str = False, fabric=None, seed: int = 0,
                        grad_clip: float | None = None, eval_batch_size: int = 128, keep_model: bool = False,
                        progress: bool = False, track: dict[str, Dataset] | None = None,
                        track_every: int | None = None, norm: tuple[tuple, tuple] | None = None,
                        lr_schedule: Callable[[int, int, float], Callable[[int], float]] | None = None) -> dict:
    """Fine-tune the trainable parameters of ``model`` on ``train_ds`` and score every set in ``eval_sets``.

    ``model`` must end in a classification head with ``num_classes`` outputs (``create_backbone(...,
    num_classes=C)``, or :func:`vitadapt.vit.fresh_head`); drop-path is set when the model is created
    (``drop_path_rate=``).
    Datasets are PIL ``(image, label)`` datasets (turned into tensors with the evaluation transform, once) or
    :class:`TensorSet` (images, tokens for a :class:`~vitadapt.vit.TailViT`, or features for a
    :class:`~vitadapt.vit.HeadOnly`).

    ``steps`` or ``epochs`` (exactly one; an epoch is ``len(train) // batch_size`` steps, the last partial
    batch dropped); ``warmup``: a fraction (< 1) of the steps, or a number of steps; AdamW with decay on
    tensors of >= 2 dims only; the learning rate follows warm-up then cosine to 0. ``augment``: random resized
    crop + horizontal flip on images (not for tokens/features; also wrong for tasks whose label is a position
    or orientation). ``seed`` fixes the batch order and augmentation (the caller seeds the initialisation).

    ``augment="flip"``: the horizontal flip alone (no crop). ``norm`` = (mean, std): the normalisation of every
    image transform (default ImageNet's; :func:`vitadapt.eval.normalization`). ``lr_schedule(steps,
    steps_per_epoch, lr)`` returns :func:`vitadapt.train.fit`'s ``lr_schedule`` (step -> multiplier of ``lr``) for
    this run's step counts and peak rate (default: warm-up then cosine to 0).

    ``track`` = {name: dataset}: sets also scored during training, every ``track_every`` optimizer steps (default: one
    epoch) and at the last step, as the official recipes do to report their best test epoch
    (:func:`best_epoch`); where a tracked set is also in ``eval_sets``, its final score is the last tracked one (the
    same model, not scored twice).

    Returns ``{"acc": {name: accuracy}, "wall_time_s": training time, "eval_time_s", "steps", "history": fit's
    per-step logs (loss, lr, acc), "trainable": parameter count, "lr", "weight_decay", "tracked": {name: [(step,
    accuracy), ...]}}`` (+ ``"model"`` when ``keep_model``).
    """
    out_dim = _head_out(model)
    if out_dim is None:
        raise ValueError("the model has no classification head: create it with create_backbone(..., num_classes=C) "
                         "or call vitadapt.vit.fresh_head(model, C)")
    if out_dim != num_classes:
        raise ValueError(f"the model's head has {out_dim} outputs but num_classes={num_classes}")
    for name, ds in [("train", train_ds), *eval_sets.items()]:
        t = np.asarray(getattr(ds, "targets", []))
        if len(t) and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"labels of {name!r} lie in [{t.min()}, {t.max()}], outside 0..{num_classes - 1}")
    if augment not in (False, True, "flip"):
        raise ValueError(f"augment={augment!r} is not valid; valid values: False, True, 'flip'")
    if track_every is not None and track_every < 1:
        raise ValueError(f"track_every={track_every} must be >= 1")
    fabric = fabric or make_fabric()
    seed_everything(seed)
    if isinstance(train_ds, TensorSet):
        if augment and train_ds.kind != "images":
            raise ValueError(f"augment=True needs images; the training set holds {train_ds.kind}")
        train = _Augmented(train_ds, img_size, crop=augment != "flip") if augment else train_ds
    elif augment:
        train = Transformed(train_ds, train_transform(img_size, norm, crop=augment != "flip"))
    else:
        train = materialize(train_ds, img_size, norm=norm) if _fits_in_memory(train_ds, img_size) else \
            Transformed(train_ds, eval_transform(img_size, norm))
    n_steps = _steps(len(train), batch_size, steps, epochs, fabric)
    loader = DataLoader(train, batch_size=min(batch_size, len(train)), shuffle=True, drop_last=len(train) >= batch_size,
                        generator=torch.Generator().manual_seed(seed))

    def loss_fn(m, batch):
        x, y = batch
        logits = m(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return loss, {"acc": (logits.argmax(1) == y).float().mean()}

    per_epoch = _steps(len(train), batch_size, None, 1, fabric)       # optimizer steps of one epoch
    every = track_every or per_epoch

    def tracked(step, _module):          # the raw model: scored on every rank's share, summed (evaluate)
        if not track or ((step + 1) % every and step + 1 != n_steps):
            return None
        return {f"track_{name}": evaluate(model, ds, eval_batch_size, fabric, img_size, norm)
                for name, ds in track.items()}

    res = fit(fabric, model, loss_fn, loader, steps=n_steps, lr=lr, weight_decay=weight_decay,
              warmup=_warmup_steps(warmup, n_steps), grad_clip=grad_clip, progress=progress,
              on_step=tracked if track else None,
              lr_schedule=lr_schedule(n_steps, per_epoch, lr) if lr_schedule else None)
    curves = {name: [(int(h["step"]) + 1, float(h[f"track_{name}"])) for h in res.history if f"track_{name}" in h]
              for name in (track or {})}
    t0 = time.perf_counter()
    acc = {name: curves[name][-1][1] if curves.get(name) and curves[name][-1][0] == n_steps else
           evaluate(model, ds, eval_batch_size, fabric, img_size, norm) for name, ds in eval_sets.items()}
    out = {"acc": acc, "wall_time_s": res.wall_time_s, "eval_time_s": time.perf_counter() - t0, "steps": n_steps,
           "history": res.history, "trainable": count_trainable(model), "lr": lr, "weight_decay": weight_decay,
           "tracked": curves}
    if keep_model:
        out["model"] = model
    return out


def best_epoch(curve: Sequence[tuple[int, float]], steps_per_epoch: int | None = None) -> dict:
    """The official recipes' reported number: the best accuracy over the points of a tracked ``curve`` [(step,
    accuracy)] (ties: the first), with where it was reached (``best_step``; ``best_epoch`` counted from 1 when
    ``steps_per_epoch`` is given) and the number of points it was chosen among."""
    if not curve:
        raise ValueError("curve is empty: nothing was tracked (track= was not given, or training ran no step)")
    i = int(np.nanargmax([a for _, a in curve])) if not all(np.isnan(a) for _, a in curve) else len(curve) - 1
    step, acc = curve[i]
    return {"best_acc": float(acc), "best_step": int(step), "points": len(curve),
            **({"best_epoch": max(1, round(step / steps_per_epoch))} if steps_per_epoch else {})}


def _with_best(row: dict, r: dict) -> dict:
    """``row`` plus the best tracked test accuracy in the fine-tune result ``r`` (when test was tracked):
    :data:`BEST_KEYS`, ``test_acc_best_epoch``, ``best_step`` and the points it was chosen among."""
    curve = r.get("tracked", {}).get("test")
    if not curve:
        return row
    b = best_epoch(curve)
    return {**row, **dict(zip(BEST_KEYS, (b["best_acc"], b["best_step"], b["points"])))}


def select_then_test(make_model: Callable[..., nn.Module], splits, grid: Sequence[dict], *, num_classes: int | None = None,
                     img_size: int, steps: int | None = None, epochs: float | None = None, batch_size: int = 32,
                     warmup: float = 0.1, label_smoothing: float = 0.1, augment: bool = False, fabric=None,
                     seeds: Sequence[int] = (0,), select_each_seed: bool = False, retrain_steps: str = "scaled",
                     validate_single: bool = True, grad_clip: float | None = None, progress: bool = False,
                     track_test: bool = False, norm: tuple[tuple, tuple] | None = None,
                     lr_schedule: Callable[[int, int, float], Callable[[int], float]] | None = None) -> dict:
    """Choose (lr, weight decay) on validation, retrain on train + val, test once.

    ``make_model(**extra)`` returns a fresh model with a ``num_classes`` head; it is called after
    ``seed_everything(seed)``, so its random parts (head, adapters) follow the seed. ``extra`` are the keys of
    a grid point other than ``lr`` and ``weight_decay`` (e.g. ``drop_path_rate``). ``splits`` has ``train``,
    ``val``, ``test`` (PIL or :class:`TensorSet`) and ``classes``.

    1. For every grid point: train on ``train`` (seed ``seeds[0]``), score ``val``.
    2. Select the best val accuracy (ties: the first in grid order). Test labels are never read here. A point
       whose training diverged (:class:`vitadapt.train.Diverged`) is lost (``val_acc`` NaN, ``diverged`` in its
       row); if every point diverged, :class:`~vitadapt.train.Diverged` is raised.
    3. For every seed: a fresh model trained on train + val with the selected point, scored once on ``test``.
       With ``steps`` the retrain runs ``steps * len(train + val) / len(train)`` steps (``retrain_steps=
       "scaled"``: the same number of epochs) or ``steps`` (``"same"``); with ``epochs``, the same epochs.
    ``select_each_seed=True`` repeats step 1-2 for every seed (its own selection). ``validate_single=False``
    skips step 1 when the grid has a single point (nothing to choose; its val accuracy is then NaN). ``track_test``:
    the retrains also score ``test`` after every epoch, and each test row adds the best of those
    (``test_acc_best_epoch``, the official recipes' number: chosen on test) beside ``test_acc`` (the last epoch,
    chosen on nothing). A seed whose
    retraining diverged has ``test_acc`` NaN and a ``diverged`` note; the other seeds stand. ``norm`` and
    ``lr_schedule`` pass to :func:`finetune_classifier` (every training and scoring of the call).

    Returns ``{"grid": [rows: seed, lr, weight_decay, ..., val_acc, wall_time_s], "selected": {seed: point},
    "test": [rows: seed, test_acc, wall_time_s, steps, + the selected point], "test_acc": mean over seeds,
    "val_acc": the selected point's val accuracy (first seed), "trainable", "wall_time_s": everything}``.
    """
    if not grid:
        raise ValueError("grid is empty; give at least one {'lr': ..., 'weight_decay': ...}")
    for g in grid:
        if "lr" not in g or "weight_decay" not in g:
            raise ValueError(f"grid point {g!r} lacks 'lr' or 'weight_decay'")
    if retrain_steps not in ("scaled", "same"):
        raise ValueError(f"retrain_steps={retrain_steps!r} is not valid; valid values: 'scaled', 'same'")
    t_all = time.perf_counter()
    num_classes = num_classes or len(splits.classes)
    fabric = fabric or make_fabric()

    def prep(ds):
        if isinstance(ds, TensorSet) or not _fits_in_memory(ds, img_size):
            return ds
        return ds if augment and ds is splits.train else materialize(ds, img_size, norm=norm)

    train, val = prep(splits.train), prep(splits.val)
    common = dict(num_classes=num_classes, img_size=img_size, batch_size=batch_size, warmup=warmup,
                  label_smoothing=label_smoothing, augment=augment, fabric=fabric, grad_clip=grad_clip,
                  progress=progress, norm=norm, lr_schedule=lr_schedule)

    def build(seed, point):
        seed_everything(seed)
        return make_model(**{k: v for k, v in point.items() if k not in ("lr", "weight_decay")})

    grid_rows, selected = [], {}
    for s in (seeds if select_each_seed else seeds[:1]):
        best = None
        if len(grid) == 1 and not validate_single:
            grid_rows.append({"seed": s, **grid[0], "val_acc": float("nan"), "wall_time_s": 0.0, "steps": 0,
                              "trainable": None})
            selected[s] = dict(grid[0])
            continue
        lost = None
        for point in grid:
            try:
                with job(lr=point["lr"], weight_decay=point["weight_decay"], phase="selection"):
                    r = finetune_classifier(build(s, point), train, {"val": val}, lr=point["lr"],
                                            weight_decay=point["weight_decay"], steps=steps, epochs=epochs, seed=s,
                                            **common)
            except Diverged as e:                    # a diverged point is lost, never selected
                lost = e
                grid_rows.append({"seed": s, **point, "val_acc": float("nan"), "wall_time_s": 0.0, "steps": e.step,
                                  "trainable": None, "diverged": e.short})
                continue
            grid_rows.append({"seed": s, **point, "val_acc": r["acc"]["val"], "wall_time_s": r["wall_time_s"],
                              "steps": r["steps"], "trainable": r["trainable"]})
            if best is None or r["acc"]["val"] > best[0]:
                best = (r["acc"]["val"], dict(point))
        if best is None:
            e = Diverged(f"every one of the {len(grid)} grid points diverged; the last: {lost.what}", lost.step,
                         lost.lr, lost.base_lr, job={k: v for k, v in lost.job.items() if k not in ("lr", "weight_decay", "phase")})
            e.grid = grid_rows
            raise e
        selected[s] = best[1]
    raw = augment and not isinstance(splits.train, TensorSet)   # augmentation needs the PIL images
    trainval = concat(splits.train, splits.val) if raw else concat(train, val)
    test = prep(splits.test)
    if steps is not None and retrain_steps == "scaled":
        re_steps = max(1, int(round(steps * len(trainval) / max(1, len(train)))))
    else:
        re_steps = steps
    test_rows = []
    for s in seeds:
        point = selected[s] if select_each_seed else selected[seeds[0]]
        try:
            with job(seed=s, lr=point["lr"], weight_decay=point["weight_decay"], phase="retrain on train+val"):
                r = finetune_classifier(build(s, point), trainval, {"test": test}, lr=point["lr"],
                                        weight_decay=point["weight_decay"], steps=re_steps,
                                        epochs=epochs if steps is None else None, seed=s,
                                        track={"test": test} if track_test else None, **common)
        except Diverged as e:                        # this seed's result is lost; the others stand
            test_rows.append({"seed": s, **point, "test_acc": float("nan"), "wall_time_s": 0.0, "steps": e.step,
                              "trainable": count_trainable(build(s, point)), "diverged": e.short})
            continue
        test_rows.append(_with_best({"seed": s, **point, "test_acc": r["acc"]["test"], "wall_time_s": r["wall_time_s"],
                                     "steps": r["steps"], "trainable": r["trainable"]}, r))
    first = selected[seeds[0]]
    val_first = next(g["val_acc"] for g in grid_rows if g["seed"] == seeds[0] and
                     all(g[k] == v for k, v in first.items()))   # NaN when validation was skipped
    return {"grid": grid_rows, "selected": selected, "test": test_rows,
            "test_acc": float(np.mean([r["test_acc"] for r in test_rows])), "val_acc": val_first,   # NaN if any diverged
            "trainable": test_rows[0]["trainable"], "wall_time_s": time.perf_counter() - t_all}


def train_then_validate(make_model: Callable[..., nn.Module], splits, *, seed: int, num_classes: int, **kw) -> dict:
    """One setting tried by hand (an interactive panel): a fresh ``make_model()`` (after ``seed_everything(seed)``)
    trained on ``train`` and scored on ``val`` only, the test split being kept for :func:`select_then_test`'s
    choice. ``kw``: :func:`finetune_classifier`'s (lr, weight_decay, epochs, ...); returns its result."""
    seed_everything(seed)
    return finetune_classifier(make_model(), splits.train, {"val": splits.val}, num_classes=num_classes, seed=seed,
                               **kw)


def select_then_test_steps(n_train: int, n_val: int, *, batch_size: int, epochs: float, grid_points: int,
                           seeds: int, runs: int = 1, searches: int | None = None, tasks: int = 1) -> dict:
    """Training steps of :func:`select_then_test` with ``epochs``: on each of ``tasks``, ``runs`` calls, of which
    ``searches`` (default: all) search ``grid_points`` on train, and each retrains ``seeds`` times on train + val."""
    per_epoch = lambda n: max(1, n // batch_size)
    sel, re = per_epoch(n_train) * epochs, per_epoch(n_train + n_val) * epochs
    steps = tasks * ((runs if searches is None else searches) * grid_points * sel + runs * seeds * re)
    return {"selection_steps_per_run": int(sel), "retrain_steps_per_run": int(re), "grid_points": grid_points,
            "total_steps": int(steps), "total_images": int(steps * batch_size)}


def train_then_test(make_model: Callable[..., nn.Module], splits, grid: Sequence[dict], *, seed: int,
                    num_classes: int, track_test: bool = False, **kw) -> dict:
    """One seed of the fine-tune protocol: a single (lr, weight decay) point has nothing to select, so it trains on
    ``train`` and is scored once on ``test`` (val is never read); several go through :func:`select_then_test`.
    ``track_test``: test is also scored after every epoch and the best of those is returned beside the last
    (``test_acc_best_epoch``: the official recipes' number, chosen on test).
    Returns ``{test_acc, val_acc (None for one point), point, chosen: "fixed" | "on val", trainable, wall_time_s,
    steps}`` (+ ``test_acc_best_epoch``, ``best_step``, ``tracked_points`` with ``track_test``)."""
    from vitadapt.train import seed_everything
    if len(grid) == 1:
        seed_everything(seed)
        r = finetune_classifier(make_model(), splits.train, {"test": splits.test}, num_classes=num_classes,
                                seed=seed, track={"test": splits.test} if track_test else None, **grid[0], **kw)
        return _with_best({"test_acc": r["acc"]["test"], "val_acc": None, "point": dict(grid[0]), "chosen": "fixed",
                           "trainable": r["trainable"], "wall_time_s": r["wall_time_s"], "steps": r["steps"]}, r)
    r = select_then_test(make_model, splits, grid, num_classes=num_classes, seeds=(seed,), track_test=track_test, **kw)
    t = r["test"][0]
    return {"test_acc": t["test_acc"], "val_acc": r["val_acc"], "point": r["selected"][seed],
            "chosen": "on val", "trainable": r["trainable"], "wall_time_s": r["wall_time_s"], "steps": t["steps"],
            **{k: t[k] for k in BEST_KEYS if k in t}}


def lora_classifier(model: nn.Module, num_classes: int, rank: int, targets, drop_path: float = 0.0,
                    head: tuple | None = None, alpha: float | None = None, pool: str = "cls",
                    head_std: float = 0.02) -> nn.Module:
    """A copy of ``model`` ready for a LoRA fine-tune: with ``pool="avg"`` the head reads the mean patch token through
    a fresh, frozen ``fc_norm`` (:func:`vitadapt.vit.avg_pool_head`; MAE/ExPLoRA's fine-tune), with ``"cls"`` the
    normed CLS token; a new head (truncated normal of std ``head_std``, zero bias, or set to ``head`` = (weight, bias),
    e.g. a linear probe's fitted on the same pooled features), drop-path rising to ``drop_path``, LoRA of ``rank`` on
    ``targets`` of every block with ``alpha`` (None: ``alpha = rank``, scale 1; ExPLoRA: 1, scale 1/rank); only the
    LoRA matrices and the head train."""
    import copy

    from vitadapt.peft.lora import apply_lora
    from vitadapt.vit import avg_pool_head
    if pool not in ("cls", "avg"):
        raise ValueError(f"pool={pool!r} is not valid; valid values: 'cls', 'avg'")
    m = copy.deepcopy(model).cpu()
    if pool == "avg":
        avg_pool_head(m)
    m = fresh_head(m, num_classes, std=head_std)
    if head is not None:
        with torch.no_grad():
            m.head.weight.copy_(head[0])
            m.head.bias.copy_(head[1])
    return apply_lora(set_drop_path(m, drop_path), rank=rank, targets=targets, alpha=alpha, train_head=True)


def decoded(splits, img_size: int, train: bool = True, val: bool = True):
    """``splits`` with test (and train, val when asked) decoded once into tensors (:func:`materialize`) where they
    fit in ``MATERIALIZE_LIMIT_BYTES``; a larger split stays on disk, decoded batch by batch when it is read."""
    import dataclasses

    def dec(ds, want: bool = True):
        return materialize(ds, img_size) if want and _fits_in_memory(ds, img_size) else ds

    return dataclasses.replace(splits, train=dec(splits.train, train), val=dec(splits.val, val),
                               test=dec(splits.test), info=dict(splits.info))


def select_then_test_in_job(make_model: Callable[..., nn.Module], splits, grid: Sequence[dict], *, what: dict,
                            seeds: Sequence[int] = (0,), **kw) -> dict:
    """:func:`select_then_test` inside the named job ``job(**what)`` (a divergence names it). When every grid point
    diverged, a result of the same shape whose seeds are all lost: ``diverged`` (short) and ``message`` set,
    ``selected`` empty, NaN accuracies, no trainable count."""
    from vitadapt.train import Diverged, job
    try:
        with job(**what):
            return select_then_test(make_model, splits, grid, seeds=tuple(seeds), **kw)
    except Diverged as e:
        lost = {"test_acc": float("nan"), "wall_time_s": 0.0, "steps": e.step, "trainable": None, "diverged": e.short}
        return {"diverged": e.short, "message": str(e), "selected": {}, "grid": getattr(e, "grid", []),
                "val_acc": float("nan"), "trainable": None, "test": [{"seed": s, **lost} for s in seeds],
                "wall_time_s": 0.0}


def seed_rows(r: dict, select_each_seed: bool = False, **const) -> list[dict]:
    """One row per seed of a :func:`select_then_test` (or ``_in_job``) result: test accuracy, the selected grid point
    and its val accuracy (NaN where the grid diverged), trainable, train and grid-search time, ``const`` columns."""
    lost, sel, first = bool(r.get("diverged")), r["selected"], r["test"][0]["seed"]
    grid_time = 0.0 if lost else sum(g["wall_time_s"] for g in r["grid"])
    out = []
    for t in r["test"]:
        point = {"lr": float("nan"), "weight_decay": float("nan")} if lost else sel.get(t["seed"], sel[first])
        at = t["seed"] if select_each_seed else first
        val = next((g["val_acc"] for g in r["grid"] if g.get("seed") == at and g["lr"] == point["lr"]
                    and g["weight_decay"] == point["weight_decay"]), float("nan"))
        out.append({"seed": t["seed"], "test_acc": t["test_acc"], "val_acc": val, "lr": point["lr"],
                    "weight_decay": point["weight_decay"], "trainable": t["trainable"],
                    "train_time_s": t["wall_time_s"], "select_time_s": grid_time, **const,
                    **{k: t[k] for k in BEST_KEYS if k in t},
                    **({"diverged": t["diverged"]} if t.get("diverged") else {})})
    return out
