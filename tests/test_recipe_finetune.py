"""Issue 13, E6/E7: the MAE decoder's trainable set and the LoRA-r8 fine-tune follow the official ExPLoRA code
(samar-khanna/ExPLoRA mae/pretrain.py, finetune/finetune.py, scripts/finetune.sh; papers.RECIPES["ExPLoRA"])."""

import numpy as np
import pytest
import timm
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

import vitadapt.finetune as ft
from vitadapt import papers
from vitadapt.config import build_config
from vitadapt.data import Splits
from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.experiments import explora as E
from vitadapt.peft.common import count_trainable
from vitadapt.peft.qkv import SplitQKV
from vitadapt.protocol import lora_eval
from vitadapt.ssl.continued import PretrainSettings, objective_trainable
from vitadapt.ssl.mae import MAEObjective
from vitadapt.train import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread", "private_feature_cache")

IMG, PATCH, DIM, DEC, DEPTH = 32, 8, 64, 32, 2


def encoder():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=2,
                             embed_dim=DIM, num_heads=2, num_classes=0)


def make_mae(**kw):
    return MAEObjective(encoder(), decoder_dim=DEC, decoder_depth=DEPTH, decoder_heads=2, **kw)


@pytest.fixture(scope="module")
def paper_cfg():
    return build_config(E.ExploraConfig, "paper", "11_explora_mae", dry_run="yes")


# ------------------------------------------------------------------------------------------------ E6: MAE decoder
def test_mae_decoder_lora_on_q_and_v_only_and_its_norms_train():
    seed_everything(0)
    src = make_mae()
    sd = {k: v for k, v in src.state_dict().items() if k.startswith(("decoder_embed.", "decoder.", "decoder_pred."))}
    obj = make_mae(decoder_state_dict=sd, decoder_lora_rank=8)
    obj.encoder.load_state_dict(src.encoder.state_dict())
    for blk in obj.decoder.blocks:
        qkv = blk.attn.qkv
        assert isinstance(qkv, SplitQKV)
        assert isinstance(qkv.q, BaseTunerLayer) and isinstance(qkv.v, BaseTunerLayer)
        assert type(qkv.k) is nn.Linear and not qkv.k.weight.requires_grad          # K has no LoRA
        assert qkv.q.scaling["default"] == pytest.approx(1 / 8)                      # official alpha 1
    train = {n for n, p in obj.named_parameters() if p.requires_grad and not n.startswith("encoder.")}
    lora = {n for n in train if ".lora_" in n}
    assert lora and all(".attn.qkv.q." in n or ".attn.qkv.v." in n for n in lora), lora
    norms = {f"decoder.blocks.{i}.{m}.{w}" for i in range(DEPTH) for m in ("norm1", "norm2") for w in ("weight", "bias")}
    norms |= {"decoder.norm.weight", "decoder.norm.bias"}
    assert train == lora | norms, sorted(train ^ (lora | norms))
    for frozen in ("decoder_embed.weight", "decoder_pred.weight", "decoder.mask_token",
                   "decoder.blocks.0.attn.proj.weight", "decoder.blocks.0.mlp.fc1.weight"):
        assert not obj.get_parameter(frozen).requires_grad, frozen
    per_block = 2 * 8 * (DEC + DEC) + 2 * 2 * DEC
    assert sum(p.numel() for n, p in obj.named_parameters() if n in train) == DEPTH * per_block + 2 * DEC
    # LoRA B = 0 and the q/k/v split is exact: the adapted decoder starts as the loaded one
    obj.eval(), src.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(obj.loss(x)[0], src.loss(x)[0])
    # the trainable count of the objective (what the notebooks print) follows
    s = PretrainSettings(objective="mae", decoder_dim=DEC, decoder_depth=DEPTH, decoder_heads=2, mae_decoder="x.pth",
                         decoder_lora_rank=8)
    assert objective_trainable(s, encoder()) == DEPTH * per_block + 2 * DEC


def test_mae_decoder_lora_bad_target_fails_first():
    with pytest.raises(ValueError, match="valid targets"):
        make_mae(decoder_lora_rank=8, decoder_lora_targets=("qkv",))


# ------------------------------------------------------------------------------------------------ E7: fine-tune
def test_paper_profile_carries_the_official_values(paper_cfg):
    c = paper_cfg
    assert (c.ft_rank, c.ft_targets, c.ft_lora_alpha, c.ft_pool, c.ft_head_init_std) == (8, "q,v", 1.0, "avg", 2e-5)
    assert (c.ft_epochs, c.ft_warmup_epochs, c.ft_weight_decays, c.ft_lrs) == (120, 5, (0.0,), (5e-4,))
    assert c.ft_batch_size * c.devices * c.accumulate_grad_batches == 128
    assert (c.ft_drop_path, c.ft_label_smoothing, c.ft_head_init) == (0.2, 0.1, "fresh")
    assert (c.mask_ratio, c.decoder_lora_rank, c.decoder_dim, c.decoder_depth, c.decoder_heads) == (0.75, 8, 512, 8, 16)
    assert (c.pretrain_lr, c.pretrain_weight_decay, c.pretrain_beta2, c.grad_clip) == (1.8e-3, 0.0, 0.95, 0.0)
    assert c.pretrain_batch_size * c.devices * c.accumulate_grad_batches == 1024
    assert (c.unfreeze, c.rank, c.targets) == ("L", 64, "q,v")
    # every config field a recipe row names exists
    for r in papers.RECIPES["ExPLoRA"]:
        if r.part in ("pre-training (MAE)", "LoRA fine-tune"):
            for f in filter(None, (n.strip() for n in r.field.split(","))):
                assert hasattr(c, f), (r.what, f)
    parts = {r.part for r in papers.RECIPES["ExPLoRA"]}
    assert {"pre-training (MAE)", "LoRA fine-tune"} <= parts
    t = papers.recipe_table("ExPLoRA", c, ["LoRA fine-tune"])
    assert len(t) >= 12 and "ours (this run)" in t.columns


