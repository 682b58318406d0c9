"""MAE objective (masked autoencoding) around a timm ViT encoder, for ExPLoRA's extended pre-training.

The rule (MAE, arXiv 2111.06377, as used by ExPLoRA, arXiv 2406.10973):

- per image, a random 75 % of the patches are masked (``mask_ratio=0.75``, uniform random per sample); the
  encoder sees only the visible 25 % (plus its CLS/register tokens), position embeddings added before the
  tokens are dropped;
- a light transformer decoder (paper: dim 512, depth 8, 16 heads, fixed 2-D sin-cos position embedding)
  receives the encoded visible tokens, projected to the decoder width, with a shared learnable mask token at
  every masked position, and predicts the pixels of each patch;
- loss: mean squared error over the *masked* patches only, against per-patch normalised pixels
  (``norm_pix_loss``: each target patch minus its mean, divided by sqrt(var + 1e-6)).

ExPLoRA keeps the pre-trained MAE decoder and puts LoRA rank 8 on it (``decoder_lora_rank=8``, with the
decoder weights in ``decoder_state_dict``; ``mae_decoder_state_dict`` converts an official MAE checkpoint). The
official ViT-L/16 checkpoint that holds the decoder is ``mae_pretrain_vit_large_full.pth`` (dl.fbaipublicfiles.com/
mae/pretrain/; the plain ``mae_pretrain_vit_large.pth`` is encoder-only); ``make data DATASET=mae_decoder`` puts it at
``data/mae/mae_pretrain_vit_large_full.pth`` (:data:`vitadapt.data.fetch.MAE_DECODER_FILE`). (The official script,
scripts/pretrain_mae.sh, starts from ``mae_visualize_vit_large.pth``, MAE trained on raw pixels, with --norm_pix_loss.)

What trains in the decoder, as the official mae/pretrain.py does it (samar-khanna/ExPLoRA, with ``--lora_layers attn``,
``--unfreeze_norm``, no ``--lora_attn_key`` / ``--lora_attn_proj`` / ``--unfreeze_embed`` / ``--freeze_decoder``):
LoRA (alpha 1, scale 1/r) on the **Q and V** projections of every decoder block (``decoder_lora_targets``; the fused
``qkv`` is split, :func:`vitadapt.peft.qkv.split_qkv`, K stays frozen), and **every decoder LayerNorm** (each block's
``norm1`` / ``norm2`` and the final ``decoder_norm``: its "norm in the name" rule; ``decoder_train_norms``). Frozen:
``decoder_embed``, ``decoder_pred`` (trained only with --unfreeze_embed), the mask token, K, the attention output
projection, the MLPs and the biases of the LoRA'd projections; the position embedding is fixed sin-cos.
Offline no MAE decoder weights exist: the decoder is then randomly initialised and trains in full
(``decoder_lora_rank=0``).

The encoder's trainable set is the caller's: this module never changes ``requires_grad`` of the encoder.
The input size must be the encoder's ``img_size`` (the decoder's position embedding is fixed), square, and
a multiple of the (square) patch size.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitadapt.ssl.dinov2 import _rank, _wraps, find_vit
from vitadapt.vit import encode_tokens


def mae_decoder_state_dict(checkpoint: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official MAE pre-training checkpoint (``ckpt["model"]`` or the dict itself: ``mask_token``,
    ``decoder_embed.*``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm.*``,
    ``decoder_pred.*``) to this module's decoder names (``decoder_embed.*``, ``decoder.*``,
    ``decoder_pred.*``). Encoder keys are dropped."""
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            out["decoder.mask_token"] = v
        elif k == "decoder_pos_embed":
            out["decoder.pos_embed"] = v
        elif k.startswith("decoder_blocks."):
            out["decoder.blocks." + k[len("decoder_blocks."):]] = v
        elif k.startswith("decoder_norm."):
            out["decoder.norm." + k[len("decoder_norm."):]] = v
        elif k.startswith(("decoder_embed.", "decoder_pred.")):
            out[k] = v
    if not out:
        raise ValueError("no MAE decoder key (mask_token, decoder_embed.*, decoder_blocks.*, decoder_norm.*, "
                         "decoder_pred.*, decoder_pos_embed) found in the checkpoint")
    return out


