"""UpStep: unsupervised, parameter-efficient, source-free post-pretraining of a ViT on a target domain.

What is published (abstract; see ``REFERENCE.md`` section 2): a base model pre-trained on a source domain
is adapted to an unlabelled target domain without source data through (i) a self-supervised training
scheme, (ii) *center vector regularization* (CVR), auxiliary operations that reduce catastrophic
forgetting and skip back-propagation in 50% of the iterations, and (iii) low-rank adaptation.
Third-party summaries (hints only) add: a two-stream self-supervised clustering objective with fixed
cluster centres, a gate that skips ineffective updates, LoRA on the QKV projections, and an ensemble
of base and adapted features at evaluation. The *center vector* comes from the authors' earlier paper
(arXiv 2402.14957): the mean over the data of the L2-normalised embeddings; its norm goes to 1 when the
embeddings collapse to one point.

What is NOT published: the loss, the CVR formulas, the skip rule, the number of prototypes and every
hyper-parameter. Each of these is a named, documented argument here, marked **our choice**:

* objective: SwAV-style swapped prediction (Caron et al. 2020) between two augmented views, scored
  against *fixed* prototypes (``prototype_init="random"|"base_kmeans"``, a buffer: never trained), codes
  from lightly's Sinkhorn-Knopp (:class:`lightly.loss.SwaVLoss`);
* streams: the paper names an "online" and an "offline" stream, "identical in architecture" and both
  LoRA-adapted (a figure caption); how the offline one is updated is not public. ``offline_stream="ema"``
  (default): the offline stream is an exponential moving average of the online one (backbone with its LoRA,
  and head; ``offline_momentum``), updated after every optimizer step (:meth:`UpStepObjective.on_step`, to pass
  as ``fit``'s ``on_step``), as BYOL's online/target pair; ``"stop_grad"``: the same weights, the offline
  view run without gradient (SimSiam-style); ``"symmetric"``: both views back-propagate (plain SwAV). With
  ``"ema"``/``"stop_grad"`` the first view is online (its scores predict) and the second offline (its
  Sinkhorn codes are the targets);
* CVR: ``cvr="norm"`` (default) penalises ``||c_adapted||^2``, the centre vector's *magnitude* that the record
  ties to performance (arXiv 2402.14957 argues self-supervised learning minimises it; collapse drives it to
  1); ``"drift"`` penalises ``||c_adapted - c_base||^2`` (both centres of the same images, the base one from a
  frozen copy of the model without grad), ``"both"`` their sum, ``"none"`` nothing; centres are taken on the
  backbone features (the features that evaluation uses), not on the projection, of the adapted weights on
  both views (``"ema"``: the online view only, the offline features belong to the EMA copy);
* gate (:class:`UpStepGate`): ``"alternate"`` (backward on even steps) or ``"cv_signal"`` (skip when
  the relative change of a centre-vector log since the last update is below a running quantile).

Nothing here prints or claims a paper number: the tables of UpStep are not public.

Usage with the project's loop::

    objective = UpStepObjective(model, n_prototypes=256)
    gate = UpStepGate("alternate")
    result = fit(fabric, objective, upstep_loss_fn(objective), loader, steps=..., lr=...,
                 should_backward=gate, on_step=objective.on_step)   # on_step: the EMA offline stream
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "apply_upstep_lora", "center_vector", "RunningCenter", "spherical_kmeans", "UpStepObjective",
    "UpStepGate", "upstep_loss_fn", "build_objective", "UpStepAugment", "ensemble_features", "backbone_features",
    "HEADS", "PROTOTYPE_INITS", "CVR_MODES", "OFFLINE_STREAMS", "CENTER_ESTIMATES", "GATE_RULES", "GATE_SCORES",
    "ENSEMBLE_MODES",
]

HEADS = ("mlp", "linear", "identity")
PROTOTYPE_INITS = ("random", "base_kmeans")
CVR_MODES = ("drift", "norm", "both", "none")
OFFLINE_STREAMS = ("ema", "stop_grad", "symmetric")
CENTER_ESTIMATES = ("batch", "ema")
GATE_RULES = ("none", "alternate", "cv_signal")
GATE_SCORES = ("relative_change", "value")
ENSEMBLE_MODES = ("concat", "average")


def _choice(name: str, value: Any, choices: Sequence) -> Any:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")
    return value


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is not valid; it must be a finite number {bound}")
    return value


# ---------------------------------------------------------------------------------------------------
# LoRA on qkv
# ---------------------------------------------------------------------------------------------------

def apply_upstep_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                      target: str = "qkv") -> nn.Module:
    """Inject LoRA (:func:`vitadapt.peft.lora.inject_lora`, peft's layers) into the ``qkv`` projection of every
    block of a timm ViT, in place, and freeze everything else. Returns the same (mutated) model.

    Published: LoRA on the QKV projections. Our choices: the fused ``qkv`` Linear is adapted as one matrix
    (LoRA on [Wq; Wk; Wv]); ``alpha=None`` means ``alpha = rank`` (scale 1); no dropout. peft initialises
    ``B = 0``, so the adapted model equals the base model at init.
    """
    from vitadapt.peft.lora import inject_lora

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} is not valid; it must be an integer >= 1")
    alpha = float(rank) if alpha is None else _positive("alpha", alpha)
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model already holds LoRA parameters; pass the model before adaptation")
    blocks = getattr(model, "blocks", None)
    names = [n for n, m in model.named_modules() if n.split(".")[-1] == target and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"target={target!r}: no nn.Linear named {target!r} in the model; UpStep's LoRA needs a "
                         f"timm ViT with fused qkv projections (valid: a model whose blocks have attn.{target})")
    if blocks is not None and len(names) != len(blocks):
        raise ValueError(f"found {len(names)} Linear layers named {target!r} for {len(blocks)} blocks; expected one "
                         f"per block")
    model = inject_lora(model, names, rank, alpha, dropout)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def backbone_features(model: nn.Module, x: Tensor) -> Tensor:
    """Pooled pre-logit features [B, D] of a timm model (CLS token or average, as the model is built);
    ``model(x)`` for other modules."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        out = model(x)
    if out.ndim != 2:
        raise ValueError(f"backbone returned features of shape {tuple(out.shape)}; expected [batch, dim]")
    return out


# ---------------------------------------------------------------------------------------------------
# Center vector
# ---------------------------------------------------------------------------------------------------

def center_vector(emb: Tensor) -> Tensor:
    """Center vector (arXiv 2402.14957, published): mean over the batch of the L2-normalised embeddings.

    ``emb`` is [N, D]; returns [D]. Its norm is 1 when all embeddings point the same way (collapse) and 0
    for a balanced set of opposite embeddings. Differentiable.
    """
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"emb of shape {tuple(emb.shape)} is not valid; expected [N >= 1, D]")
    return F.normalize(emb.float(), dim=1).mean(0)


