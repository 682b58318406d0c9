"""DinoV2 objective (DINO + iBOT + KoLeo) with an EMA teacher, for ExPLoRA's extended pre-training.

The rule (DINOv2, arXiv 2304.07193, as used by ExPLoRA, arXiv 2406.10973):

- student and teacher share the architecture; the teacher is a copy of the student whose parameters never
  receive gradients and follow the student by an exponential moving average
  ``theta_t <- m * theta_t + (1 - m) * theta_s`` with ``m`` rising from 0.992 to 1 on a cosine over the
  total number of steps;
- DINO loss on the CLS token: the teacher sees the 2 global crops, the student the 2 global + n local
  crops; cross-entropy between the teacher's (centred or Sinkhorn-Knopp normalised) softmax at temperature
  ``tau_t`` and the student's softmax at 0.1, over every (teacher view, student view) pair of different views;
- iBOT loss on masked patch tokens: half of the global crops (mask probability 0.5) have a fraction of their
  patches, drawn uniformly in [0.1, 0.5], replaced by a learnable mask token at the input of the student;
  the student's output at those positions predicts the teacher's output on the unmasked crop;
- KoLeo regulariser (weight 0.1) on the student's CLS tokens of each global crop, SUMMED over the two global
  crops (``ssl_meta_arch.py``: ``koleo_loss_weight * sum(koleo(p) for p in cls.chunk(2))``);
- heads: 3-layer MLP (hidden 2048), bottleneck 256, weight-normalised prototype layer with ``n_prototypes``
  outputs (65,536 in the paper); DINO and iBOT share one head unless ``separate_ibot_head=True``
  (DINOv2 default ``separate_head: false``);
- teacher temperature: linear warm-up from 0.04 to 0.07 over ``teacher_temp_warmup_steps``, then 0.07.

Model requirement: the local crops are smaller than the global ones, and a timm ``VisionTransformer`` only
accepts another input size when it was created with ``dynamic_img_size=True`` (it then resamples its
position embedding on the fly). Create the backbone with
``timm.create_model(name, ..., dynamic_img_size=True)``; otherwise every view must have the model's
``img_size`` and a ``ValueError`` says so.

Trainable parameters: this module never changes ``requires_grad`` of the student backbone: whatever the
caller left trainable (ExPLoRA: LoRA on Q,V + the unfrozen block + norms) trains, plus the new heads and the
mask token (``train_mask_token=False``: frozen, as ExPLoRA keeps the checkpoint's; ``mask_token_init``: its
value, zeros by default). All teacher parameters are frozen.

DINOv2's optimisation recipe (layer-wise LR decay, weight-decay schedule, the prototype layer frozen for the first
``freeze_last_layer_epochs``, per-module gradient clipping) lives in :mod:`vitadapt.ssl.recipe`, as hooks of
:func:`vitadapt.train.fit`.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitadapt.vit import encode_tokens

CENTERING_CHOICES = ("centering", "sinkhorn")
MASK_MODES = ("block", "random")


# ----------------------------------------------------------------------------------------------- helpers
def find_vit(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``model`` (the model itself, or e.g. the base model of a peft
    wrapper)."""
    from timm.models.vision_transformer import VisionTransformer
    for m in model.modules():
        if isinstance(m, VisionTransformer):
            return m
    raise ValueError(f"no timm VisionTransformer found in {type(model).__name__}; valid: a timm "
                     f"VisionTransformer (e.g. timm.create_model('vit_small_patch14_dinov2', "
                     f"dynamic_img_size=True)) or a wrapper (peft) around one")


def _grid(vit: nn.Module, image: Tensor) -> tuple[int, int]:
    ph, pw = vit.patch_embed.patch_size
    return image.shape[-2] // ph, image.shape[-1] // pw


