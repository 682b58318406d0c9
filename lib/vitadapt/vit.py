"""Surgery on timm ``VisionTransformer`` models, in one place: what the rest of the package does *to* a ViT.

What belongs here: functions and small modules that take a timm ViT apart or change its structure, and know
timm's attribute names (``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``,
``fc_norm``, ``head_drop``, ``head``, ``drop_path1/2``, ``grad_checkpointing``). They work on modules and
tensors only: no datasets, no training loop, no adaptation method.

- :func:`meta_vit`: a ViT built on ``torch.device("meta")`` (shapes only, no weights): parameter counts
  without memory or time.
- :func:`fresh_head`: a new classifier head drawn from the current torch seed.
- :func:`avg_pool_head`: the classifier reads the mean patch token through a fresh ``fc_norm`` (timm's
  ``global_pool="avg"``, MAE's fine-tune), instead of the normed CLS token.
- :func:`set_drop_path`: stochastic depth rising linearly over the blocks (timm's rule).
- :func:`encode_tokens`: the tail of timm's ``forward_features`` on tokens that already carry their position
  embedding (``patch_drop``, ``norm_pre``, the blocks with gradient checkpointing, the final norm); the
  self-supervised objectives call it after masking or dropping tokens.
- :class:`PreLogits`: the features a ViT's head reads (pooling, ``fc_norm``), as the output of a model.
- :class:`TailViT` / :class:`HeadOnly`: the last blocks + final norm + pooling + head of a ViT, or its head
  alone, as models of their own (trained on cached tokens / features).

What does not: the parameter-efficient methods (:mod:`vitadapt.peft`: qkv splitting, LoRA, RLRR, ...), and
the batched passes over cached datasets (:func:`vitadapt.finetune.embed_tokens`,
:func:`vitadapt.finetune.run_blocks`, :func:`vitadapt.finetune.pooled_features`), which live with the
``TensorSet`` they read and write.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["meta_vit", "fresh_head", "avg_pool_head", "set_drop_path", "encode_tokens", "PreLogits", "TailViT", "HeadOnly"]


def meta_vit(arch: str, img_size: int | None = None, **kw) -> nn.Module:
    """``timm.create_model(arch, num_classes=0, **kw)`` on ``torch.device("meta")``: every shape, no weight.

    For counting parameters of large models in a second. ``weight_init="skip"`` is passed (random init on meta
    tensors is slow and pointless), and left out for architectures that do not take it.
    """
    import timm
    extra = {"img_size": img_size} if img_size else {}
    with torch.device("meta"):
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, weight_init="skip", **extra, **kw)
        except TypeError:          # an architecture without that argument
            return timm.create_model(arch, pretrained=False, num_classes=0, **extra, **kw)


def fresh_head(model: nn.Module, num_classes: int, std: float = 0.02) -> nn.Module:
    """Replace the classifier head by a new ``Linear(num_features, num_classes)`` (timm init: truncated normal,
    ``std`` 0.02, zero bias; MAE's and ExPLoRA's fine-tunes draw it with std 2e-5) from the current torch seed;
    returns the model."""
    if not std > 0:
        raise ValueError(f"std={std!r} must be > 0 (timm 0.02, MAE/ExPLoRA fine-tune 2e-5)")
    old = model.get_classifier()
    dim = old.in_features if isinstance(old, nn.Linear) else model.num_features
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    p = next(model.parameters(), None)
    if p is not None:
        head = head.to(p.device)
    model.head = head
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def avg_pool_head(model: nn.Module) -> nn.Module:
    """Make a timm ViT's head read the mean of the patch tokens (prefix tokens left out) through a new LayerNorm
    ``fc_norm`` (weight 1, bias 0, the final norm's eps), the final ``norm`` becoming Identity: what timm builds for
    ``global_pool="avg"`` and what MAE's fine-tune model does (the pre-trained final norm is dropped). In place;
    returns the model. Raises ValueError for a model that is not a timm VisionTransformer or pools otherwise."""
    if not all(hasattr(model, a) for a in ("global_pool", "fc_norm", "norm", "num_prefix_tokens")):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (global_pool, fc_norm, norm, "
                         f"num_prefix_tokens); avg_pool_head needs one")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool={model.global_pool!r}: avg_pool_head takes a ViT pooling 'token' or 'avg'")
    if model.global_pool == "avg" and not isinstance(model.fc_norm, nn.Identity):
        return model                                          # already pooled so
    norm = model.norm
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"final norm is {type(norm).__name__}, not an nn.LayerNorm: cannot build its fc_norm")
    fc_norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                           device=norm.weight.device if norm.weight is not None else None)
    model.global_pool, model.fc_norm, model.norm = "avg", fc_norm, nn.Identity()
    return model


def set_drop_path(model: nn.Module, rate: float, uniform: bool = False) -> nn.Module:
    """Stochastic depth on the blocks of a timm ViT, rising linearly from 0 to ``rate`` (timm's rule) or, ``uniform``,
    ``rate`` in every block (DINOv2's ``drop_path_uniform``), in place."""
    from timm.layers import DropPath
    n = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate if uniform else rate * i / max(1, n - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return model


def encode_tokens(vit: nn.Module, x: Tensor) -> Tensor:
    """``patch_drop``, ``norm_pre``, the blocks (with timm's gradient checkpointing when the model has it on)
    and the final norm on tokens ``x`` that already carry their position embedding (``vit._pos_embed``): the
    tail of timm's ``forward_features``. Returns ``[B, prefix + N, D]``."""
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


class TailViT(nn.Module):
    """The blocks ``start:`` of a timm VisionTransformer, its final norm, pooling and head, applied to the
    tokens the blocks ``:start`` produced. The modules are the ViT's own (not copies): deep-copy the ViT first
    to keep it. Exposes ``blocks``, ``norm``, ``head``, ``get_classifier()``, so every PEFT builder of
    :mod:`vitadapt.peft` adapts it as it would the whole ViT (without the patch embedding)."""

    def __init__(self, vit: nn.Module, start: int):
        super().__init__()
        if getattr(vit, "attn_pool", None) is not None:
            raise ValueError("TailViT does not support attention pooling (global_pool='map')")
        n = len(vit.blocks)
        if not 0 <= start <= n:
            raise ValueError(f"start={start} out of range; valid: 0 <= start <= {n}")
        self.start = start
        self.blocks = nn.Sequential(*list(vit.blocks)[start:])
        self.norm, self.fc_norm, self.head_drop, self.head = vit.norm, vit.fc_norm, vit.head_drop, vit.head
        self.global_pool, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)
        self.num_features = vit.num_features
        self.num_classes = getattr(vit, "num_classes", 0)

    def get_classifier(self) -> nn.Module:
        return self.head

    def pre_logits(self, tokens: Tensor) -> Tensor:
        from timm.layers import global_pool_nlc
        x = self.norm(self.blocks(tokens))
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                            reduce_include_prefix=self.pool_include_prefix)
        return self.head_drop(self.fc_norm(x))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.pre_logits(tokens))


class HeadOnly(nn.Module):
    """A classifier head on pooled features (the linear probe on cached features)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head
        self.num_features = head.in_features

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class PreLogits(nn.Module):
    """What the head of a timm ViT reads (``forward_head(forward_features(x), pre_logits=True)``: pooling, ``fc_norm``,
    head dropout), as a model's output and as its ``forward_features`` with an identity ``forward_head``, so feature
    extraction (:func:`vitadapt.eval.pool_tokens`) returns exactly those features. The ViT is the one given, not a
    copy."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward_features(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