class RunningCenter(nn.Module):
    """Exponential moving average of the center vector over batches (an estimate of the data-level center
    vector that 2402.14957 defines; the EMA and its ``momentum`` are our choice).

    ``update(c)`` folds a batch center in (no grad); ``forward(c)`` returns ``momentum * running + (1 -
    momentum) * c`` with gradient through ``c`` only (``c`` itself before the first update). The state is
    a buffer, so it travels in checkpoints.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r} is not valid; it must be in [0, 1)")
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, batch_center: Tensor) -> None:
        c = batch_center.detach().to(self.center.dtype)
        if bool(self.initialized):
            self.center.mul_(self.momentum).add_(c, alpha=1 - self.momentum)
        else:
            self.center.copy_(c)
            self.initialized.fill_(True)

    def forward(self, batch_center: Tensor) -> Tensor:
        if not bool(self.initialized):
            return batch_center
        return self.momentum * self.center.detach() + (1 - self.momentum) * batch_center

    def norm(self) -> float:
        return float(self.center.norm())


# ---------------------------------------------------------------------------------------------------
# Prototypes
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """Spherical k-means (cosine Lloyd iterations) of the rows of ``x``; returns [k, D] unit centroids.

    Initialised by k-means++ seeding on the cosine distance (``generator`` makes it reproducible); an
    empty cluster keeps its previous centroid.
    """
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"spherical_kmeans needs at least k={k} rows, got x of shape {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=1)
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    chosen = [first]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        w = dist.pow(2)
        w = w if float(w.sum()) > 0 else torch.ones_like(w)   # all points already covered: any row
        nxt = int(torch.multinomial(w, 1, generator=generator))
        chosen.append(nxt)
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp_min(0))
    c = x[chosen].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        nonempty = counts > 0
        c[nonempty] = F.normalize(sums[nonempty], dim=1)
    return c


# ---------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------

def _views(batch) -> tuple[Tensor, Tensor]:
    """Two view tensors from ``(v1, v2)``, ``((v1, v2), labels)`` or ``[[v1, v2], labels]``."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        a, b = batch
        if torch.is_tensor(a) and torch.is_tensor(b) and a.ndim == 4 and a.shape == b.shape:
            return a, b
        if isinstance(a, (list, tuple)) and len(a) == 2 and all(torch.is_tensor(t) and t.ndim == 4 for t in a):
            return a[0], a[1]
    raise ValueError("UpStep batch must be (view1, view2) or ((view1, view2), labels) with [B, C, H, W] views "
                     "(use UpStepAugment as the dataset transform)")