def check_input_size(vit: nn.Module, images: Tensor) -> None:
    """A non-dynamic timm ViT only accepts its own ``img_size``: fail with the fix named."""
    if images.ndim != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
    if not getattr(vit, "dynamic_img_size", False):
        want = tuple(vit.patch_embed.img_size)
        got = tuple(images.shape[-2:])
        if got != want:
            raise ValueError(f"input size {got} differs from the model's img_size {want}; create the model "
                             f"with timm.create_model(..., dynamic_img_size=True) to accept other sizes "
                             f"(local crops), or resize the views to {want}")


def vit_tokens(vit: nn.Module, images: Tensor, mask: Tensor | None = None,
               mask_token: Tensor | None = None) -> Tensor:
    """Run a timm ViT on ``images`` and return all output tokens ``[B, prefix + N, D]`` after the final norm.

    With ``mask`` (bool ``[B, h, w]`` or ``[B, N]``, True = masked) the patch embeddings at masked positions
    are replaced by ``mask_token`` *before* the position embedding is added (iBOT/DINOv2 rule), so a masked
    token still knows where it is.
    """
    check_input_size(vit, images)
    x = vit.patch_embed(images)                     # [B, h, w, D] (dynamic_img_size) or [B, N, D]
    if mask is not None:
        if mask_token is None:
            raise ValueError("mask given without mask_token")
        m = mask.reshape(x.shape[:-1]).unsqueeze(-1)
        # torch.where keeps the mask token in the graph even when nothing is masked (DDP-safe)
        x = torch.where(m, mask_token.to(x.dtype).expand_as(x), x)
    x = vit._pos_embed(x)
    return encode_tokens(vit, x)


@contextlib.contextmanager
def _python_random_seeded(seed: int):
    """lightly's block-mask helpers draw from the global ``random`` module: seed it locally, then restore."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def dinov2_masks(n_images: int, grid: tuple[int, int], *, mask_probability: float = 0.5,
                 ratio_min: float = 0.1, ratio_max: float = 0.5, mode: str = "block",
                 seed: int = 0) -> Tensor:
    """iBOT masks for ``n_images`` crops of ``grid`` patches: ``int(n_images * mask_probability)`` crops
    are masked, crop i of them with ``int(h*w*u)`` patches, ``u`` uniform in the i-th of equal sub-ranges of
    [ratio_min, ratio_max] (so the ratios spread uniformly over the range, DINOv2's collate rule); the rest
    are not masked. ``mode="block"`` masks rectangular blocks (DINOv2/BEiT, via lightly's
    ``random_block_mask_image``), ``mode="random"`` independent patches. Deterministic in ``seed``.
    Returns bool ``[n_images, h, w]``, True = masked.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode {mode!r} unknown; valid: {MASK_MODES}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability={mask_probability} must be in [0, 1]")
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"mask ratio range ({ratio_min}, {ratio_max}) must satisfy 0 <= min <= max <= 1")
    from lightly.models.utils import random_block_mask_image
    h, w = grid
    n_masked = int(n_images * mask_probability)
    bounds = torch.linspace(ratio_min, ratio_max, n_masked + 1).tolist()
    rng = random.Random(seed)
    masks = []
    with _python_random_seeded(rng.randrange(2**31)):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            k = int(h * w * rng.uniform(lo, hi))
            if k <= 0:
                masks.append(torch.zeros(h, w, dtype=torch.bool))
            elif mode == "block":
                # lightly raises when k < min_num_masks_per_block (tiny grids): lower the minimum there
                masks.append(random_block_mask_image((h, w), num_masks=k, min_num_masks_per_block=min(4, k)))
            else:
                flat = torch.zeros(h * w, dtype=torch.bool)
                flat[rng.sample(range(h * w), k)] = True
                masks.append(flat.view(h, w))
        masks += [torch.zeros(h, w, dtype=torch.bool) for _ in range(n_masked, n_images)]
    rng.shuffle(masks)
    return torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)