class MAEObjective(nn.Module):
    """Masked-autoencoder loss on a timm ViT encoder; ``loss(images)`` (also ``forward``) -> ``(loss, logs)``.

    Args:
        encoder: a timm ``VisionTransformer`` (or a peft wrapper around one), trainable set chosen by the caller.
        mask_ratio: fraction of patches masked per image (0.75).
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: decoder size (paper 512, 8, 16, 4).
        norm_pix_loss: normalise each target patch by its mean and variance (True in MAE / ExPLoRA).
        decoder_state_dict: pre-trained decoder weights in this module's names (see ``mae_decoder_state_dict``),
            loaded strictly before LoRA is added.
        decoder_lora_rank: > 0 puts peft LoRA of this rank on ``decoder_lora_targets`` of every decoder block and
            freezes the rest of the decoder but its LayerNorms (``decoder_train_norms``) (paper: 8 on the pre-trained
            decoder); 0 trains the whole decoder.
        decoder_lora_alpha: LoRA alpha (scaling alpha / r; 1.0 as the official ExPLoRA LoRA).
        decoder_lora_targets: decoder projections that get LoRA (official: q, v; see
            :data:`vitadapt.peft.lora.LORA_TARGETS`).
        decoder_train_norms: with decoder LoRA, the decoder's LayerNorms train too (official --unfreeze_norm).
        seed: seeds the masks; the mask of step t depends only on (seed, t), so a resumed run repeats exactly.
    """

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, decoder_mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True, decoder_state_dict: Mapping[str, Tensor] | None = None,
                 decoder_lora_rank: int = 0, decoder_lora_alpha: float = 1.0,
                 decoder_lora_targets: tuple[str, ...] = ("q", "v"), decoder_train_norms: bool = True, seed: int = 0):
        super().__init__()
        from lightly.models.modules.masked_vision_transformer_decoder_timm import MaskedVisionTransformerDecoderTIMM
        from lightly.models.modules.masked_vision_transformer_timm import init_weights
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1) (MAE: 0.75)")
        if decoder_dim < 1 or decoder_depth < 1 or decoder_heads < 1 or decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim={decoder_dim}, decoder_depth={decoder_depth}, decoder_heads="
                             f"{decoder_heads}: all must be >= 1 and decoder_dim divisible by decoder_heads")
        if decoder_lora_rank < 0:
            raise ValueError(f"decoder_lora_rank={decoder_lora_rank} must be >= 0 (0 = no LoRA, paper 8)")
        from vitadapt.peft.lora import _check_targets
        targets = _check_targets(decoder_lora_targets)
        vit = find_vit(encoder)
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"patch size {(ph, pw)} must be square")
        gh, gw = vit.patch_embed.grid_size
        if gh != gw:
            raise ValueError(f"patch grid {(gh, gw)} must be square (lightly's patchify/decoder)")
        self.patch_size = ph
        self.img_size = tuple(vit.patch_embed.img_size)
        self.num_patches = gh * gw
        self.num_prefix = vit.num_prefix_tokens
        in_chans = vit.patch_embed.proj.in_channels

        self.encoder = encoder
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches, embed_dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
            num_prefix_tokens=self.num_prefix, mlp_ratio=decoder_mlp_ratio)
        self.decoder_pred = nn.Linear(decoder_dim, ph * pw * in_chans)
        self.decoder_embed.apply(init_weights)
        self.decoder_pred.apply(init_weights)
        if decoder_state_dict is not None:
            self.load_decoder(decoder_state_dict)
        if decoder_lora_rank:
            if decoder_state_dict is None:
                warnings.warn("decoder_lora_rank > 0 on a randomly initialised decoder: only the LoRA matrices "
                              "of a random frozen decoder will train; pass decoder_state_dict (paper) or use "
                              "decoder_lora_rank=0", stacklevel=2)
            from vitadapt.peft.lora import inject_lora, lora_target_names
            from vitadapt.peft.qkv import split_qkv
            for m in self.decoder_modules():
                for p in m.parameters():
                    p.requires_grad_(False)
            if any(t in ("q", "k", "v") for t in targets):
                split_qkv(self.decoder)
            self.decoder = inject_lora(self.decoder, lora_target_names(self.decoder, targets), decoder_lora_rank,
                                       decoder_lora_alpha, 0.0)
            for n, p in self.decoder.named_parameters():
                p.requires_grad_(".lora_A." in n or ".lora_B." in n)
            if decoder_train_norms:
                for m in self.decoder.modules():
                    if isinstance(m, nn.LayerNorm):
                        m.requires_grad_(True)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.decoder_lora_rank = int(decoder_lora_rank)
        self.seed = int(seed)

    def decoder_modules(self) -> list[nn.Module]:
        return [self.decoder_embed, self.decoder, self.decoder_pred]

    def load_decoder(self, state_dict: Mapping[str, Tensor]) -> None:
        """Strictly load ``decoder_embed.*``, ``decoder.*``, ``decoder_pred.*`` (before LoRA is added)."""
        for name in ("decoder_embed", "decoder", "decoder_pred"):
            sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            getattr(self, name).load_state_dict(sub, strict=True)

    # ------------------------------------------------------------------ masking
    def random_masking(self, batch_size: int, step: int, device) -> tuple[Tensor, Tensor]:
        """``(idx_keep, idx_mask)`` patch indices ``[B, n_keep]`` / ``[B, N - n_keep]``, a uniform random
        permutation per image with ``n_keep = int(N * (1 - mask_ratio))``, drawn from a generator seeded by
        (seed, step, rank)."""
        n_keep = max(1, int(self.num_patches * (1 - self.mask_ratio)))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 131 + _rank())
        order = torch.argsort(torch.rand(batch_size, self.num_patches, generator=g), dim=1).to(device)
        return order[:, :n_keep], order[:, n_keep:]

    # ------------------------------------------------------------------ model
    def encode_visible(self, images: Tensor, idx_keep: Tensor) -> Tensor:
        """Encoder on the visible patches only: ``[B, prefix + n_keep, D]``."""
        from lightly.models.utils import get_at_index
        vit = find_vit(self.encoder)
        x = vit._pos_embed(vit.patch_embed(images))            # position embedding before dropping tokens
        P = self.num_prefix
        x = torch.cat([x[:, :P], get_at_index(x[:, P:], idx_keep)], dim=1)
        return encode_tokens(vit, x)

    def decode(self, latent: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> Tensor:
        """Pixel predictions ``[B, n_masked, p*p*C]`` at the masked patches."""
        from lightly.models.utils import get_at_index, repeat_token, set_at_index
        B, P = latent.shape[0], self.num_prefix
        z = self.decoder_embed(latent)
        keep = torch.cat([torch.arange(P, device=idx_keep.device).expand(B, P), idx_keep + P], dim=1)
        full = set_at_index(repeat_token(self.decoder.mask_token, (B, P + self.num_patches)).to(z.dtype), keep, z)
        out = self.decoder(full)                               # + fixed sin-cos pos embed, blocks, norm
        return self.decoder_pred(get_at_index(out, idx_mask + P))

    def forward(self, images) -> tuple[Tensor, dict]:
        return self.loss(images)

    def loss(self, images) -> tuple[Tensor, dict]:
        """MSE on the masked patches against (per-patch normalised) pixels. ``images``: ``[B, C, H, W]`` or
        ``(images, target)``. In training mode each call advances the step counter (one call per step)."""
        from lightly.models.utils import get_at_index, normalize_mean_var, patchify
        if isinstance(images, (list, tuple)):
            images = images[0]
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor or (images, target), got "
                             f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} != the encoder's img_size {self.img_size} "
                             f"(MAE's decoder position embedding is fixed): resize the images")
        step = int(self.step_count)
        idx_keep, idx_mask = self.random_masking(images.shape[0], step, images.device)
        pred = self.decode(self.encode_visible(images, idx_keep), idx_keep, idx_mask)
        target = get_at_index(patchify(images, self.patch_size), idx_mask)
        if self.norm_pix_loss:
            target = normalize_mean_var(target, dim=-1, eps=1e-6)
        loss = F.mse_loss(pred.float(), target.float())
        if self.training:
            self.step_count += 1
        return loss, {"mse": loss.detach(), "mask_ratio": idx_mask.shape[1] / self.num_patches}


def mae_loss_fn(objective: MAEObjective) -> Callable:
    """``loss_fn(module, batch)`` for ``vitadapt.train.fit``: calls the (Fabric-wrapped) module so precision and
    DDP see the forward."""
    def loss_fn(module, batch):
        return module(batch) if _wraps(module, objective) else objective(batch)
    return loss_fn