class UpStepObjective(nn.Module):
    """Two-stream self-supervised clustering with fixed prototypes + center vector regularization.

    ``forward(batch) -> (loss, logs)``; the module to pass to ``vitadapt.train.fit`` (its trainable
    parameters are the LoRA matrices and, unless ``head="identity"``, the projection head).

    Construction: ``base`` is a frozen deep copy of ``model`` taken *before* adaptation (kept in eval
    mode, used for the base center vector and the evaluation ensemble); then LoRA is injected into
    ``model`` **in place** (:func:`apply_upstep_lora`) and it becomes ``self.model``.

    Per step (published scheme, our concrete formulas): each view goes through a stream (backbone ->
    projection head -> L2 normalisation -> scores against the fixed unit prototypes). ``offline_stream=
    "symmetric"``: both views through the adapted (online) stream, the Sinkhorn-Knopp codes of each view
    predicted from the other view's scores (lightly's ``SwaVLoss``: cross-entropy with ``temperature``).
    ``"stop_grad"`` / ``"ema"``: the first view through the online stream, the second through the offline
    stream without gradient (``"stop_grad"``: the online weights; ``"ema"``: their EMA copy, ``offline_model``
    and ``offline_head``); the online scores predict the offline view's codes (one cross-entropy). CVR adds
    ``cvr_weight * R`` with R from ``cvr``. Logs: ``loss_cluster``,
    ``loss_cvr``, ``cv_norm`` (adapted), ``cv_norm_base``, ``cv_drift`` (= ||c_a - c_b||^2 of the
    estimates), ``cv_cos`` (cosine of c_a and c_b), ``clusters_used`` (distinct arg-max prototypes).

    Args (every one our choice unless stated):
        model: a timm ViT (fused ``qkv``), before adaptation. Published: LoRA on QKV.
        lora_rank, lora_alpha: LoRA rank and alpha (``None``: alpha = rank). Our choice: 8.
        head: projection head: ``"mlp"`` (lightly ``SwaVProjectionHead``: Linear-BN-ReLU-Linear),
            ``"linear"`` or ``"identity"`` (only LoRA trains). Our choice: ``"mlp"``.
        head_hidden_dim, head_out_dim: head sizes; ``head_out_dim`` is ignored for ``"identity"``. Our
            choice: SwAV's 2048 / 128.
        n_prototypes: number of fixed cluster centres. Not published; our choice 256.
        prototype_init: ``"random"`` (seeded Gaussian directions, normalised) or ``"base_kmeans"``
            (spherical k-means of the projected base-model features of ``init_images``; needs at least
            ``n_prototypes`` images). Prototypes are a buffer and never trained (published: fixed
            centres). Our choice: ``"random"``.
        init_images: [N, C, H, W] target images for ``"base_kmeans"``.
        kmeans_iters: Lloyd iterations for ``"base_kmeans"``.
        temperature: softmax temperature of the swapped prediction. Our choice: SwAV's 0.1.
        sinkhorn_iterations, sinkhorn_epsilon: Sinkhorn-Knopp settings. Our choice: SwAV's 3 / 0.05.
        cvr: ``"norm"`` (||c_a||^2: the centre vector's magnitude, which the record ties to performance;
            arXiv 2402.14957 defines c and argues self-supervised learning minimises its norm), ``"drift"``
            (||c_a - c_b||^2, against forgetting), ``"both"`` (sum), ``"none"``. Published: *that* CVR
            exists; the formula is our choice, default ``"norm"``.
        cvr_weight: weight of the CVR term. Our choice: 1.0: ``||c_a||^2`` lies in [0, 1] (a mean of unit
            vectors), so at weight 1 the term is at most 1 against a clustering loss of about ln(n_prototypes)
            and cannot dominate it. (``cv_drift`` is far smaller, ~1e-4 after a few steps on a tiny random
            ViT: with ``"drift"`` use a weight of ~100, as the experiment configs did.)
        offline_stream: ``"ema"`` (the offline stream is an EMA copy of the online backbone, LoRA included,
            and head, updated by :meth:`on_step` after every optimizer step), ``"stop_grad"`` (the online
            weights without gradient), ``"symmetric"`` (no offline stream: both views back-propagate).
            Published: two streams, "online" and "offline", identical in architecture, both LoRA-adapted
            (a figure caption); the update of the offline one is our choice, default ``"ema"`` (the BYOL
            reading of those names).
        offline_momentum: EMA momentum of the ``"ema"`` offline stream. Our choice: 0.99.
        center_estimate: ``"batch"`` (centres of the current batch) or ``"ema"`` (a :class:`RunningCenter`
            per model, gradient through the current batch only). Our choice: ``"batch"``.
        center_momentum: EMA momentum of the running centres (also logged as ``cv_norm_ema``).
        seed: seeds the prototypes (random directions or the k-means initialisation).
    """

    def __init__(self, model: nn.Module, *, lora_rank: int = 8, lora_alpha: float | None = None,
                 head: str = "mlp", head_hidden_dim: int = 2048, head_out_dim: int = 128,
                 n_prototypes: int = 256, prototype_init: str = "random", init_images: Tensor | None = None,
                 kmeans_iters: int = 10, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 sinkhorn_epsilon: float = 0.05, cvr: str = "norm", cvr_weight: float = 1.0,
                 center_estimate: str = "batch", center_momentum: float = 0.9, offline_stream: str = "ema",
                 offline_momentum: float = 0.99, seed: int = 0):
        super().__init__()
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead

        _choice("head", head, HEADS)
        _choice("prototype_init", prototype_init, PROTOTYPE_INITS)
        _choice("cvr", cvr, CVR_MODES)
        _choice("center_estimate", center_estimate, CENTER_ESTIMATES)
        _choice("offline_stream", offline_stream, OFFLINE_STREAMS)
        numeric = isinstance(offline_momentum, (int, float)) and not isinstance(offline_momentum, bool)
        if not numeric or not 0.0 <= offline_momentum < 1.0:
            raise ValueError(f"offline_momentum={offline_momentum!r} is not valid; it must be a number in [0, 1)")
        if not isinstance(n_prototypes, int) or n_prototypes < 2:
            raise ValueError(f"n_prototypes={n_prototypes!r} is not valid; it must be an integer >= 2")
        _positive("temperature", temperature)
        _positive("sinkhorn_epsilon", sinkhorn_epsilon)
        _positive("cvr_weight", cvr_weight, allow_zero=True)
        if prototype_init == "base_kmeans" and init_images is None:
            raise ValueError("prototype_init='base_kmeans' needs init_images ([N, C, H, W] target images, "
                             f"N >= n_prototypes={n_prototypes}); or use prototype_init='random'")
        self.head_kind, self.prototype_init, self.cvr, self.cvr_weight = head, prototype_init, cvr, cvr_weight
        self.center_estimate = center_estimate
        self.offline_stream, self.offline_momentum = offline_stream, float(offline_momentum)

        base = copy.deepcopy(model)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base.eval()
        self.model = apply_upstep_lora(model, rank=lora_rank, alpha=lora_alpha)
        dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
        if not dim:
            raise ValueError("cannot tell the feature size of the model (no num_features / embed_dim attribute)")
        self.dim = dim
        if head == "mlp":
            self.head = SwaVProjectionHead(dim, head_hidden_dim, head_out_dim)
        elif head == "linear":
            self.head = nn.Linear(dim, head_out_dim)
        else:
            self.head = nn.Identity()
            head_out_dim = dim
        self.out_dim = head_out_dim
        self.loss = SwaVLoss(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                             sinkhorn_epsilon=sinkhorn_epsilon)
        gen = torch.Generator().manual_seed(seed)
        if prototype_init == "random":
            protos = F.normalize(torch.randn(n_prototypes, head_out_dim, generator=gen), dim=1)
        else:
            protos = self._kmeans_prototypes(init_images, n_prototypes, kmeans_iters, gen)
        self.register_buffer("prototypes", protos)
        self.center_adapted = RunningCenter(dim, center_momentum)
        self.center_base = RunningCenter(dim, center_momentum)
        if offline_stream == "ema":         # frozen copies: in the state dict (checkpoints, resume), never trained
            self.offline_model, self.offline_head = copy.deepcopy(self.model), copy.deepcopy(self.head)
            for p in [*self.offline_model.parameters(), *self.offline_head.parameters()]:
                p.requires_grad_(False)
        self._backward_seen = False

    @torch.no_grad()
    def _kmeans_prototypes(self, images: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] < k:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"init_images {shape} is not valid for 'base_kmeans': need a [N, C, H, W] tensor "
                             f"with N >= n_prototypes={k}")
        feats = torch.cat([backbone_features(self.base, chunk) for chunk in images.split(256)])
        # project with the initial head in train mode (as in training: BN uses batch statistics) and
        # leave the head's buffers as they were
        state = copy.deepcopy(self.head.state_dict())
        self.head.train()
        z = self.head(feats)
        self.head.load_state_dict(state)
        return spherical_kmeans(z, k, iters, gen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()          # the base model never leaves eval mode
        return self

    def _scores(self, h: Tensor) -> Tensor:
        return F.normalize(h.float(), dim=1) @ self.prototypes.T.float()

    def forward(self, batch) -> tuple[Tensor, dict]:
        from lightly.loss.swav_loss import sinkhorn

        v1, v2 = _views(batch)
        x = torch.cat([v1, v2])
        if self.offline_stream == "symmetric":
            f = backbone_features(self.model, x)
            h = self.head(f)
            f_center, x_center = f, x
        else:                               # v1 online (with gradient), v2 offline (without)
            f = backbone_features(self.model, v1)
            h = self.head(f)
            model, head = (self.model, self.head) if self.offline_stream == "stop_grad" else \
                (self.offline_model, self.offline_head)
            with torch.no_grad():
                h_off = head(f_off := backbone_features(model, v2))
            # the centre of the adapted weights: both views with stop_grad (one of them without gradient),
            # the online view only with ema (the offline features are the EMA copy's)
            f_center, x_center = (torch.cat([f, f_off]), x) if self.offline_stream == "stop_grad" else (f, v1)
        with torch.autocast(device_type=h.device.type, enabled=False):   # Sinkhorn's exp(s / eps) in fp32
            scores = self._scores(h)
            if self.offline_stream == "symmetric":
                loss_cluster = self.loss(list(scores.chunk(2)), []).reshape(())
            else:
                s_off = self._scores(h_off)
                codes = sinkhorn(s_off, self.loss.sinkhorn_iterations, self.loss.sinkhorn_epsilon,
                                 self.loss.sinkhorn_gather_distributed)
                loss_cluster = self.loss.subloss(scores, codes).reshape(())
                scores = torch.cat([scores, s_off])
        with torch.no_grad():
            fb = backbone_features(self.base, x_center)
        c_a, c_b = center_vector(f_center), center_vector(fb).detach()
        if self.center_estimate == "ema":
            c_a_est, c_b_est = self.center_adapted(c_a), self.center_base(c_b)
        else:
            c_a_est, c_b_est = c_a, c_b
        if self.training:
            self.center_adapted.update(c_a)
            self.center_base.update(c_b)
        drift = (c_a_est - c_b_est).pow(2).sum()
        norm2 = c_a_est.pow(2).sum()
        if self.cvr == "drift":
            loss_cvr = drift
        elif self.cvr == "norm":
            loss_cvr = norm2
        elif self.cvr == "both":
            loss_cvr = drift + norm2
        else:
            loss_cvr = drift.detach() * 0.0
        loss = loss_cluster + self.cvr_weight * loss_cvr
        if loss.requires_grad:              # tells on_step that this step back-propagated
            loss.register_hook(self._saw_backward)
        with torch.no_grad():
            logs = {
                "loss_cluster": loss_cluster.detach(), "loss_cvr": loss_cvr.detach(),
                "cv_norm": c_a_est.detach().norm(), "cv_norm_base": c_b_est.norm(),
                "cv_drift": drift.detach(), "cv_cos": F.cosine_similarity(c_a_est.detach(), c_b_est, dim=0),
                "cv_norm_ema": self.center_adapted.center.norm(),
                "clusters_used": torch.unique(scores.detach().argmax(1)).numel(),
            }
        return loss, logs

    def _saw_backward(self, grad: Tensor) -> None:
        self._backward_seen = True

    @torch.no_grad()
    def update_offline(self) -> None:
        """EMA step of the ``"ema"`` offline stream: every trained tensor ``o <- m * o + (1 - m) * online``
        (``m = offline_momentum``; the frozen ones are equal copies already), and the head's buffers (batch-norm
        statistics) copied from the online head. Nothing for the other streams."""
        if self.offline_stream != "ema":
            return
        from vitadapt.ssl.dinov2 import ema_update
        ema_update(((self.model, self.offline_model), (self.head, self.offline_head)), self.offline_momentum,
                   buffers=True)

    def on_step(self, step: int, module: nn.Module | None = None) -> None:
        """``on_step`` for ``vitadapt.train.fit``: after a step whose loss was back-propagated (an optimizer step),
        :meth:`update_offline`; a skipped (gated) step has no optimizer step and leaves the offline stream as is."""
        if self._backward_seen:
            self._backward_seen = False
            self.update_offline()

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: Tensor, which: str = "adapted") -> Tensor:
        """Backbone features of ``x`` from the ``"adapted"`` or the ``"base"`` model (no grad)."""
        _choice("which", which, ("adapted", "base"))
        return backbone_features(self.model if which == "adapted" else self.base, x)

    @torch.no_grad()
    def ensemble(self, x: Tensor, mode: str = "concat") -> Tensor:
        """Ensemble of base and adapted features of ``x`` (see :func:`ensemble_features`)."""
        return ensemble_features(self.features(x, "base"), self.features(x, "adapted"), mode)


