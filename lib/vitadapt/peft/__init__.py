"""Parameter-efficient adaptation of timm ViTs: qkv splitting, LoRA (peft), ExPLoRA trainable sets,
RLRR + SSF, counting and merging. One module per method (peft style)."""

from vitadapt.peft.common import count_total, count_trainable, freeze, trainable_names

__all__ = ["count_trainable", "count_total", "freeze", "trainable_names"]