def _sinkhorn_targets(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2 ``sinkhorn_knopp_teacher``): rows of
    ``exp(logits / temp)`` rebalanced so that every prototype gets equal mass over the batch; each row
    sums to 1. Uses lightly's SwAV ``sinkhorn`` (epsilon = teacher temperature); the logits are shifted by
    their global maximum first (the shift cancels in the normalisation, and exp no longer overflows)."""
    from lightly.loss.swav_loss import sinkhorn
    logits = logits.float()
    return sinkhorn(logits - logits.max(), iterations=iterations, epsilon=temp,
                    gather_distributed=torch.distributed.is_available() and torch.distributed.is_initialized())


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def split_views(batch: Any) -> list[Tensor]:
    """The list of view tensors in a DataLoader batch over a ``DinoV2Augment`` dataset: either the list
    itself or ``(views, target)``."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, (list, tuple)) or not all(torch.is_tensor(v) for v in batch):
        raise ValueError(f"batch must be a list of view tensors [global_0, global_1, local_0, ...] or "
                         f"(views, target); got {type(batch).__name__}")
    if len(batch) < 2:
        raise ValueError(f"DinoV2 needs at least 2 global views, got {len(batch)} view(s)")
    return list(batch)


@torch.no_grad()
def ema_update(pairs, momentum: float, buffers: bool = False) -> None:
    """EMA of every ``(source, target)`` module pair: ``theta_t <- m * theta_t + (1 - m) * theta_s`` with ``m =
    momentum`` for each target parameter whose source twin trains (frozen twins are equal already, and skipping them
    keeps them bit-identical instead of drifting by rounding, which lightly's ``update_momentum`` would cause);
    ``buffers``: the target's buffers (batch-norm statistics) copied from the source. RuntimeError when a pair's
    parameters differ in name (another structure)."""
    src, dst = [], []
    for s_mod, t_mod in pairs:
        for (ns, ps), (nt, pt) in zip(s_mod.named_parameters(), t_mod.named_parameters()):
            if ns != nt:
                raise RuntimeError(f"source and EMA copy differ in structure: {ns} vs {nt}")
            if ps.requires_grad:
                src.append(ps.detach())
                dst.append(pt)
        if buffers:
            for bt, bs in zip(t_mod.buffers(), s_mod.buffers()):
                bt.copy_(bs)
    if dst and momentum < 1.0:
        torch._foreach_mul_(dst, momentum)
        torch._foreach_add_(dst, src, alpha=1.0 - momentum)