def upstep_loss_fn(objective: UpStepObjective):
    """``loss_fn(module, batch) -> (loss, logs)`` for ``vitadapt.train.fit``; ``module`` is the objective
    as Fabric wrapped it (so precision and DDP apply to its forward)."""
    if not isinstance(objective, UpStepObjective):
        raise ValueError(f"objective must be an UpStepObjective, got {type(objective).__name__}")

    def loss_fn(module, batch):
        return module(batch)

    return loss_fn


def build_objective(s, backbone: nn.Module, seed: int, init_images: Tensor | None = None) -> UpStepObjective:
    """:class:`UpStepObjective` around ``backbone`` (mutated in place: LoRA is injected; a frozen copy is the base)
    from the settings ``s``: any object with the objective's fields (``lora_rank``, ``lora_alpha``: 0 = alpha is
    the rank, ``head``, ..., ``offline_momentum``), e.g. ``vitadapt.experiments.upstep.UpStepConfig``."""
    fields = ("lora_rank", "head", "head_hidden_dim", "head_out_dim", "n_prototypes", "prototype_init", "temperature",
              "cvr", "cvr_weight", "center_estimate", "offline_stream", "offline_momentum")
    return UpStepObjective(backbone, **{f: getattr(s, f) for f in fields}, lora_alpha=s.lora_alpha or None,
                           init_images=init_images, seed=seed)


