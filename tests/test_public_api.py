"""The public face of vitadapt.peft: the README's "The methods on any timm ViT" blocks run as written (ViT-S/16,
random weights, well under a second each), their trainable counts are the methods' and the README's, and the
merged model is a plain timm ViT again; the names import from ``vitadapt.peft``; LoRA is injected in one place."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import vitadapt.peft as vp
from vitadapt.peft.common import count_trainable

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## The methods on any timm ViT"
METHODS = {"merge_explora": "explora", "merge_rlrr": "rlrr", "merge_lora": "lora"}


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_one_block_per_method():
    merges = [m for b in readme_blocks() for m in METHODS if f"{m}(vit)" in b]
    assert sorted(merges) == sorted(METHODS)


# ---- what each method should train, from the model's shapes (not from count_trainable) -------------------
def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _head(vit) -> int:
    return _numel(vit.head) if not isinstance(vit.head, torch.nn.Identity) else 0


def expected_trainable(method: str, ref, config: dict | None) -> int:
    """``ref``: the untouched timm ViT; ``config``: the ``*_config`` the method stored (ExPLoRA, LoRA)."""
    depth, dim = len(ref.blocks), ref.embed_dim
    hidden = ref.blocks[0].mlp.fc1.out_features
    if method == "explora":   # unfrozen blocks in full; LoRA on the others' q/k/v; every other LayerNorm; CLS
        assert set(config["targets"]) <= {"q", "k", "v"}, "the formula here covers attention-input targets only"
        unfrozen = config["unfreeze_blocks"]
        lora = (depth - len(unfrozen)) * len(config["targets"]) * config["rank"] * (dim + dim)
        norms = (depth - len(unfrozen)) * 2 * 2 * dim + 2 * dim
        return sum(_numel(ref.blocks[i]) for i in unfrozen) + lora + norms + dim
    if method == "lora":      # rank (in + out) per targeted Linear of every block, and the head
        assert set(config["targets"]) <= {"q", "k", "v"}
        head = _head(ref) if config["train_head"] else 0
        return depth * len(config["targets"]) * config["rank"] * (dim + dim) + head
    if method == "rlrr":      # official setting: in + 2 out per Linear (qkv as 3), SSF after norms and patch embed
        per_block = 3 * (dim + 2 * dim) + (dim + 2 * dim) + (dim + 2 * hidden) + (hidden + 2 * dim)
        return depth * per_block + (2 * depth + 1) * 2 * dim + 2 * dim + _head(ref)
    raise AssertionError(method)


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: next((METHODS[m] for m in METHODS if m in b), "?"))
def test_readme_block_runs_and_gives_a_plain_timm_vit(block, monkeypatch):
    method_merge = next(m for m in METHODS if f"{m}(vit)" in block)
    method = METHODS[method_merge]
    seen = {}
    real_merge = getattr(vp, method_merge)

    def spy(model, *a, **kw):   # what the model holds right before the README merges it
        seen["trainable"] = count_trainable(model)
        seen["config"] = dict(getattr(model, f"{method}_config", None) or {})
        return real_merge(model, *a, **kw)

    monkeypatch.setattr(vp, method_merge, spy)
    namespace: dict = {}
    exec(compile(block, f"README.md[{method}]", "exec"), namespace)
    assert "trainable" in seen, f"the README block never called {method_merge}"

    # the untouched model: the block's own `vit = timm.create_model(...)` line, run again
    create = next(line for line in block.splitlines() if line.startswith("vit = timm.create_model("))
    ref_ns = {"timm": timm}
    exec(create, ref_ns)
    ref = ref_ns["vit"]

    # the count the README states on the apply_* line, the count the method should give, the count measured
    apply_line = next(line for line in block.splitlines() if line.startswith("apply_"))
    stated = re.search(r"#\s*([\d,]+) trainable", apply_line)
    assert stated, f"the README's apply line states no count: {apply_line!r}"
    want = expected_trainable(method, ref, seen["config"])
    assert seen["trainable"] == want == int(stated.group(1).replace(",", ""))

    # merged: a plain timm ViT of the same class, the same state-dict keys and shapes, loading strictly
    vit = namespace["vit"]
    assert type(vit) is type(ref)
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ref.load_state_dict(vit.state_dict(), strict=True)
    assert not hasattr(vit, f"{method}_config")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert vit.eval()(x).shape == ref.eval()(x).shape


# ---- the names -----------------------------------------------------------------------------------------
def test_public_names_are_the_submodules_functions():
    from vitadapt.peft import (apply_explora, apply_lora, apply_rlrr, apply_ssf, count_total,  # noqa: F401
                               count_trainable, freeze, fuse_qkv, inject_lora, merge_explora, merge_lora, merge_rlrr,
                               merge_ssf, split_qkv)
    from vitadapt.peft import explora, lora, qkv, rlrr
    assert (apply_explora, merge_explora) == (explora.apply_explora, explora.merge_explora)
    assert (apply_lora, merge_lora, inject_lora) == (lora.apply_lora, lora.merge_lora, lora.inject_lora)
    assert (apply_rlrr, merge_rlrr, apply_ssf, merge_ssf) == (rlrr.apply_rlrr, rlrr.merge_rlrr, rlrr.apply_ssf,
                                                              rlrr.merge_ssf)
    assert (split_qkv, fuse_qkv) == (qkv.split_qkv, qkv.fuse_qkv)
    for name in vp.__all__:
        assert getattr(vp, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'apply_nothing'"):
        vp.apply_nothing  # noqa: B018


def test_importing_vitadapt_peft_loads_neither_timm_nor_peft():
    code = ("import sys, vitadapt.peft, vitadapt.peft.common; "
            "print(sorted(m for m in ('timm', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lora_is_injected_in_one_place():
    """Only vitadapt/peft/lora.py builds a peft LoraConfig or calls inject_adapter_in_model for LoRA."""
    lib = ROOT / "lib" / "vitadapt"
    callers = []
    for path in sorted(lib.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name == "LoraConfig":
                    callers.append(str(path.relative_to(lib)))
    assert callers == ["peft/lora.py"], callers
