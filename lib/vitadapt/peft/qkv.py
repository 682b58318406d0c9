"""Split timm's fused ``qkv`` projection into separate Q, K, V Linears, and fuse it back.

timm's ``Attention`` computes ``self.qkv(x)`` with one ``nn.Linear(dim, 3 * attn_dim)`` whose output rows are
``[W_q; W_k; W_v]``. ExPLoRA (and most LoRA recipes) adapt Q and V alone, so the fused layer is replaced by
:class:`SplitQKV`, a module named ``qkv`` holding three Linears ``q``, ``k``, ``v`` whose forward returns
``cat([q(x), k(x), v(x)], -1)``: timm's forward, reshapes and ``q_norm``/``k_norm`` are untouched and the
outputs are identical. :func:`fuse_qkv` rebuilds the plain ``nn.Linear``, so the state dict keys are those of
an untouched timm model again.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

__all__ = ["SplitQKV", "split_qkv", "fuse_qkv"]


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """A Linear holding (a copy of) ``weight`` / ``bias``, on their device and dtype."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return lin


class SplitQKV(nn.Module):
    """Drop-in replacement of a fused ``qkv`` Linear: ``forward(x) = cat([q(x), k(x), v(x)], -1)``."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    @classmethod
    def from_fused(cls, qkv: nn.Linear) -> SplitQKV:
        """Copy the three row blocks of a fused ``Linear(dim, 3 * attn_dim)``."""
        if qkv.out_features % 3:
            raise ValueError(f"fused qkv out_features={qkv.out_features} is not divisible by 3")
        ws = qkv.weight.chunk(3, dim=0)
        bs = qkv.bias.chunk(3, dim=0) if qkv.bias is not None else (None, None, None)
        rg = qkv.weight.requires_grad
        return cls(*(_linear_from(w, b, rg) for w, b in zip(ws, bs)))

    @property
    def in_features(self) -> int:
        return _base(self.q).in_features

    @property
    def out_features(self) -> int:
        return sum(_base(m).out_features for m in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fused(self) -> nn.Linear:
        """The equivalent plain fused Linear (requires q, k, v to be plain Linears: merge LoRA first)."""
        for name in ("q", "k", "v"):
            if type(getattr(self, name)) is not nn.Linear:
                raise ValueError(
                    f"qkv.{name} is a {type(getattr(self, name)).__name__}, not a plain nn.Linear: "
                    "merge the adapters (merge_lora / merge_explora) before fusing"
                )
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight], dim=0)
        biases = [self.q.bias, self.k.bias, self.v.bias]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("q, k, v must all have a bias or all have none to be fused")
        b = None if biases[0] is None else torch.cat(biases, dim=0)
        return _linear_from(w, b, self.q.weight.requires_grad)


def _base(m: nn.Module) -> nn.Linear:
    """The underlying Linear of a (possibly peft-wrapped) layer."""
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _attentions(model: nn.Module) -> list[tuple[str, Attention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def split_qkv(model: nn.Module) -> nn.Module:
    """Replace, in place, every timm ``Attention.qkv`` Linear by an equivalent :class:`SplitQKV`.

    Weights and biases are copied row-block-wise (``W_q = W[:d]``, ``W_k = W[d:2d]``, ``W_v = W[2d:]``);
    outputs are unchanged. Already-split attentions are left as they are. Returns ``model``.
    Raises ValueError if the model has no timm ``Attention`` (other attention classes, e.g. EVA's, use the
    fused weight directly and cannot be split this way).
    """
    atts = _attentions(model)
    if not atts:
        raise ValueError(
            f"{type(model).__name__} has no timm.layers.Attention module; split_qkv supports timm "
            "VisionTransformer-style models (e.g. vit_*_patch16_224, vit_*_patch14_dinov2)"
        )
    for _, att in atts:
        if isinstance(att.qkv, nn.Linear):
            att.qkv = SplitQKV.from_fused(att.qkv)
    return model


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Inverse of :func:`split_qkv`, in place: every :class:`SplitQKV` becomes a plain ``nn.Linear`` again.

    The result's ``state_dict`` has exactly the keys of an untouched timm model. Raises ValueError if a
    split projection still carries (unmerged) adapters. Returns ``model``.
    """
    splits = [(n, m) for n, m in model.named_modules() if isinstance(m, SplitQKV)]
    fused = {n: m.fused() for n, m in splits}  # validates all before changing anything
    for name, lin in fused.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lin)
    return model
