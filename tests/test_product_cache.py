"""Trained products shared across notebooks and reruns (vitadapt.protocol.products): ExPLoRA's pre-trained
backbones and UpStep's adapted ones are loaded, not trained again, when everything that determines them is the same
(an evaluation-only field changed), and trained again when anything that does changed; the record keeps the measured
cost and says it came from the cache; a diverged run is never stored."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch

from vitadapt import train
from vitadapt.config import ExperimentConfig, build_config
from vitadapt.experiments import explora as E
from vitadapt.experiments import upstep as U
from vitadapt.protocol import lora_eval, official_probe, products, selection
from vitadapt.ssl import continued

pytestmark = pytest.mark.usefixtures("one_thread", "private_feature_cache")

FAST = dict(n_train_per_class=4, n_val_per_class=2, n_test_per_class=3, probe_Cs=[1.0], knn_ks=[3], pretrain_steps=2,
            pretrain_batch_size=4, pretrain_lr=0.01, seeds=[0], ft_steps=2, ft_batch_size=8, n_pretrain_images=16)


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """Both caches on, in a temporary VITADAPT_CACHE."""
    monkeypatch.setenv("VITADAPT_CACHE", str(tmp_path / "products"))
    monkeypatch.setenv("VITADAPT_PRETRAIN_CACHE", "1")
    monkeypatch.setenv("VITADAPT_UPSTEP_CACHE", "1")
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "products"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("explora")
    return build_config(E.ExploraConfig, "smoke", "10_explora_dinov2", out_dir=str(out), **FAST)


@pytest.fixture(scope="module")
def base(cfg):
    return E.load_base(cfg, verbose=False)


def _other(v):
    """A different value of the same kind (validation is not the point here: the key only reads fields)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, tuple):
        return v + (v[0],) if v else ("x",)
    if isinstance(v, dict):
        return {**v, "x": 1}
    raise TypeError(f"no other value for {v!r}")


def _changed(cfg, name):
    c = copy.copy(cfg)
    object.__setattr__(c, name, _other(getattr(cfg, name)))
    return c


def _fields(cls):
    return [f.name for f in dataclasses.fields(cls)]


def _eval_only_explora():
    own = {f for cls in (lora_eval.LoraFinetuneSettings, selection.ProtocolSettings,
                         official_probe.OfficialProbeSettings) for f in _fields(cls)}
    return sorted(own | {"probe_Cs", "knn_ks", "finetune", "variants", "ablate_unfreeze", "ablate_rank",
                         "ablate_targets", "ablate_norms", "interactive", "n_val_per_class", "n_test_per_class",
                         "seeds", "out_dir", "dry_run", "ddp_timeout_min", "feature"})


# ---- the keys ------------------------------------------------------------------------------------------------

def test_pretrain_key_changes_with_every_determinant_and_no_evaluation_field(cfg, base):
    pool = E.pretrain_pool(cfg, 0)
    key = lambda c=cfg, variant="explora", seed=0, model=base[0], dec=None, p=pool: products.digest(  # noqa: E731
        E.pretrain_key(c, variant, seed, model, dec, p))
    k0 = key()
    determinants = _fields(continued.PretrainSettings) + list(E.TRAINABLE_SET) + list(products.NUMERICS) + \
        ["n_pretrain_images", "pretrain_dataset"]
    for name in determinants:
        assert key(_changed(cfg, name)) != k0, f"{name} is not in the pre-training key"
    for name in _eval_only_explora():
        assert key(_changed(cfg, name)) == k0, f"evaluation-only field {name} changes the pre-training key"
    other = copy.deepcopy(base[0])
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert key(variant="full") != k0 and key(seed=1) != k0 and key(model=other) != k0
    assert key(dec={"w": torch.ones(2)}) != key(dec={"w": torch.zeros(2)}) != k0
    assert key(p=(pool[0], pool[1][::-1])) != k0        # other images (here: another order)
    assert E.pretrain_key(cfg, "explora", 0, base[0], None, pool) == E.pretrain_key(cfg, "explora", 0, base[0])


def test_upstep_key_changes_with_every_determinant_and_no_evaluation_field(tiny_vit):
    cfg = _upstep_cfg()
    model, images = tiny_vit(), (_pool(cfg), list(range(8)))
    key = lambda c=cfg, seed=0, m=model, im=images, d="synthetic": products.digest(  # noqa: E731
        U.adaptation_key(c, m, im, seed, d))
    k0 = key()
    own = [f for f in _fields(U.UpStepConfig) if f not in _fields(ExperimentConfig)]
    for name in [f for f in own if f not in U.EVAL_ONLY] + list(products.NUMERICS):
        assert key(_changed(cfg, name)) != k0, f"{name} is not in the UpStep key"
    for name in [*U.EVAL_ONLY, "n_train_per_class", "seeds", "out_dir", "feature"]:
        assert key(_changed(cfg, name)) == k0, f"evaluation-only field {name} changes the UpStep key"
    assert key(seed=1) != k0 and key(im=(images[0], list(range(1, 9)))) != k0 and key(d="digits") != k0
    assert key(m=tiny_vit(depth=3)) != k0