# -------------------------------------------------------------------------------------------- transform
class DinoV2Augment:
    """DinoV2's multi-crop augmentation of one image: ``[global_0, global_1, local_0 .. local_{n-1}]``.

    DINOv2 defaults: 2 global crops at 224 px, scale (0.32, 1.0); 8 local crops at 96 px (98 for patch 14
    so the grid is whole), scale (0.05, 0.32); flip, colour jitter, grey, blur, solarisation (on the second
    global crop), ImageNet normalisation. Built on lightly's ``DINOTransform``. Accepts a PIL image or a
    ``[C, H, W]`` tensor.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.32, 1.0), local_scale: tuple[float, float] = (0.05, 0.32),
                 normalize: dict | None = None, **dino_transform_kwargs):
        from lightly.transforms import DINOTransform
        from lightly.transforms.utils import IMAGENET_NORMALIZE
        if global_size < 1 or local_size < 1:
            raise ValueError(f"crop sizes must be >= 1, got global_size={global_size}, local_size={local_size}")
        if n_local < 0:
            raise ValueError(f"n_local={n_local} must be >= 0")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name}=({lo}, {hi}) must satisfy 0 < min <= max <= 1")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.transform = DINOTransform(global_crop_size=global_size, global_crop_scale=tuple(global_scale),
                                       local_crop_size=local_size, local_crop_scale=tuple(local_scale),
                                       n_local_views=n_local,
                                       normalize=IMAGENET_NORMALIZE if normalize is None else normalize,
                                       **dino_transform_kwargs)

    def __call__(self, image) -> list[Tensor]:
        return self.transform(image)

    def __repr__(self) -> str:
        return (f"DinoV2Augment(global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local={self.n_local})")


# -------------------------------------------------------------------------------------------- objective
def _make_head(in_dim: int, hidden_dim: int, bottleneck_dim: int, n_prototypes: int) -> nn.Module:
    from lightly.models.modules import DINOv2ProjectionHead
    with warnings.catch_warnings():   # lightly uses the deprecated nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return DINOv2ProjectionHead(input_dim=in_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                                    output_dim=n_prototypes)


class DinoV2Objective(nn.Module):
    """DINO + iBOT + KoLeo with an EMA teacher around a (LoRA-adapted) timm ViT student.

    ``loss(batch)`` (also ``forward``) returns ``(loss, logs)``;
    ``loss = dino_weight * L_dino + ibot_weight * L_ibot + koleo_weight * L_koleo``.
    Call ``update_teacher(step)`` after each optimizer step (``dinov2_loss_fn`` gives the ``on_step`` that
    does it). The step counter, the centres and the teacher live in the state dict, and the iBOT masks are
    drawn from ``seed`` and the step number, so a resumed run repeats an uninterrupted one exactly.

    Args:
        student: the backbone (a timm ``VisionTransformer`` or a wrapper around one), its trainable set
            already chosen by the caller; create it with ``dynamic_img_size=True`` for local crops.
        total_steps: steps of the run (cosine momentum schedule 0.992 -> 1 reaches 1 at the end).
        n_prototypes: prototypes K of the heads (paper 65,536; 256-4,096 in small profiles).
        hidden_dim, bottleneck_dim: head MLP sizes (paper 2048, 256).
        separate_ibot_head: own head for iBOT (DINOv2 default False: one shared head).
        momentum, final_momentum: EMA momentum start and end (0.992, 1.0).
        teacher_temp_start, teacher_temp, teacher_temp_warmup_steps: teacher temperature warm-up
            (0.04 -> 0.07, linear; DINOv2: 30 epochs).
        student_temp: 0.1.
        centering: ``"centering"`` (running mean of teacher logits, momentum 0.9, lightly's ``DINOLoss`` /
            ``IBOTPatchLoss``) or ``"sinkhorn"`` (Sinkhorn-Knopp, 3 iterations).
        mask_probability, mask_ratio: iBOT masking (0.5; (0.1, 0.5)); ``mask_mode`` ``"block"`` (DINOv2) or
            ``"random"``.
        dino_weight, ibot_weight, koleo_weight: 1.0, 1.0, 0.1 (KoLeo summed over the two global crops).
        seed: seeds the mask draws.
        mask_token_init, train_mask_token: the mask token's value (``[D]`` or ``[1, D]``; default zeros) and
            whether it trains (ExPLoRA: the checkpoint's, frozen).
    """

    def __init__(self, student: nn.Module, *, total_steps: int, n_prototypes: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, separate_ibot_head: bool = False,
                 momentum: float = 0.992, final_momentum: float = 1.0, teacher_temp_start: float = 0.04,
                 teacher_temp: float = 0.07, teacher_temp_warmup_steps: int = 0, student_temp: float = 0.1,
                 centering: Literal["centering", "sinkhorn"] = "centering", center_momentum: float = 0.9,
                 sinkhorn_iterations: int = 3, mask_probability: float = 0.5,
                 mask_ratio: tuple[float, float] = (0.1, 0.5), mask_mode: Literal["block", "random"] = "block",
                 dino_weight: float = 1.0, ibot_weight: float = 1.0, koleo_weight: float = 0.1, seed: int = 0,
                 mask_token_init: Tensor | None = None, train_mask_token: bool = True):
        super().__init__()
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        if centering == "sinkhorn_knopp":
            centering = "sinkhorn"
        if centering not in CENTERING_CHOICES:
            raise ValueError(f"centering={centering!r} unknown; valid: {CENTERING_CHOICES}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={mask_mode!r} unknown; valid: {MASK_MODES}")
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if n_prototypes < 2:
            raise ValueError(f"n_prototypes={n_prototypes} must be >= 2")
        if not 0.0 <= momentum <= final_momentum <= 1.0:
            raise ValueError(f"momentum={momentum}, final_momentum={final_momentum}: need 0 <= start <= end <= 1")
        if teacher_temp_start <= 0 or teacher_temp <= 0 or student_temp <= 0:
            raise ValueError(f"temperatures must be > 0, got teacher_temp_start={teacher_temp_start}, "
                             f"teacher_temp={teacher_temp}, student_temp={student_temp}")
        if teacher_temp_warmup_steps < 0:
            raise ValueError(f"teacher_temp_warmup_steps={teacher_temp_warmup_steps} must be >= 0")
        lo, hi = mask_ratio
        if not 0.0 <= mask_probability <= 1.0 or not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_probability={mask_probability} must be in [0, 1] and mask_ratio={mask_ratio} "
                             f"must satisfy 0 <= min <= max <= 1")
        vit = find_vit(student)
        if vit.cls_token is None:
            raise ValueError("the ViT has no CLS token (class_token=False); DINO needs one")
        dim = vit.embed_dim
        if mask_token_init is not None and mask_token_init.numel() != dim:
            raise ValueError(f"mask_token_init has {mask_token_init.numel()} values; the ViT's embed_dim is {dim}")

        self.student = student
        self.teacher = copy.deepcopy(student)          # same (LoRA) structure, same weights
        self.dino_head = _make_head(dim, hidden_dim, bottleneck_dim, n_prototypes)
        self.ibot_head = _make_head(dim, hidden_dim, bottleneck_dim, n_prototypes) if separate_ibot_head else None
        self.teacher_dino_head = _make_head(dim, hidden_dim, bottleneck_dim, n_prototypes)
        self.teacher_dino_head.load_state_dict(self.dino_head.state_dict())
        self.teacher_ibot_head = None
        if separate_ibot_head:
            self.teacher_ibot_head = _make_head(dim, hidden_dim, bottleneck_dim, n_prototypes)
            self.teacher_ibot_head.load_state_dict(self.ibot_head.state_dict())
        for m in self._teacher_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        # 1-D (so fit()'s default groups leave it without weight decay); zero init as DINOv2, or the checkpoint's
        init = torch.zeros(dim) if mask_token_init is None else mask_token_init.detach().reshape(dim).float().clone()
        self.mask_token = nn.Parameter(init, requires_grad=bool(train_mask_token))
        self.dino_loss = DINOLoss(output_dim=n_prototypes, teacher_temp=teacher_temp, student_temp=student_temp,
                                  center_momentum=center_momentum)
        self.ibot_loss = IBOTPatchLoss(output_dim=n_prototypes, teacher_temp=teacher_temp,
                                       student_temp=student_temp, center_momentum=center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

        self.total_steps = int(total_steps)
        self.n_prototypes = n_prototypes
        self.momentum, self.final_momentum = float(momentum), float(final_momentum)
        self.teacher_temp_start, self.teacher_temp = float(teacher_temp_start), float(teacher_temp)
        self.teacher_temp_warmup_steps = int(teacher_temp_warmup_steps)
        self.student_temp = float(student_temp)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.mask_probability, self.mask_ratio, self.mask_mode = float(mask_probability), (lo, hi), mask_mode
        self.dino_weight, self.ibot_weight = float(dino_weight), float(ibot_weight)
        self.koleo_weight = float(koleo_weight)
        self.seed = int(seed)
        self._micro = 0     # training batches since the last teacher update (accumulated batches of one step)
        self.teacher.eval()

    # ------------------------------------------------------------------ structure
    def _teacher_modules(self) -> list[nn.Module]:
        return [m for m in (self.teacher, self.teacher_dino_head, self.teacher_ibot_head) if m is not None]

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.student, self.teacher), (self.dino_head, self.teacher_dino_head)]
        if self.ibot_head is not None:
            pairs.append((self.ibot_head, self.teacher_ibot_head))
        return pairs

    def train(self, mode: bool = True):
        """The teacher always runs in eval mode (no drop-path, no dropout)."""
        super().train(mode)
        for m in self._teacher_modules():
            m.eval()
        return self

    # ------------------------------------------------------------------ schedules
    def teacher_momentum(self, step: int) -> float:
        """``m(step)`` on a cosine from ``momentum`` to ``final_momentum`` over ``total_steps``
        (lightly's ``cosine_schedule``)."""
        from lightly.utils.scheduler import cosine_schedule
        return cosine_schedule(min(step, self.total_steps), self.total_steps, self.momentum, self.final_momentum)

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up ``teacher_temp_start -> teacher_temp`` over ``teacher_temp_warmup_steps``."""
        n = self.teacher_temp_warmup_steps
        if n <= 0 or step >= n:
            return self.teacher_temp
        return self.teacher_temp_start + (self.teacher_temp - self.teacher_temp_start) * step / n

    @torch.no_grad()
    def update_teacher(self, step: int | None = None) -> float:
        """EMA ``theta_t <- m * theta_t + (1 - m) * theta_s`` with ``m = teacher_momentum(step)`` for every
        teacher parameter whose student twin trains (frozen twins are equal already, and skipping them keeps
        them bit-identical instead of drifting by rounding, which lightly's ``update_momentum`` would cause).
        Advances the step counter to ``step + 1``. Returns ``m``."""
        step = int(self.step_count) if step is None else int(step)
        m = self.teacher_momentum(step)
        ema_update(self._pairs(), m)
        self.step_count.fill_(step + 1)
        self._micro = 0
        return m

    # ------------------------------------------------------------------ loss
    def _head(self, teacher: bool, ibot: bool) -> nn.Module:
        if teacher:
            return self.teacher_ibot_head if (ibot and self.teacher_ibot_head is not None) else self.teacher_dino_head
        return self.ibot_head if (ibot and self.ibot_head is not None) else self.dino_head

    def forward(self, batch) -> tuple[Tensor, dict]:
        return self.loss(batch)

    def loss(self, batch) -> tuple[Tensor, dict]:
        """DINO + iBOT + KoLeo on one multi-crop batch ``[global_0, global_1, local_0, ...]`` (each
        ``[B, C, H, W]``) or ``(views, target)``."""
        views = split_views(batch)
        g0, g1 = views[0], views[1]
        if g0.shape != g1.shape:
            raise ValueError(f"the two global views must have the same shape, got {tuple(g0.shape)} and "
                             f"{tuple(g1.shape)}")
        locals_ = views[2:]
        B = g0.shape[0]
        step = int(self.step_count)
        t_temp = self.teacher_temperature(step)
        vit_s, vit_t = find_vit(self.student), find_vit(self.teacher)
        globals_ = torch.cat([g0, g1])                                       # [2B, C, H, W]
        P = vit_s.num_prefix_tokens

        # iBOT masks for the 2B global crops, drawn from (seed, step, rank, batch of the step): reproducible on resume,
        # and each accumulated batch of a step gets its own masks
        micro, self._micro = self._micro, self._micro + int(self.training)
        h, w = _grid(vit_s, globals_)
        mask = dinov2_masks(2 * B, (h, w), mask_probability=self.mask_probability, ratio_min=self.mask_ratio[0],
                            ratio_max=self.mask_ratio[1], mode=self.mask_mode,
                            seed=(self.seed * 1_000_003 + step) * 131 + _rank() + micro * 7_919_003).to(globals_.device)
        flat_mask = mask.flatten(1)                                          # [2B, N]
        n_masked = int(flat_mask.sum())

        # teacher: unmasked global crops
        with torch.no_grad():
            t_tok = vit_tokens(vit_t, globals_)
            t_cls = self._head(True, False)(t_tok[:, 0]).float()             # [2B, K]
            t_patch = self._head(True, True)(t_tok[:, P:][flat_mask]).float() if n_masked else None

        # student: masked global crops + unmasked local crops
        s_tok = vit_tokens(vit_s, globals_, mask=flat_mask, mask_token=self.mask_token)
        s_cls_feat = s_tok[:, 0]
        s_cls = [self._head(False, False)(s_cls_feat).float()]
        if locals_:   # one forward for all local crops when they share a size (they do from DinoV2Augment)
            if all(v.shape == locals_[0].shape for v in locals_):
                s_cls += list(self._head(False, False)(vit_tokens(vit_s, torch.cat(locals_))[:, 0]).float()
                              .chunk(len(locals_)))
            else:
                s_cls += [self._head(False, False)(vit_tokens(vit_s, v)[:, 0]).float() for v in locals_]
        s_cls_views = list(s_cls[0].chunk(2)) + s_cls[1:]
        t_cls_views = list(t_cls.chunk(2))

        # DINO
        if self.centering == "centering":
            dino = self.dino_loss(t_cls_views, s_cls_views, teacher_temp=t_temp)
        else:
            targets = _sinkhorn_targets(t_cls, t_temp, self.sinkhorn_iterations).chunk(2)
            dino = _cross_view_ce(list(targets), s_cls_views, self.student_temp)

        # iBOT
        if n_masked:
            s_patch = self._head(False, True)(s_tok[:, P:][flat_mask]).float()
            if self.centering == "centering":
                ibot = self.ibot_loss(t_patch, s_patch, mask=mask, teacher_temp=t_temp)
            else:
                q = _sinkhorn_targets(t_patch, t_temp, self.sinkhorn_iterations)
                ibot = _masked_ce(q, s_patch, mask, self.student_temp)
        else:   # nothing masked in this batch: zero, but keep the head in the graph (DDP)
            ibot = self._head(False, True)(s_tok[:1, P]).sum() * 0.0

        # KoLeo on the student CLS features of each global crop, summed over the two crops (DINOv2)
        koleo = sum(self.koleo_loss(c.float()) for c in s_cls_feat.chunk(2))

        loss = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        logs = {"dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach(), "teacher_temp": t_temp,
                "masked_fraction": n_masked / max(1, flat_mask.numel())}
        return loss, logs


def _cross_view_ce(teacher_probs: Sequence[Tensor], student_logits: Sequence[Tensor],
                   student_temp: float) -> Tensor:
    """Mean over (teacher view t, student view s != t) and batch of ``-sum q_t log softmax(z_s / T_s)``:
    DINO's loss with given teacher probabilities (the same pairing as lightly's ``DINOLoss``)."""
    total, n = 0.0, 0
    for ti, q in enumerate(teacher_probs):
        for si, z in enumerate(student_logits):
            if si == ti:
                continue
            total = total + torch.sum(-q * F.log_softmax(z / student_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def _masked_ce(q: Tensor, student_logits: Tensor, mask: Tensor, student_temp: float) -> Tensor:
    """iBOT's patch loss with given teacher probabilities, weighted as lightly's ``IBOTPatchLoss``: per-image
    mean over masked patches, summed and divided by the number of images."""
    ce = torch.sum(-q * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1)
    per_image = mask.flatten(1).sum(1, keepdim=True).clamp(min=1).float()
    weight = (1.0 / per_image).expand_as(mask.flatten(1))[mask.flatten(1)]
    return (ce * weight).sum() / mask.shape[0]


def _wraps(module: nn.Module, objective: nn.Module) -> bool:
    return module is objective or getattr(module, "_original_module", None) is objective


def dinov2_loss_fn(objective: DinoV2Objective) -> tuple[Callable, Callable]:
    """``(loss_fn, on_step)`` for ``vitadapt.train.fit(fabric, objective, loss_fn, loader, on_step=on_step)``.

    ``loss_fn(module, batch)`` calls the (Fabric-wrapped) module, so precision and DDP see the forward;
    ``on_step(step, module)`` runs the teacher EMA for that step.
    """
    def loss_fn(module, batch):
        return module(batch) if _wraps(module, objective) else objective(batch)

    def on_step(step, module):
        objective.update_teacher(step)

    return loss_fn, on_step
