"""RLRR (residual-based low-rank rescaling, Dong et al., CVPR 2024, arXiv 2403.19067) and SSF.

RLRR keeps every frozen Linear ``W`` (out x in, bias ``b``) of the attention (q, k, v, out-projection)
and MLP (fc1, fc2) of a ViT and learns a rank-one element-wise rescaling of it::

    W' = W + (s_left s_right^T) ⊙ W        i.e.  W'_ij = W_ij (1 + s_left[i] s_right[j])
    b' = b + f

``s_left`` (out), ``s_right`` (in) and ``f`` (out) train: ``in + 2 out`` parameters per Linear. The "1"
(the residual term ``+ W``) keeps the pre-trained weight. An SSF scale-and-shift ``x * gamma + beta``
trains after every LayerNorm and after the patch embedding; the classification head trains too.
Everything else is frozen. Both parts merge into plain weights (:func:`merge_rlrr`), so inference
costs nothing extra.

Generalisations implemented for the paper's ablations (``Δ`` is the rescaling matrix, ``W' = W ⊙ (1 + Δ)``
with the residual, ``W' = W ⊙ Δ`` without it):

- ``sides="both"``:  ``Δ = S_left @ S_right``, ``S_left`` (out x r), ``S_right`` (r x in) (``rank=r``;
  ``r = 1`` is the paper's ``s_left s_right^T``). Trainable: ``r (in + out) + out``.
- ``sides="left"``:  ``Δ_ij = s_left[i]`` (rows rescaled; ``s_right`` fixed to ones, not a parameter).
  Trainable: ``2 out`` (``s_left`` and ``f``) — drops the ``in`` term.
- ``sides="right"``: ``Δ_ij = s_right[j]`` (columns rescaled; ``s_left`` fixed to ones).
  Trainable: ``in + out`` (``s_right`` and ``f``) — drops one ``out`` term.

timm's fused ``attn.qkv`` Linear (3 dim x dim) is treated as three stacked out-blocks q, k, v: ``s_left``
and ``f`` cover all 3 dim rows (as the three separate vectors concatenated would), and there is one
``s_right`` per block, so the fused layer holds exactly the parameters of three separate Linears,
``3 (in + 2 out_each)`` at rank one, and computes exactly what three separate RLRR Linears would.

Counting (measured in tests/test_rlrr.py): ViT-B/16 without head, ``apply_rlrr(m)`` ->
12 blocks x (q, k, v, proj: 4 x 2304 + fc1: 768 + 2 x 3072 + fc2: 3072 + 2 x 768 = 20,736) = 248,832,
plus SSF 2 x 768 after each of the 25 LayerNorms (norm1, norm2 of 12 blocks, final norm) = 38,400,
plus SSF 2 x 768 after the patch embedding = 1,536: 288,768 in all (REFERENCE.md's number; the official
code trains exactly these: every parameter named ``scale``/``shift`` plus the head).

Initialisation (``init``), the paper only names them for its ablation; the distributions below other
than "kaiming" are this package's interpretation:

- ``"kaiming"`` (official): PyTorch's ``kaiming_uniform_`` (a=0) on the factor matrices, i.e.
  ``S_left ~ U(±sqrt(6 / r))`` (so ``U(±2.449)`` at rank one) and ``S_right ~ U(±sqrt(6 / in))``;
  ``W' != W`` at step 0. ``f = 0``.
- ``"normal"``: every factor entry ``N(0, 0.02)``.
- ``"uniform"``: every factor entry ``U(±0.02 sqrt(3))`` (the same std as "normal").
- ``"constant"``: every factor entry ``r ** -0.5`` so ``Δ ≡ 1`` (``W' = 2W`` with the residual,
  ``W' = W`` without it).
- ``"zero"``: ``Δ = 0`` at step 0 but still trainable (as LoRA's B = 0): ``S_left = 0``, ``S_right``
  Kaiming (for one-sided variants the single factor is 0); SSF starts as the identity (gamma = 1,
  beta = 0). With ``residual=True`` the adapted model then equals the source exactly.

SSF (Lian et al., NeurIPS 2022) official init: ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)``.

Where SSF goes (:func:`apply_ssf`, ``linears=True``; RLRR uses ``linears=False``): after every
``nn.LayerNorm`` that is not inside an ``attn``/``mlp`` module (norm1, norm2 of every block, the final
``norm``, ``fc_norm``/``norm_pre``/``patch_embed.norm`` where those are LayerNorms), after the
patch-embedding convolution (channel-wise, before flattening: identical to scaling the tokens right after
the patch embedding), and, with ``linears=True``, after every attention/MLP Linear (qkv, proj, fc1, fc2).
This is the placement of the official SSF ViT (after qkv, proj, fc1, fc2, norm1, norm2, patch embedding
and final norm); SSF after the activation/attention ops is not used there either. Every SSF folds into
the layer it follows, so :func:`merge_ssf` gives a plain timm model.

Implementation: small wrappers swapped in place: :class:`RLRRLinear` (holds the frozen Linear as
``.base``), :class:`SSF` (holds the layer it follows as ``.base``). Written from the paper's equations;
no code from the official repository (it has no licence).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from vitadapt.peft.common import freeze

Sides = Literal["both", "left", "right"]
Init = Literal["kaiming", "normal", "zero", "constant", "uniform"]
Layers = Literal["all", "attn", "mlp"]
SSFInit = Literal["official", "identity"]

SIDES = ("both", "left", "right")
INITS = ("kaiming", "normal", "zero", "constant", "uniform")
LAYERS = ("all", "attn", "mlp")
SSF_INITS = ("official", "identity")

# Linear children of a block's ``attn`` / ``mlp`` that RLRR adapts -> number of stacked out-blocks.
ATTN_TARGETS = {"qkv": 3, "q": 1, "k": 1, "v": 1, "q_proj": 1, "k_proj": 1, "v_proj": 1, "proj": 1}
MLP_TARGETS = {"fc1": 1, "fc2": 1}

_NORMAL_STD = 0.02
_SSF_STD = 0.02

__all__ = ["RLRRLinear", "SSF", "apply_rlrr", "merge_rlrr", "apply_ssf", "merge_ssf", "rlrr_param_count",
           "SIDES", "INITS", "LAYERS"]


def _check_choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def rlrr_param_count(in_features: int, out_features: int, sides: Sides = "both", rank: int = 1,
                     n_splits: int = 1, bias: bool = True) -> int:
    """Trainable parameters of one RLRR Linear (``out_features`` = all stacked out-blocks)."""
    n = out_features * bias  # f
    if sides in ("both", "left"):
        n += out_features * rank
    if sides in ("both", "right"):
        n += n_splits * rank * in_features
    return n


class RLRRLinear(nn.Module):
    """``y = x W'^T + b'`` with ``W' = W ⊙ (1 + Δ)`` (``residual``) or ``W ⊙ Δ``, ``b' = b + f``.

    ``Δ = S_left @ S_right`` per out-block (``sides="both"``), ``Δ_ij = s_left[i]`` (``"left"``) or
    ``Δ_ij = s_right[j]`` (``"right"``); see the module docstring. ``n_splits`` stacked out-blocks
    (3 for a fused qkv) each get their own ``S_right``; ``S_left`` and ``f`` are per output row anyway.

    Parameters: ``s_left`` (out, r) or None, ``s_right`` (n_splits, r, in) or None, ``f`` (out) or None
    (None when the base Linear has no bias, so that the merged model stays a plain one). The frozen
    Linear is ``.base``.
    """

    def __init__(self, base: nn.Linear, sides: Sides = "both", residual: bool = True, rank: int = 1,
                 init: Init = "kaiming", n_splits: int = 1):
        super().__init__()
        _check_choice("sides", sides, SIDES)
        _check_choice("init", init, INITS)
        if base.out_features % n_splits:
            raise ValueError(f"out_features={base.out_features} is not divisible by n_splits={n_splits}")
        self.base = base
        self.sides, self.residual, self.rank, self.init, self.n_splits = sides, bool(residual), rank, init, n_splits
        self.in_features, self.out_features = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        left = sides in ("both", "left")
        right = sides in ("both", "right")
        self.s_left = nn.Parameter(torch.empty(self.out_features, rank, **kw)) if left else None
        self.s_right = nn.Parameter(torch.empty(n_splits, rank, self.in_features, **kw)) if right else None
        self.f = nn.Parameter(torch.zeros(self.out_features, **kw)) if base.bias is not None else None
        self.reset_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r, init = self.rank, self.init
        for name, fan_in in (("s_left", r), ("s_right", self.in_features)):
            p = getattr(self, name)
            if p is None:
                continue
            if init == "kaiming" or (init == "zero" and name == "s_right" and self.s_left is not None):
                bound = math.sqrt(6.0 / fan_in)  # = torch kaiming_uniform_(a=0) on the 2-D factor
                p.uniform_(-bound, bound)
            elif init == "normal":
                p.normal_(0.0, _NORMAL_STD)
            elif init == "uniform":
                b = _NORMAL_STD * math.sqrt(3.0)
                p.uniform_(-b, b)
            elif init == "constant":
                p.fill_(r ** -0.5)
            else:  # zero: the left factor (or the only factor) is 0
                p.zero_()
        if self.f is not None:
            self.f.zero_()

    def delta(self) -> torch.Tensor:
        """The rescaling Δ, broadcastable to (out, in)."""
        n, o = self.n_splits, self.out_features // self.n_splits
        if self.sides == "left":
            return self.s_left  # (out, 1)
        if self.sides == "right":
            if n == 1:
                return self.s_right.view(1, self.in_features)
            return self.s_right.expand(n, o, self.in_features).reshape(self.out_features, self.in_features)
        return torch.bmm(self.s_left.view(n, o, self.rank), self.s_right).reshape(self.out_features, self.in_features)

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        d = self.delta()
        return w + d * w if self.residual else d * w

    def merged_bias(self) -> torch.Tensor | None:
        b = self.base.bias
        return b if b is None or self.f is None else b + self.f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.merged_bias())

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the rescaling into ``.base`` and return it (a plain nn.Linear)."""
        w, b = self.merged_weight(), self.merged_bias()
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        return self.base

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, sides={self.sides}, residual={self.residual}, "
                f"rank={self.rank}, n_splits={self.n_splits}, init={self.init}")