def test_sources_and_switches(monkeypatch):
    assert products.source_digest(E.PRETRAIN_SOURCES) != products.source_digest(U.UPSTEP_SOURCES)
    with pytest.raises(ValueError, match="not a file or folder"):
        products.source_digest(["nowhere.py"])
    with pytest.raises(ValueError, match="valid values"):
        products.enabled("features")
    monkeypatch.setenv("VITADAPT_PRETRAIN_CACHE", "maybe")
    with pytest.raises(ValueError, match="VITADAPT_PRETRAIN_CACHE"):
        products.enabled("pretrained")
    monkeypatch.setenv("VITADAPT_PRETRAIN_CACHE", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")                 # torchrun: off (ranks would have to agree on a hit)
    assert not products.enabled("pretrained")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert products.enabled("pretrained")
    assert {"python", "torch", "timm"} <= set(products.environment())


def test_files_digest_counts_names_and_bytes(tmp_path):
    """The one digest of source files (product keys, the runner's code hash): a renamed or edited file changes it."""
    from vitadapt.paths import files_digest
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("x = 1\n")
    assert files_digest([a], tmp_path) != files_digest([b], tmp_path)
    before = files_digest([a, b], tmp_path)
    b.write_text("x = 2\n")
    assert files_digest([a, b], tmp_path) != before
    assert products.file_digest(tmp_path / "missing.pt") is None
    assert products.file_digest(a) == products.file_digest(b.with_name("a.py")) and len(products.file_digest(a)) == 20


# ---- ExPLoRA: a second run loads -----------------------------------------------------------------------------

def _no_training(*a, **k):
    raise AssertionError("trained although the product is cached")


def test_pretrain_is_loaded_for_an_evaluation_only_change(cfg, base, cache_on, monkeypatch, tmp_path):
    first = E.pretrain_variant(cfg, "explora", 0, base, label="explora", ckpt=tmp_path / "job.ckpt")
    assert first.record["cached"] is False and first.record["wall_time_s"] > 0
    assert len(list((cache_on / "pretrained").glob("*.pt"))) == 1
    monkeypatch.setattr(train, "fit", _no_training)
    other = dataclasses.replace(cfg, probe_Cs=(0.5, 2.0), finetune=False, ft_steps=3, n_test_per_class=5,
                                variants=("frozen", "explora"), ablate_rank=(16,))
    again = E.pretrain_variant(other, "explora", 0, base, label="default U=[L] r=4")   # notebook 12's default row
    assert again.record["cached"] is True and again.record["cache_key"] == first.record["cache_key"]
    assert again.variant == again.record["variant"] == "default U=[L] r=4"
    for k in ("wall_time_s", "steps", "images_seen", "peak_memory_mb", "final_loss", "trainable_backbone"):
        assert again.record[k] == first.record[k], k          # the measured cost, not the load
    assert {h["variant"] for h in again.history} == {"default U=[L] r=4"}
    cost = E.cost_table(pd.DataFrame([first.record, again.record]))    # the measured time, and a count of loads
    assert cost[products.LOADED].tolist() == [0, 1] and cost["wall_time_s"].nunique() == 1
    assert products.LOADED not in E.cost_table(pd.DataFrame([first.record]))
    assert [h["loss"] for h in again.history] == [h["loss"] for h in first.history]
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    assert torch.equal(first.model(x), again.model(x)) and not again.model.training
    # anything that determines the result trains again (fit is reached)
    for changed in (dataclasses.replace(cfg, pretrain_lr=0.02), dataclasses.replace(cfg, rank=2),
                    dataclasses.replace(cfg, koleo_weight=0.0)):
        with pytest.raises(AssertionError, match="trained although"):
            E.pretrain_variant(changed, "explora", 0, base)
    # the synthetic pool's size follows n_train_per_class: other images, so another product (the drawn items' digest)
    for variant, seed, c in (("lora_only", 0, cfg), ("explora", 1, cfg),
                             ("explora", 0, dataclasses.replace(cfg, n_train_per_class=5))):
        with pytest.raises(AssertionError, match="trained although"):
            E.pretrain_variant(c, variant, seed, base)
    monkeypatch.setenv("VITADAPT_PRETRAIN_CACHE", "0")
    with pytest.raises(AssertionError, match="trained although"):
        E.pretrain_variant(cfg, "explora", 0, base)


def test_a_diverged_pretraining_is_not_stored(cfg, base, cache_on, monkeypatch):
    def diverge(*a, **k):
        raise train.Diverged("loss is nan", 1, 0.01, 0.01, {})
    monkeypatch.setattr(train, "fit", diverge)
    with pytest.raises(train.Diverged):
        E.pretrain_variant(cfg, "full", 0, base)
    assert not list(cache_on.rglob("*.pt"))


def test_unreadable_or_foreign_file_is_rebuilt(cfg, base, cache_on):
    pool = E.pretrain_pool(cfg, 0)
    store = products.ProductCache("pretrained", E.pretrain_key(cfg, "explora", 0, base[0], None, pool))
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.load() is None
    products.ProductCache("pretrained", {"other": 1}).save({"x": 1})
    import shutil
    shutil.copy(products.ProductCache("pretrained", {"other": 1}).path, store.path)
    assert store.load() is None                          # another key's payload under this name


def test_mae_decoder_warmup_is_loaded_not_trained_again(cfg, base, cache_on, monkeypatch, tmp_path):
    mae = build_config(E.ExploraConfig, "smoke", "11_explora_mae", out_dir=str(tmp_path / "out"),
                       **{**FAST, "decoder_warmup_steps": 2})
    mae_base = E.load_base(mae, verbose=False)
    dec = E.warm_decoder(mae, mae_base[0], 0)
    monkeypatch.setattr(continued, "warm_decoder", _no_training)
    again = E.warm_decoder(mae, mae_base[0], 0)                 # a rerun (or notebook 12) loads it
    assert again.keys() == dec.keys() and all(torch.equal(again[k], dec[k]) for k in dec)
    assert E.warm_decoder(cfg, base[0], 0) is None                # DinoV2: nothing to warm, nothing stored
    for changed in (dataclasses.replace(mae, decoder_warmup_steps=3), dataclasses.replace(mae, decoder_warmup_lr=0.5)):
        with pytest.raises(AssertionError, match="trained although"):
            E.warm_decoder(changed, mae_base[0], 0)
    with pytest.raises(AssertionError, match="trained although"):
        E.warm_decoder(mae, mae_base[0], 1)


# ---- UpStep: a second run loads ------------------------------------------------------------------------------

def _upstep_cfg(**kw) -> U.UpStepConfig:
    base = dict(domains=["synthetic"], seeds=[0], steps=2, adapt_batch_size=8, n_train_per_class=4,
                n_val_per_class=2, n_test_per_class=3, forgetting_n_train_per_class=3, forgetting_n_val_per_class=2,
                forgetting_n_test_per_class=3, probe_Cs=[1.0], knn_ks=[3], n_prototypes=8, head_hidden_dim=16,
                head_out_dim=8, lora_rank=2, arch_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2})
    return build_config(U.UpStepConfig, "smoke", None, **{**base, **kw})


