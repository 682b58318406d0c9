"""finetune_classifier / select_then_test on a tiny ViT and synthetic images; the frozen-prefix split."""

import copy

import numpy as np
import pytest
import torch

import vitadapt.finetune as ft
from vitadapt.data import Splits, Subset
from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.finetune import (TensorSet, embed_tokens, evaluate, finetune_classifier, materialize, pooled_features,
                               run_blocks, select_then_test)
from vitadapt.peft.baselines import build
from vitadapt.peft.common import count_trainable
from vitadapt.vit import HeadOnly, TailViT, encode_tokens, fresh_head, meta_vit, set_drop_path

C = 4


def _splits(n_train=12, n_val=6, n_test=8):
    mk = lambda n, split: SyntheticShapes(n, size=32, style="source", split=split, n_classes=C)
    return Splits("synthetic", mk(n_train, "train"), mk(n_val, "val"), mk(n_test, "test"), list(range(C)), "test")


def _tinted(n, seed):
    """Noise images whose class is a colour tint (red, green, blue, dark): learnable by a tiny random ViT in a
    few dozen steps, unlike shapes, which it would need far more images to tell apart."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 3, 32, 32, generator=g)
    for i, c in enumerate(y.tolist()):
        if c < 3:
            x[i, c] += 1.0
        else:
            x[i] -= 1.0
    return TensorSet(x, y.tolist())


@pytest.fixture(scope="module")
def data():
    return Splits("tinted", _tinted(12 * C, 0), _tinted(6 * C, 1), _tinted(8 * C, 2), list(range(C)), "tinted noise")


def test_finetune_learns_above_chance(tiny_vit):
    torch.manual_seed(0)
    model = tiny_vit(num_classes=C)
    train, test = _tinted(64, 0), _tinted(64, 1)
    r = finetune_classifier(model, train, {"train": train, "test": test}, num_classes=C, img_size=32,
                            lr=2e-3, weight_decay=0.01, steps=50, batch_size=16, seed=0)
    assert r["acc"]["train"] > 0.9 and r["acc"]["test"] > 0.8          # chance 0.25
    assert r["steps"] == 50 and len(r["history"]) == 50 and r["trainable"] == count_trainable(model)
    assert r["history"][0]["lr"] < r["history"][5]["lr"]               # warm-up (10 % of the steps)
    assert r["history"][-1]["lr"] < 0.01 * 2e-3                        # cosine to ~0


def test_finetune_on_pil_images_with_augmentation_and_epochs(tiny_vit):
    s = _splits(4, 2, 4)
    torch.manual_seed(0)
    r = finetune_classifier(tiny_vit(num_classes=C), s.train, {"val": s.val}, num_classes=C, img_size=32, lr=1e-3,
                            epochs=2, batch_size=8, augment=True, seed=0)
    assert r["steps"] == 4 and 0 <= r["acc"]["val"] <= 1


def test_finetune_is_deterministic_given_the_seed(tiny_vit, data):
    def once():
        torch.manual_seed(0)
        m = build("rlrr", tiny_vit(num_classes=C))
        return finetune_classifier(m, data.train, {"val": data.val}, num_classes=C, img_size=32, lr=1e-2, steps=6,
                                   batch_size=8, seed=1)
    a, b = once(), once()
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]] and a["acc"] == b["acc"]


def test_finetune_bad_inputs_fail_early(tiny_vit, data):
    with pytest.raises(ValueError, match="no classification head"):
        finetune_classifier(tiny_vit(num_classes=0), data.train, {}, num_classes=C, img_size=32, lr=1e-3, steps=1)
    with pytest.raises(ValueError, match="head has 3 outputs but num_classes=4"):
        finetune_classifier(tiny_vit(num_classes=3), data.train, {}, num_classes=C, img_size=32, lr=1e-3, steps=1)
    with pytest.raises(ValueError, match="exactly one of steps= or epochs="):
        finetune_classifier(tiny_vit(num_classes=C), data.train, {}, num_classes=C, img_size=32, lr=1e-3)
    bad = TensorSet(data.train.x, [9] * len(data.train))
    with pytest.raises(ValueError, match="outside 0..3"):
        finetune_classifier(tiny_vit(num_classes=C), bad, {}, num_classes=C, img_size=32, lr=1e-3, steps=1)
    toks = TensorSet(torch.zeros(4, 17, 48), [0, 1, 2, 3], "tokens")
    with pytest.raises(ValueError, match="augment=True needs images"):
        finetune_classifier(tiny_vit(num_classes=C), toks, {}, num_classes=C, img_size=32, lr=1e-3, steps=1,
                            augment=True)


def test_selection_uses_validation_only_then_retrains_on_train_plus_val(tiny_vit, data, monkeypatch):
    calls = []
    real = ft.finetune_classifier

    def spy(model, train_ds, eval_sets, **kw):
        calls.append({"n_train": len(train_ds), "eval": sorted(eval_sets), "lr": kw["lr"], "steps": kw["steps"]})
        return real(model, train_ds, eval_sets, **kw)
    monkeypatch.setattr(ft, "finetune_classifier", spy)
    made = []

    def make_model():
        made.append(1)
        return build("lora", tiny_vit(num_classes=C))
    grid = [{"lr": 1e-5, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 0.0}]
    common = dict(img_size=32, steps=8, batch_size=8, seeds=(0, 1))
    r = select_then_test(make_model, data, grid, **common)
    # two grid points on train -> val, then one train+val -> test fit per seed
    assert [c["eval"] for c in calls] == [["val"], ["val"], ["test"], ["test"]]
    assert [c["n_train"] for c in calls] == [12 * C, 12 * C, 18 * C, 18 * C] and len(made) == 4
    assert calls[2]["steps"] == 12                                        # 8 steps x 18 / 12: the same epochs
    assert [g["lr"] for g in r["grid"]] == [1e-5, 3e-3] and len(r["test"]) == 2
    assert r["selected"][0]["lr"] == 3e-3 and r["val_acc"] == r["grid"][1]["val_acc"]
    assert r["test_acc"] == pytest.approx(np.mean([t["test_acc"] for t in r["test"]]))
    # scrambling the test labels changes nothing about the choice
    perm = np.random.default_rng(0).permutation(len(data.test))
    scrambled = Splits(data.name, data.train, data.val, TensorSet(data.test.x, np.asarray(data.test.targets)[perm]),
                       data.classes, "scrambled")
    monkeypatch.setattr(ft, "finetune_classifier", real)
    r2 = select_then_test(make_model, scrambled, grid, **common)
    assert r2["selected"] == r["selected"]
    assert [g["val_acc"] for g in r2["grid"]] == [g["val_acc"] for g in r["grid"]]


def test_grid_extras_go_to_make_model_and_select_each_seed(tiny_vit, data):
    seen = []

    def make_model(drop_path_rate=0.0):
        seen.append(drop_path_rate)
        return build("linear", tiny_vit(num_classes=C, drop_path_rate=drop_path_rate))
    grid = [{"lr": 1e-3, "weight_decay": 0.0, "drop_path_rate": 0.1}]
    r = select_then_test(make_model, data, grid, img_size=32, steps=2, batch_size=8, seeds=(0, 1),
                         select_each_seed=True, retrain_steps="same")
    assert seen == [0.1] * 4 and set(r["selected"]) == {0, 1} and [t["steps"] for t in r["test"]] == [2, 2]
    with pytest.raises(ValueError, match="lacks 'lr' or 'weight_decay'"):
        select_then_test(make_model, data, [{"lr": 1e-3}], img_size=32, steps=1)


# ---- frozen prefix / trainable tail -------------------------------------------------------------------

def test_tail_on_cached_tokens_equals_the_whole_model(tiny_vit, data):
    vit = tiny_vit(num_classes=C, depth=3).eval()
    imgs = TensorSet(data.test.x[:6], data.test.targets[:6])
    want = vit(imgs.x)
    toks = embed_tokens(vit, imgs)
    for start in (0, 1, 3):
        tail = TailViT(vit, start).eval()
        cached = run_blocks(vit.blocks[:start], toks)
        torch.testing.assert_close(tail(cached.x), want, rtol=1e-5, atol=1e-5)
    feats = pooled_features(TailViT(vit, 1), run_blocks(vit.blocks[:1], toks))
    torch.testing.assert_close(HeadOnly(vit.head)(feats.x), want, rtol=1e-5, atol=1e-5)
    assert feats.kind == "features" and feats.targets == imgs.targets


def test_peft_builders_adapt_a_tail_and_training_it_matches_a_frozen_prefix(tiny_vit, data):
    vit = tiny_vit(num_classes=C, depth=3)
    full_model = copy.deepcopy(vit)
    tail = build("rlrr", TailViT(copy.deepcopy(vit), 2))
    assert count_trainable(tail) > 0 and len(tail.blocks) == 1
    # the whole model with RLRR on the last block only and everything before it frozen, same init
    ref = copy.deepcopy(full_model)
    ref.blocks[2] = tail.blocks[0]
    ref.norm, ref.head = tail.norm, tail.head
    torch.testing.assert_close(TailViT(ref, 2)(run_blocks(ref.blocks[:2], embed_tokens(ref, data.val)).x),
                               ref(data.val.x), rtol=1e-5, atol=1e-5)
    for name in ("linear", "full", "lora", "ssf", "ia3", "ln_tuning"):
        m = build(name, TailViT(copy.deepcopy(vit), 2))
        assert count_trainable(m) > 0, name
    fresh_head(vit, 7)
    assert vit.get_classifier().out_features == 7 and vit(data.val.x[:2]).shape == (2, 7)


def test_vit_surgery_helpers(tiny_vit, data):
    vit = tiny_vit(num_classes=C, depth=3).eval()
    x = data.val.x[:2]
    # encode_tokens is the tail of timm's forward_features (after the position embedding)
    torch.testing.assert_close(encode_tokens(vit, vit._pos_embed(vit.patch_embed(x))), vit.forward_features(x))
    # set_drop_path: 0 on the first block, rising linearly to the rate on the last
    set_drop_path(vit, 0.2)
    assert isinstance(vit.blocks[0].drop_path1, torch.nn.Identity)
    assert [b.drop_path2.drop_prob for b in vit.blocks[1:]] == pytest.approx([0.1, 0.2])
    set_drop_path(vit, 0.0)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in vit.blocks)
    # meta_vit: shapes without weights, no head
    m = meta_vit("vit_tiny_patch16_224", img_size=32, depth=2)
    assert next(m.parameters()).is_meta and isinstance(m.head, torch.nn.Identity) and len(m.blocks) == 2


def test_evaluate_on_pil_needs_img_size(tiny_vit):
    s = _splits(1, 1, 1)
    m = tiny_vit(num_classes=C)
    assert 0 <= evaluate(m, s.test, img_size=32) <= 1
    with pytest.raises(ValueError, match="img_size"):
        evaluate(m, s.test)
    assert 0 <= evaluate(m, Subset(s.test, [0, 1]), img_size=32) <= 1
    t = materialize(s.test, 32)
    assert t.x.shape == (len(s.test), 3, 32, 32) and t.targets == list(s.test.targets)
    assert evaluate(m, t) == evaluate(m, s.test, img_size=32)


def test_splits_too_large_to_decode_stay_on_disk_and_still_score(monkeypatch, tiny_vit):
    """decoded() keeps a split that would not fit in MATERIALIZE_LIMIT_BYTES as PIL images (an fMoW test set would be
    32 GB of fp32 tensors); evaluate reads it batch by batch and scores it as the decoded one."""
    ds = SyntheticShapes(2, size=32, split="test")
    splits = Splits("synthetic", ds, ds, ds, [str(i) for i in range(10)], "generated")
    small = ft.decoded(splits, 32)
    assert all(isinstance(getattr(small, p), TensorSet) for p in ("train", "val", "test"))
    monkeypatch.setattr(ft, "MATERIALIZE_LIMIT_BYTES", 3 * 32 * 32 * 4 * (len(ds) - 1))
    big = ft.decoded(splits, 32)
    assert not any(isinstance(getattr(big, p), TensorSet) for p in ("train", "val", "test"))
    vit = tiny_vit(num_classes=10)
    assert evaluate(vit, big.test, 8, img_size=32) == evaluate(vit, small.test, 8)