# ---------------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------------

class UpStepGate:
    """``should_backward(step, logs) -> bool`` for ``vitadapt.train.fit``: which iterations back-propagate.

    Published: CVR lets UpStep skip back-propagation in 50% of the iterations, skipping ineffective
    updates. The rule is not published; ours:

    * ``"none"``: always back-propagate.
    * ``"alternate"``: back-propagate exactly on even steps (stateless, so it survives resume exactly).
    * ``"cv_signal"``: a score ``s_t`` is read from the step's logs (``signal``, default ``"cv_drift"``,
      computed in the forward pass that runs anyway). With ``score="relative_change"``,
      ``s_t = |x_t - x_ref| / max(|x_t|, |x_ref|, eps)`` where ``x_ref`` is the signal at the last
      back-propagated step: a batch on which the center-vector signal has barely moved since the last
      update is judged to carry an ineffective update. With ``score="value"``, ``s_t = x_t`` (e.g.
      ``signal="loss_cluster"`` skips low-loss batches, as Selective-Backprop does). The step is skipped
      when ``s_t`` is below the ``q``-quantile of the previous ``window`` scores, with
      ``q = clip(target_skip + correction * (target_skip - skipped_so_far), 0, 1)`` so the long-run
      fraction skipped tracks ``target_skip`` (0.5, the published fraction) whatever the signal's
      distribution; the signal decides *which* steps (a score equal to the threshold, e.g. a constant
      signal, is skipped while the fraction skipped is below the target). The first ``warmup`` steps
      always back-propagate, and never more than ``max_consecutive_skips`` in a row are skipped. On noisy
      signals the fraction lands at 0.45-0.5; a smooth monotone signal (the drift early in training) can
      settle into a fixed pattern (e.g. back-propagate every third step, 0.58 on a tiny model).
      Skipped steps save the backward pass and the optimizer step only: the decision needs the forward.

    Under DDP (``sync_distributed``) the ``"cv_signal"`` decision of rank 0 is broadcast, since the logs
    differ per rank; the other rules are the same on every rank by construction.

    Counts ``backward_passes``, ``skipped``, ``fraction_skipped``; ``decisions`` keeps (step, bool).
    Caveat: ``fit`` does not checkpoint the gate; ``state_dict()``/``load_state_dict()`` exist for
    callers that do. ``"alternate"`` needs no state to resume exactly.
    """

    def __init__(self, rule: str = "alternate", *, signal: str = "cv_drift", score: str = "relative_change",
                 target_skip: float = 0.5, window: int = 50, warmup: int = 4, max_consecutive_skips: int = 2,
                 correction: float = 1.0, eps: float = 1e-12, sync_distributed: bool = True):
        _choice("rule", rule, GATE_RULES)
        _choice("score", score, GATE_SCORES)
        if not 0.0 <= target_skip < 1.0:
            raise ValueError(f"target_skip={target_skip!r} is not valid; it must be in [0, 1)")
        if window < 2 or warmup < 0 or max_consecutive_skips < 1:
            raise ValueError(f"window={window}, warmup={warmup}, max_consecutive_skips={max_consecutive_skips}: "
                             f"need window >= 2, warmup >= 0, max_consecutive_skips >= 1")
        self.rule, self.signal, self.score = rule, signal, score
        self.target_skip, self.window, self.warmup = float(target_skip), int(window), int(warmup)
        self.max_consecutive_skips, self.correction, self.eps = int(max_consecutive_skips), correction, eps
        self.sync_distributed = bool(sync_distributed)
        self.reset()

    def reset(self) -> None:
        self.backward_passes = 0
        self.skipped = 0
        self.decisions: list[tuple[int, bool]] = []
        self._scores: deque[float] = deque(maxlen=self.window)
        self._ref: float | None = None
        self._run = 0               # consecutive skips
        self._seen = 0              # cv_signal decisions taken

    @property
    def fraction_skipped(self) -> float:
        return self.skipped / max(1, self.backward_passes + self.skipped)

    def __call__(self, step: int, logs: dict) -> bool:
        if self.rule == "none":
            do = True
        elif self.rule == "alternate":
            do = step % 2 == 0
        else:
            do = self._sync(self._cv_signal(logs))
        if do:
            self.backward_passes += 1
        else:
            self.skipped += 1
        self.decisions.append((int(step), bool(do)))
        return do

    def _sync(self, do: bool) -> bool:
        """Under DDP every rank must take the same decision (a rank that skips ``backward`` while another
        all-reduces would hang): rank 0's decision wins."""
        if self.sync_distributed:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                box = [bool(do)]
                dist.broadcast_object_list(box, src=0)
                do = bool(box[0])
        return do

    def _cv_signal(self, logs: dict) -> bool:
        if self.signal not in logs:
            raise ValueError(f"signal={self.signal!r} is not in the step's logs; valid: {sorted(logs)}")
        x = float(logs[self.signal])
        if self.score == "value":
            s = x
        elif self._ref is None:
            s = math.inf
        else:
            s = abs(x - self._ref) / max(abs(x), abs(self._ref), self.eps)
        history = list(self._scores)
        self._scores.append(s)
        self._seen += 1
        do = True
        if self._seen > self.warmup and len(history) >= 2 and self._run < self.max_consecutive_skips:
            q = self.target_skip + self.correction * (self.target_skip - self.fraction_skipped)
            q = min(1.0, max(0.0, q))
            finite = [h for h in history if math.isfinite(h)] or [0.0]
            threshold = torch.quantile(torch.tensor(finite, dtype=torch.float64), q).item()
            tie_skip = s == threshold and self.fraction_skipped < self.target_skip
            do = not (s < threshold or tie_skip)
        if do:
            self._ref = x
            self._run = 0
        else:
            self._run += 1
        return do

    def state_dict(self) -> dict:
        return {"backward_passes": self.backward_passes, "skipped": self.skipped, "decisions": list(self.decisions),
                "scores": list(self._scores), "ref": self._ref, "run": self._run, "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        self.backward_passes, self.skipped = int(state["backward_passes"]), int(state["skipped"])
        self.decisions = [tuple(d) for d in state["decisions"]]
        self._scores = deque(state["scores"], maxlen=self.window)
        self._ref, self._run, self._seen = state["ref"], int(state["run"]), int(state["seen"])

    def summary(self) -> dict:
        return {"rule": self.rule, "backward_passes": self.backward_passes, "skipped": self.skipped,
                "fraction_skipped": round(self.fraction_skipped, 4)}


# ---------------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------------

class UpStepAugment:
    """Two independently augmented views ``(v1, v2)`` of a PIL image (torchvision transforms).

    Our choice (SwAV/SimCLR-style, plus vertical flips for overhead imagery): RandomResizedCrop(``size``,
    ``scale``), horizontal flip, vertical flip with ``vflip`` (0.5 suits satellite scenes, 0 natural
    images), colour jitter (``jitter`` strength, applied with p=0.8), grayscale (p=``grayscale``),
    Gaussian blur (p=``blur``), then normalisation with ``mean``/``std`` (ImageNet by default).
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.25, 1.0), vflip: float = 0.5,
                 jitter: float = 0.4, grayscale: float = 0.2, blur: float = 0.5,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        from torchvision import transforms as T

        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale={scale!r} is not valid; need 0 < min <= max <= 1")
        for name, p in (("vflip", vflip), ("grayscale", grayscale), ("blur", blur)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p!r} is not valid; it must be a probability in [0, 1]")
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=tuple(scale)),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(vflip),
            T.RandomApply([T.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8),
            T.RandomGrayscale(grayscale),
            T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def __call__(self, img) -> tuple[Tensor, Tensor]:
        return self.transform(img), self.transform(img)


def ensemble_features(base_feats: Tensor, adapted_feats: Tensor, mode: str = "concat") -> Tensor:
    """Ensemble of base and adapted features for evaluation (published as a hint: an ensemble of the two;
    the combination is our choice). Each is L2-normalised first; ``"concat"`` gives [N, Db + Da],
    ``"average"`` their mean [N, D] (same widths needed; not re-normalised)."""
    _choice("mode", mode, ENSEMBLE_MODES)
    if base_feats.ndim != 2 or adapted_feats.ndim != 2 or base_feats.shape[0] != adapted_feats.shape[0]:
        raise ValueError(f"features of shapes {tuple(base_feats.shape)} and {tuple(adapted_feats.shape)}: "
                         f"need two [N, D] tensors with the same N")
    b, a = F.normalize(base_feats.float(), dim=1), F.normalize(adapted_feats.float(), dim=1)
    if mode == "concat":
        return torch.cat([b, a], dim=1)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"mode='average' needs equal widths, got {b.shape[1]} and {a.shape[1]}; use 'concat'")
    return (b + a) / 2