class SSF(nn.Module):
    """Scale-and-shift after a layer: ``y = base(x) * gamma + beta`` along ``channel_dim``.

    ``base`` is the layer SSF follows (LayerNorm, Linear, Conv2d, or Identity); it folds into that layer
    on :meth:`merge`. ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)`` (official) or the identity.
    """

    def __init__(self, base: nn.Module, dim: int, channel_dim: int = -1, init: SSFInit = "official"):
        super().__init__()
        _check_choice("ssf init", init, SSF_INITS)
        self.base, self.dim, self.channel_dim = base, dim, channel_dim
        p = next(base.parameters(), None)
        kw = dict(device=p.device, dtype=p.dtype) if p is not None else {}
        self.gamma = nn.Parameter(torch.ones(dim, **kw))
        self.beta = nn.Parameter(torch.zeros(dim, **kw))
        if init == "official":
            with torch.no_grad():
                self.gamma.normal_(1.0, _SSF_STD)
                self.beta.normal_(0.0, _SSF_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.channel_dim in (-1, y.ndim - 1):
            return y * self.gamma + self.beta
        shape = [1] * y.ndim
        shape[self.channel_dim] = self.dim
        return y * self.gamma.view(shape) + self.beta.view(shape)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold gamma/beta into ``.base`` (weight * gamma, bias * gamma + beta) and return it."""
        base = self.base
        if isinstance(base, (RLRRLinear, SSF)):
            base = base.merge()
        if isinstance(base, nn.LayerNorm):
            if base.weight is None:
                raise ValueError("cannot fold SSF into a LayerNorm without elementwise_affine")
            ok = base.normalized_shape[-1] == self.dim and self.channel_dim in (-1,)
        elif isinstance(base, nn.Linear):
            ok = base.out_features == self.dim and self.channel_dim == -1
        elif isinstance(base, nn.Conv2d):
            ok = base.out_channels == self.dim and self.channel_dim == 1
        else:
            raise ValueError(f"cannot fold SSF into {type(base).__name__}; supported: LayerNorm, Linear, Conv2d")
        if not ok:
            raise ValueError(f"SSF (dim={self.dim}, channel_dim={self.channel_dim}) does not match {base}")
        g, b = self.gamma, self.beta
        w = base.weight
        w.mul_(g.view([-1] + [1] * (w.ndim - 1)))
        if base.bias is None:  # a Linear/Conv without bias: give it one (the model is then no longer strict-loadable)
            base.bias = nn.Parameter(torch.zeros_like(g), requires_grad=False)
        base.bias.mul_(g).add_(b)
        return base

    def extra_repr(self) -> str:
        return f"dim={self.dim}, channel_dim={self.channel_dim}"


# --------------------------------------------------------------------------------------------------
# Finding the layers of a timm ViT


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`: RLRR/SSF expect a timm VisionTransformer")
    return blocks


def _check_not_adapted(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (RLRRLinear, SSF)):
            raise ValueError(f"model already adapted ({name} is a {type(m).__name__}); start from a fresh model")


def _linear_targets(model: nn.Module, layers: Layers) -> list[tuple[nn.Module, str, nn.Linear, int]]:
    """(parent, attribute, Linear, n_splits) for every adapted Linear, in model order."""
    out = []
    for block in _blocks(model):
        for part, targets in (("attn", ATTN_TARGETS), ("mlp", MLP_TARGETS)):
            if layers not in ("all", part):
                continue
            parent = getattr(block, part, None)
            if parent is None:
                continue
            for attr, n in targets.items():
                lin = getattr(parent, attr, None)
                if isinstance(lin, nn.Linear):
                    out.append((parent, attr, lin, n))
    if not out:
        raise ValueError(f"no {layers!r} Linear ({', '.join(ATTN_TARGETS)}, {', '.join(MLP_TARGETS)}) "
                         "found in the blocks")
    return out


def _norm_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, LayerNorm) for every LayerNorm not inside an attn/mlp module."""
    out = []
    for name, parent in model.named_modules():
        parts = name.split(".") if name else []
        if "attn" in parts or "mlp" in parts:
            continue
        for attr, child in parent.named_children():
            if isinstance(child, nn.LayerNorm) and attr not in ("attn", "mlp"):
                out.append((parent, attr, child))
    return out


def _ssf_targets(model: nn.Module, linears: bool) -> list[tuple[nn.Module, str, nn.Module, int, int]]:
    """(parent, attribute, layer, dim, channel_dim) of every layer SSF follows."""
    out = []
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        out.append((pe, "proj", proj, proj.out_channels, 1))
    for parent, attr, ln in _norm_targets(model):
        out.append((parent, attr, ln, ln.normalized_shape[-1], -1))
    if linears:
        for parent, attr, lin, _ in _linear_targets(model, "all"):
            out.append((parent, attr, lin, lin.out_features, -1))
    return out


def _head_params(model: nn.Module) -> list[nn.Parameter]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if head is None or isinstance(head, nn.Identity):
        return []
    return list(head.parameters())


def _add_ssf(model: nn.Module, linears: bool, init: SSFInit) -> list[SSF]:
    mods = []
    for parent, attr, layer, dim, cdim in _ssf_targets(model, linears):
        current = getattr(parent, attr)  # may already be an RLRRLinear around `layer`
        ssf = SSF(current, dim, channel_dim=cdim, init=init)
        setattr(parent, attr, ssf)
        mods.append(ssf)
    return mods


def _validate_rank(rank, sides) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is not valid; choose an integer >= 1")
    if rank > 1 and sides != "both":
        raise ValueError(f"rank={rank} needs sides='both' (one-sided rescaling is rank one); got sides={sides!r}")


# --------------------------------------------------------------------------------------------------
# Public API


def apply_rlrr(model: nn.Module, sides: Sides = "both", residual: bool = True, rank: int = 1,
               init: Init = "kaiming", ssf: bool = True, layers: Layers = "all",
               train_head: bool = True) -> nn.Module:
    """Adapt a timm ViT with RLRR in place and return it (see the module docstring for the maths).

    Args:
        sides: "both" (``Δ = S_left S_right``), "left" (``Δ_ij = s_left[i]``) or "right" (``Δ_ij = s_right[j]``).
        residual: keep the "+ W" term (``W' = W + Δ ⊙ W``); False gives ``W' = Δ ⊙ W``.
        rank: r of ``S_left`` (out x r) @ ``S_right`` (r x in); > 1 needs sides="both".
        init: "kaiming" (official), "normal", "zero", "constant", "uniform" (see the module docstring).
            "zero" also starts SSF at the identity, so with ``residual=True`` the model equals the source.
        ssf: add SSF after every LayerNorm and after the patch embedding (official RLRR: True).
        layers: "all" (q, k, v, proj, fc1, fc2), "attn" (q, k, v, proj) or "mlp" (fc1, fc2).
        train_head: the classifier head trains (when it is not Identity).

    Everything else is frozen. Bad arguments raise ValueError before the model is touched.
    """
    _check_choice("sides", sides, SIDES)
    _check_choice("init", init, INITS)
    _check_choice("layers", layers, LAYERS)
    _validate_rank(rank, sides)
    _check_not_adapted(model)
    targets = _linear_targets(model, layers)
    freeze(model)
    for parent, attr, lin, n in targets:
        setattr(parent, attr, RLRRLinear(lin, sides=sides, residual=residual, rank=rank, init=init, n_splits=n))
    if ssf:
        _add_ssf(model, linears=False, init="identity" if init == "zero" else "official")
    if train_head:
        for p in _head_params(model):
            p.requires_grad_(True)
    return model


def apply_ssf(model: nn.Module, linears: bool = True, init: SSFInit = "official",
              train_head: bool = True) -> nn.Module:
    """SSF baseline (Lian et al. 2022): ``y = x * gamma + beta`` after the patch embedding, every
    LayerNorm and (``linears=True``) every attention/MLP Linear (qkv, proj, fc1, fc2); the rest frozen
    except the head. ``init``: "official" (gamma ~ N(1, 0.02), beta ~ N(0, 0.02)) or "identity".
    ViT-B/16 without head: 205,824 trainable parameters (linears=True), 39,936 (linears=False).
    """
    _check_choice("init", init, SSF_INITS)
    _check_not_adapted(model)
    _blocks(model)
    freeze(model)
    _add_ssf(model, linears=bool(linears), init=init)
    if train_head:
        for p in _head_params(model):
            p.requires_grad_(True)
    return model


@torch.no_grad()
def _merge(model: nn.Module) -> nn.Module:
    # children first, so an SSF around an RLRRLinear sees a merged Linear
    for name, child in list(model.named_children()):
        _merge(child)
        if isinstance(child, (RLRRLinear, SSF)):
            setattr(model, name, child.merge())
    return model


def merge_rlrr(model: nn.Module) -> nn.Module:
    """Fold every RLRR rescaling and SSF into the layer it wraps, in place; returns a plain timm model
    with the same outputs whose ``state_dict`` loads strict into a fresh ``timm.create_model(arch)``.

    RLRR: ``W <- W ⊙ (1 + Δ)`` (or ``W ⊙ Δ``), ``b <- b + f``. SSF after a LayerNorm / Linear / conv:
    ``weight <- weight * gamma`` (per output channel), ``bias <- bias * gamma + beta``. The merged
    weights keep the base layers' ``requires_grad`` (frozen); the head is untouched.
    """
    return _merge(model)


def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold SSF modules into their layers (same as :func:`merge_rlrr`, which handles both)."""
    return _merge(model)