def _pool(cfg):
    return U.domain_splits(cfg, "synthetic", 0).train.base


def test_upstep_adaptation_is_loaded_for_an_evaluation_only_change(cache_on, monkeypatch):
    cfg = _upstep_cfg()
    from vitadapt.protocol.setup import backbone
    model, info = backbone(cfg, verbose=False)
    first = U.run_domain_seed(cfg, model, info, "synthetic", 0)["runs"]
    assert first["cached"] is False and first["backward_passes"] == 1
    monkeypatch.setattr(train, "fit", _no_training)
    other = dataclasses.replace(cfg, probe_Cs=(0.5,), knn_ks=(2,), ensemble_modes=("concat",),
                                forgetting_n_test_per_class=4, ablate_rank=(16,))
    out = U.run_domain_seed(other, model, info, "synthetic", 0, variant="default")
    again = out["runs"]
    assert again["cached"] is True and again["cache_key"] == first["cache_key"] and again["variant"] == "default"
    for k in ("wall_time_s", "backward_passes", "skipped", "steps", "trainable_params", "trainable_backbone",
              "final_cv_norm"):
        assert again[k] == first[k], k
    assert again["eval_wall_time_s"] >= 0 and out["history"] and "cached" in out["log"]
    cost = U.cost_table(pd.DataFrame([first, again]), by="variant")
    assert cost[products.LOADED].tolist() == [0, 1] and cost["wall_time_s"].nunique() == 1
    images = U.adaptation_pool(cfg, "synthetic", 0)
    assert U.adapt_or_load(cfg, model, images, 0, "synthetic").cached
    for changed in (dataclasses.replace(cfg, steps=3), dataclasses.replace(cfg, gate="none"),
                    dataclasses.replace(cfg, lora_rank=4)):
        with pytest.raises(AssertionError, match="trained although"):
            U.adapt_or_load(changed, model, images, 0, "synthetic")


def test_upstep_loaded_model_equals_the_trained_one(cache_on, tiny_vit):
    cfg = _upstep_cfg()
    model, images = tiny_vit(), (_pool(cfg), list(range(8)))
    first = U.adapt_or_load(cfg, model, images, 0, "synthetic")
    again = U.adapt_or_load(cfg, model, images, 0, "synthetic")
    assert not first.cached and again.cached
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k]) for k in a)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    assert torch.allclose(first.model.cpu().eval()(x), again.model(x))
    assert again.result.history == first.result.history and again.result.wall_time_s == first.result.wall_time_s
