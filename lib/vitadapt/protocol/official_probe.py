"""The official ExPLoRA evaluators beside ours: the DINOv2 linear-probe harness and the DINOv2 kNN, as ExPLoRA runs
them (samar-khanna/ExPLoRA: linprobe/linear.py, linprobe/knn.py, scripts/linprobe.sh, scripts/knn.sh).

- Linear harness (:func:`train_probe_bank`): one frozen backbone feeds a bank of linear classifiers trained at once,
  one per (last 1 or 4 blocks' CLS tokens concatenated) x (with / without the mean patch token of the last block)
  x learning rate: 2 x 2 x 7 = 28 with the official grid. Every block output goes through the final norm. SGD
  (momentum 0.9, no weight decay), each classifier its own param group with lr x batch / 256, cosine to 0 over the
  iterations, the sum of the classifiers' cross-entropies; training images get a random resized crop and a flip, so
  the backbone (eval mode, no gradient) runs on every batch. Every classifier is scored on val and on test.
  Officially the best of the 28 **on the test csv** is the reported number (the harness's "val" dataset is the test
  csv); we report it and, beside it, the classifier chosen on val, so the optimism of test selection is measured
  inside the same harness.
- kNN (:func:`official_knn`): the CLS token after the final norm, L2-normalised, weighted vote over k in
  {10, 20, 100, 200} at temperature 0.07 (:func:`vitadapt.eval.knn_predict`); officially every k is scored on the
  test csv; we report the best on test and the one chosen on val.

:func:`official_rows` turns both into rows shaped like :func:`vitadapt.protocol.probe.frozen_eval`'s. The settings
are a config mixin, :class:`OfficialProbeSettings`; where our run departs from the official value,
``papers.RECIPES["ExPLoRA"]`` (parts "linear probe (official harness)" and "kNN (official)") says why.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitadapt.config import opt
from vitadapt.eval import IMAGENET_MEAN, IMAGENET_STD, Transformed, autocast, autocast_dtype, knn_predict, loader_options

#: the official grid (samar-khanna/ExPLoRA: linprobe/linear.py get_args_parser / run_eval_linear)
OFFICIAL_LRS = (1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
OFFICIAL_BLOCKS = (1, 4)
OFFICIAL_KNN_KS = (10, 20, 100, 200)
OFFICIAL_KNN_T = 0.07
OFFICIAL_LP_ITERATIONS = 15000          # 10 "epochs" x epoch_length 1500 (scripts/linprobe.sh)

OFFICIAL_LP = "linear probe (official)"
OFFICIAL_LP_VAL = "linear probe (official harness, chosen on val)"
OFFICIAL_KNN = "kNN (official)"
OFFICIAL_KNN_VAL = "kNN (official settings, chosen on val)"


@dataclass
class OfficialProbeSettings:
    """The official evaluators' settings, as config fields (a mixin of an experiment's config)."""

    official_lp_lrs: tuple = opt(OFFICIAL_LRS, "Official linear harness: base learning rates, one classifier each per (blocks, avgpool); scaled by batch / 256 (official: 1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1).", min=1e-8, max=100.0)
    official_lp_blocks: tuple = opt(OFFICIAL_BLOCKS, "Official linear harness: numbers of last blocks whose CLS tokens are concatenated (official 1 and 4; at most the model's depth).", min=1, max=64)
    official_lp_batch_size: int = opt(256, "Official linear harness: training batch (official 256 on one GPU; capped at the training-set size).", min=1, max=65536)
    official_lp_iterations: int = opt(0, "Official linear harness: SGD iterations (official 15000 = 10 x 1500); 0 = official_lp_epochs passes over the training split.", min=0)
    official_lp_epochs: float = opt(10.0, "Official linear harness: passes over the training split when official_lp_iterations is 0.", min=0.0)
    official_lp_augment: bool = opt(True, "Official linear harness: random resized crop (scale 0.08-1) + horizontal flip on training images, features recomputed per batch (official: yes); off: eval-transform features computed once.")
    official_lp_eval_crop: float = opt(0.875, "Official linear harness: evaluation resize to img_size / crop, then a centre crop of img_size (official 224/256 = 0.875; 1.0 = resize only).", min=0.1, max=1.0)
    official_knn_ks: tuple = opt(OFFICIAL_KNN_KS, "Official kNN: k values, each scored on val and test (official 10, 20, 100, 200).", min=1, max=100000)
    official_knn_temperature: float = opt(OFFICIAL_KNN_T, "Official kNN: temperature of the weighted vote (official 0.07).", min=1e-4, max=100.0)


# ---- plain-argument pieces -----------------------------------------------------------------------------------------

def official_train_transform(img_size: int):
    """The official training transform of the linear harness: random resized crop (torchvision's default scale
    0.08-1 and ratio 3/4-4/3, bicubic) to ``img_size``, horizontal flip (p 0.5), ImageNet normalisation."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def official_eval_transform(img_size: int, crop: float = 0.875):
    """The official evaluation transform: resize the shorter side to ``int(img_size / crop)`` (bicubic), centre crop
    ``img_size``, ImageNet normalisation (official: 256 then 224, crop = 0.875)."""
    from torchvision import transforms as T
    if not 0 < crop <= 1:
        raise ValueError(f"crop={crop!r} is not valid; valid: 0 < crop <= 1")
    return T.Compose([T.Resize(int(img_size / crop), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def scaled_lr(lr: float, batch_size: int, world_size: int = 1) -> float:
    """The official linear-scaling rule of the harness: ``lr * batch_size * world_size / 256``."""
    return lr * batch_size * world_size / 256.0


def probe_grid(blocks: Sequence[int] = OFFICIAL_BLOCKS, lrs: Sequence[float] = OFFICIAL_LRS) -> list[dict]:
    """The classifiers of the harness, in the official order (blocks, then avgpool False/True, then lr):
    ``[{"blocks", "avgpool", "lr"}]`` (``lr`` the base learning rate, before :func:`scaled_lr`)."""
    if not blocks or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks):
        raise ValueError(f"blocks={tuple(blocks)!r} is not valid; valid: a non-empty tuple of integers >= 1")
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"lrs={tuple(lrs)!r} is not valid; valid: a non-empty tuple of learning rates > 0")
    return [{"blocks": n, "avgpool": pool, "lr": float(lr)} for n in blocks for pool in (False, True) for lr in lrs]


def feature_slice(blocks: int, avgpool: bool, embed_dim: int, max_blocks: int) -> slice:
    """Where a classifier's input lies in :func:`block_features`' output of ``max_blocks`` blocks: the CLS tokens of
    the last ``blocks`` blocks, then the mean patch token when ``avgpool`` (width ``blocks * D`` or ``(blocks + 1) * D``)."""
    if not 1 <= blocks <= max_blocks:
        raise ValueError(f"blocks={blocks!r} is not valid; valid: 1..{max_blocks}")
    return slice((max_blocks - blocks) * embed_dim, (max_blocks + bool(avgpool)) * embed_dim)


def block_features(model: nn.Module, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``[B, (n_blocks + 1) * D]`` float32: the CLS token of each of the last ``n_blocks`` blocks (oldest first), then
    the mean of the last block's patch tokens (register tokens excluded), every block output through the model's
    final norm (timm's ``forward_intermediates(norm=True)``; DINOv2's ``get_intermediate_layers(norm=True)``). A timm
    ViT pooled by average with ``fc_norm`` has no final norm (``norm`` is the identity there)."""
    outs = model.forward_intermediates(x, indices=n_blocks, return_prefix_tokens=True, norm=True, output_fmt="NLC",
                                       intermediates_only=True)
    return torch.cat([prefix[:, 0] for _, prefix in outs] + [outs[-1][0].mean(1)], -1).float()


class ClassifierBank(nn.Module):
    """The harness's linear classifiers, one per ``grid`` entry (:func:`probe_grid`), each reading its slice of
    :func:`block_features` (:func:`feature_slice`); weights N(0, 0.01), biases 0 (official init)."""

    def __init__(self, grid: Sequence[dict], embed_dim: int, num_classes: int):
        super().__init__()
        self.grid, self.max_blocks = list(grid), max(g["blocks"] for g in grid)
        self.slices = [feature_slice(g["blocks"], g["avgpool"], embed_dim, self.max_blocks) for g in self.grid]
        self.heads = nn.ModuleList(nn.Linear(s.stop - s.start, num_classes) for s in self.slices)
        for h in self.heads:
            nn.init.normal_(h.weight, 0.0, 0.01)
            nn.init.zeros_(h.bias)

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        return [h(feats[:, s]) for h, s in zip(self.heads, self.slices)]


def _check_backbone(model: nn.Module, n_blocks: int):
    """A timm ViT with a CLS token and at least ``n_blocks`` blocks, else ValueError."""
    if not hasattr(model, "forward_intermediates") or getattr(model, "cls_token", None) is None:
        raise ValueError(f"the official harness needs a timm ViT with a CLS token and forward_intermediates, got "
                         f"{type(model).__name__}")
    depth = len(model.blocks)
    if n_blocks > depth:
        raise ValueError(f"blocks={n_blocks} is not valid for a model of depth {depth}; valid: 1..{depth} "
                         f"(set official_lp_blocks, e.g. (1, {min(depth, 4)}))")


def _pick(rows: list[dict], key: str) -> dict:
    """The first row with the largest ``key`` (the official harness keeps the first maximum: a strict >)."""
    return max(rows, key=lambda r: r[key])     # max returns the first maximal element


@torch.no_grad()
def _split_features(model, ds: Dataset, transform, n_blocks: int, batch_size: int, device, precision: str,
                    opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_features` and labels of every item of ``ds`` under ``transform``, on ``device``."""
    feats, labels = [], []
    for x, y in DataLoader(Transformed(ds, transform), batch_size=batch_size, shuffle=False, **opts):
        with autocast(device, precision):
            feats.append(block_features(model, x.to(device), n_blocks))
        labels.append(torch.as_tensor(y).to(device))
    return torch.cat(feats), torch.cat(labels)


def train_probe_bank(model: nn.Module, train: Dataset, val: Dataset, test: Dataset, num_classes: int, *,
                     img_size: int, lrs: Sequence[float] = OFFICIAL_LRS, blocks: Sequence[int] = OFFICIAL_BLOCKS,
                     batch_size: int = 256, iterations: int = OFFICIAL_LP_ITERATIONS, augment: bool = True,
                     eval_crop: float = 0.875, seed: int = 0, device: str | torch.device = "cpu",
                     precision: str = "32-true", num_workers: int = 0, pin_memory: bool = False,
                     persistent_workers: bool = False) -> dict:
    """The official DINOv2/ExPLoRA linear harness on a frozen ``model`` (a timm ViT; eval mode, no gradient, weights
    untouched): the classifiers of :func:`probe_grid` trained at once for ``iterations`` SGD steps of ``batch_size``
    training images (capped at the training-set size; momentum 0.9, weight decay 0, lr :func:`scaled_lr` per
    classifier, cosine to 0, summed cross-entropies), on ``device`` with the backbone in ``precision``
    (:func:`vitadapt.eval.autocast`; the classifiers in fp32). With ``augment`` each training batch is cropped and
    flipped (:func:`official_train_transform`) and its features recomputed; without, features of
    :func:`official_eval_transform` are computed once. Val and test are scored with every classifier.

    Returns ``{"rows": [{blocks, avgpool, lr, scaled_lr, width, val_acc, test_acc}], "best_test": row (official),
    "best_val": row (chosen on val), "iterations", "batch_size", "wall_time_s"}``."""
    grid = probe_grid(blocks, lrs)
    n_max = max(blocks)
    _check_backbone(model, n_max)
    for name, v in (("iterations", iterations), ("batch_size", batch_size), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not valid; valid: an integer >= 1")
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise ValueError(f"empty split (train {len(train)}, val {len(val)}, test {len(test)}); every split needs items")
    autocast_dtype(device, precision)                      # a bad precision fails before any work
    eval_tf = official_eval_transform(img_size, eval_crop)
    device, t0 = torch.device(device), time.perf_counter()
    batch = min(batch_size, len(train))
    opts = loader_options(num_workers, pin_memory, persistent_workers, device)
    home, was_training = next(model.parameters()).device, model.training
    model.to(device).eval()
    try:
        torch.manual_seed(seed)
        bank = ClassifierBank(grid, model.embed_dim, num_classes).to(device)
        optim = torch.optim.SGD([{"params": h.parameters(), "lr": scaled_lr(g["lr"], batch)}
                                 for h, g in zip(bank.heads, grid)], momentum=0.9, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, iterations, eta_min=0.0)
        gen = torch.Generator().manual_seed(seed)
        if augment:
            loader = DataLoader(Transformed(train, official_train_transform(img_size)), batch_size=batch, shuffle=True,
                                drop_last=True, generator=gen, **opts)
            batches = ((x.to(device), torch.as_tensor(y).to(device)) for _ in itertools.count() for x, y in loader)
        else:
            Xtr, ytr = _split_features(model, train, eval_tf, n_max, batch, device, precision, opts)
            batches = ((Xtr[i], ytr[i]) for _ in itertools.count()
                       for i in torch.randperm(len(Xtr), generator=gen).to(device).split(batch) if len(i) == batch)
        for _ in range(iterations):
            x, y = next(batches)
            if augment:
                with torch.no_grad(), autocast(device, precision):
                    x = block_features(model, x, n_max)
            loss = sum(nn.functional.cross_entropy(logits, y) for logits in bank(x))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
        acc = {}
        with torch.no_grad():
            for part, ds in (("val", val), ("test", test)):
                X, y = _split_features(model, ds, eval_tf, n_max, batch_size, device, precision, opts)
                acc[part] = [(logits.argmax(1) == y).sum().item() / len(y) for logits in bank(X)]
    finally:
        model.to(home).train(was_training)
    rows = [{**g, "scaled_lr": scaled_lr(g["lr"], batch), "width": s.stop - s.start, "val_acc": va, "test_acc": te}
            for g, s, va, te in zip(grid, bank.slices, acc["val"], acc["test"])]
    return {"rows": rows, "best_test": _pick(rows, "test_acc"), "best_val": _pick(rows, "val_acc"),
            "iterations": iterations, "batch_size": batch, "wall_time_s": time.perf_counter() - t0}


def official_knn(Xtr, ytr, Xva, yva, Xte, yte, ks: Sequence[int] = OFFICIAL_KNN_KS, T: float = OFFICIAL_KNN_T,
                 device: str | torch.device = "cpu") -> dict:
    """The official kNN (weighted vote at temperature ``T`` on cosine similarity, :func:`vitadapt.eval.knn_predict`)
    scored on val and test for every k of ``ks`` (k is capped at the number of training rows).
    Returns ``{"rows": [{k, val_acc, test_acc}], "best_test": row (official), "best_val": row (chosen on val)}``.
    Officially the vote is a softmax over the largest k's similarities, summed over the first k; its argmax is that
    of :func:`~vitadapt.eval.knn_predict`'s exp(sim / T) votes (the softmax only rescales a query's weights)."""
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks={tuple(ks)!r} is not valid; valid: a non-empty tuple of integers >= 1")
    C = int(max(np.max(ytr), np.max(yva), np.max(yte))) + 1
    rows = [{"k": k, **{f"{part}_acc": float((knn_predict(Xtr, ytr, Xq, k, T, C, device) == np.asarray(yq)).mean())
                        for part, Xq, yq in (("val", Xva, yva), ("test", Xte, yte))}} for k in ks]
    return {"rows": rows, "best_test": _pick(rows, "test_acc"), "best_val": _pick(rows, "val_acc")}


# ---- the protocol entry point ----------------------------------------------------------------------------------------

def describe(row: dict, n: int, on: str) -> str:
    """How a harness pick reads in a result row, e.g. ``4 blocks + avgpool, lr 0.001 (best of 28 on test)``."""
    what = f"{row['blocks']} block{'s' if row['blocks'] > 1 else ''}{' + avgpool' if row['avgpool'] else ''}, lr {row['lr']:g}"
    if row["scaled_lr"] != row["lr"]:
        what += f" (x batch/256: {row['scaled_lr']:g})"
    return f"{what} (best of {n} on {on})"


def lp_iterations(iterations: int, epochs: float, batch_size: int, n_train: int) -> int:
    """SGD iterations of the harness: ``iterations`` where it is > 0, else ``epochs`` passes of full batches
    (``n_train // min(batch_size, n_train)`` per pass), at least 1."""
    if iterations:
        return int(iterations)
    return max(1, int(epochs * (n_train // max(1, min(batch_size, n_train)))))


def official_probe(cfg, model: nn.Module, splits, seed: int, device=None) -> dict:
    """:func:`train_probe_bank` with the config's :class:`OfficialProbeSettings`, image size, precision and loader
    settings, on ``device`` (None: where ``cfg.accelerator`` puts evaluation)."""
    from vitadapt.protocol.probe import _device
    iters = lp_iterations(cfg.official_lp_iterations, cfg.official_lp_epochs, cfg.official_lp_batch_size,
                          len(splits.train))
    return train_probe_bank(model, splits.train, splits.val, splits.test, len(splits.classes), img_size=cfg.img_size,
                            lrs=cfg.official_lp_lrs, blocks=cfg.official_lp_blocks,
                            batch_size=cfg.official_lp_batch_size, iterations=int(iters),
                            augment=cfg.official_lp_augment, eval_crop=cfg.official_lp_eval_crop, seed=seed,
                            device=_device(cfg, device), precision=cfg.precision, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers)


def official_rows(cfg, model: nn.Module, info: dict, splits, seed: int, device=None) -> list[dict]:
    """Rows ``{seed, eval, test_acc, val_acc, selected}`` (like :func:`vitadapt.protocol.probe.frozen_eval`'s) of the
    official evaluators: :data:`OFFICIAL_LP` (the harness's best classifier on test, as the official code reports),
    :data:`OFFICIAL_LP_VAL` (the same harness, classifier chosen on val), :data:`OFFICIAL_KNN` (best k on test) and
    :data:`OFFICIAL_KNN_VAL` (k chosen on val). kNN reads the CLS columns of the cached frozen features
    (:func:`vitadapt.protocol.probe.features`). Everything on ``device`` (None: ``cfg.accelerator``'s)."""
    from vitadapt.protocol import probe
    device = probe._device(cfg, device)
    lp = official_probe(cfg, model, splits, seed, device)
    get = probe.features(cfg, model, info, device, feature=cfg.feature if cfg.feature in ("cls", "cls+avg") else "cls")
    D = model.embed_dim
    (Xtr, ytr), (Xva, yva), (Xte, yte) = (get(getattr(splits, p)) for p in ("train", "val", "test"))
    kn = official_knn(Xtr[:, :D], ytr, Xva[:, :D], yva, Xte[:, :D], yte, cfg.official_knn_ks,
                      cfg.official_knn_temperature, device)
    n, m = len(lp["rows"]), len(kn["rows"])
    row = lambda ev, r, sel: {"seed": seed, "eval": ev, "test_acc": r["test_acc"], "val_acc": r["val_acc"], "selected": sel}
    return [row(OFFICIAL_LP, lp["best_test"], describe(lp["best_test"], n, "test")),
            row(OFFICIAL_LP_VAL, lp["best_val"], describe(lp["best_val"], n, "val")),
            row(OFFICIAL_KNN, kn["best_test"], f"k={kn['best_test']['k']} (best of {m} on test)"),
            row(OFFICIAL_KNN_VAL, kn["best_val"], f"k={kn['best_val']['k']} (best of {m} on val)")]