def test_paper_finetune_model_scale_pooling_and_head(paper_cfg):
    torch.manual_seed(0)
    vit = encoder()
    n_cls = 100
    m = lora_eval.classifier(paper_cfg, vit, n_cls)
    layers = [mod for mod in m.modules() if isinstance(mod, BaseTunerLayer)]
    assert len(layers) == 2 * len(m.blocks)
    assert all(mod.scaling["default"] == pytest.approx(1 / 8) for mod in layers)          # alpha 1, rank 8
    # the head reads the mean patch token through a fresh fc_norm; the final norm is gone
    assert m.global_pool == "avg" and isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.LayerNorm)
    assert torch.equal(m.fc_norm.weight, torch.ones(DIM)) and torch.equal(m.fc_norm.bias, torch.zeros(DIM))
    m.eval()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        tokens = m.forward_features(x)
        pooled = F.layer_norm(tokens[:, m.num_prefix_tokens:].mean(1), (DIM,), eps=m.fc_norm.eps)
        torch.testing.assert_close(m(x), pooled @ m.head.weight.T + m.head.bias)
    # head: truncated normal of std 2e-5, zero bias
    assert m.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    assert torch.count_nonzero(m.head.bias) == 0
    # trainable: LoRA + head only (fc_norm stays frozen, as officially); the source model is untouched
    assert count_trainable(m) == len(m.blocks) * 2 * 8 * (DIM + DIM) + n_cls * (DIM + 1)
    assert not m.fc_norm.weight.requires_grad
    assert vit.global_pool == "token" and isinstance(vit.norm, nn.LayerNorm)


def test_default_finetune_is_unchanged():
    cfg = build_config(E.ExploraConfig, "smoke", "11_explora_mae")
    assert (cfg.ft_lora_alpha, cfg.ft_pool, cfg.ft_head_init_std, cfg.ft_warmup_epochs) == (0.0, "cls", 0.02, 0.0)
    torch.manual_seed(0)
    m = lora_eval.classifier(cfg, encoder(), 10)
    assert m.global_pool == "token" and isinstance(m.norm, nn.LayerNorm)
    assert all(mod.scaling["default"] == 1.0 for mod in m.modules() if isinstance(mod, BaseTunerLayer))
    assert m.head.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_five_warmup_epochs_in_steps(paper_cfg):
    n = 128 * 37 + 5                                   # 37 optimizer steps of 128 per epoch
    steps = ft._steps(n, 128, None, paper_cfg.ft_epochs)
    w = lora_eval.warmup(paper_cfg, n)
    assert steps == 120 * 37 and ft._warmup_steps(w, steps) == 5 * 37
    # with the same fraction, a retrain on more images warms up over 5 of its epochs too
    assert ft._warmup_steps(w, ft._steps(128 * 50, 128, None, 120)) == 5 * 50


def _splits(n_train=8, n_val=4, n_test=4, C=4):
    mk = lambda n, split: SyntheticShapes(n, size=IMG, style="source", split=split, n_classes=C)
    return Splits("synthetic", mk(n_train, "train"), mk(n_val, "val"), mk(n_test, "test"), list(range(C)), "test")


def test_finetune_run_warms_up_for_the_configured_epochs_and_probe_head_reads_pooled_features(tmp_path, monkeypatch):
    cfg = build_config(E.ExploraConfig, "smoke", "11_explora_mae", out_dir=str(tmp_path / "out"), ft_epochs=3,
                       ft_warmup_epochs=1, ft_batch_size=8, ft_pool="avg", ft_lora_alpha=1.0, ft_head_init="probe",
                       ft_head_init_std=2e-5, probe_Cs=[0.1, 1.0], ft_augment=False, protocol="clean")
    splits = _splits()
    seen = []
    real_fit = ft.fit

    def spy(*a, **kw):
        seen.append((kw["steps"], kw["warmup"]))
        return real_fit(*a, **kw)
    monkeypatch.setattr(ft, "fit", spy)
    torch.manual_seed(0)
    vit = encoder()
    r = lora_eval.lora_finetune(cfg, vit, splits, 0)
    per_epoch = len(splits.train) // 8
    assert seen == [(3 * per_epoch, per_epoch)]            # 32 images, batch 8: 12 steps, 4 of warm-up (1 epoch)
    assert 0 <= r["test_acc"] <= 1 and "head from probe" in r["selected"]
    # the LP-FT head is fitted on what the avg-pooled classifier's head reads: its logits at step 0 are the probe's
    W, b, C = lora_eval.pooled_probe_head(cfg, vit, splits, 0)
    m = lora_eval.classifier(cfg, vit, len(splits.classes), (W, b)).eval()
    x = ft.materialize(splits.val, IMG).x
    with torch.no_grad():
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        torch.testing.assert_close(m(x), feats @ W.T + b)
        acc = float((m(ft.materialize(splits.train, IMG).x).argmax(1).numpy() == np.asarray(splits.train.targets)).mean())
    assert acc > 0.5                                        # the probe separates the training images (chance 0.25)
