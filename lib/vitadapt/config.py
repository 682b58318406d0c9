"""Experiment configuration: one dataclass per experiment, built from flat papermill parameters on top
of ``configs/<profile>.yaml``, validated before any work starts.

Order of precedence (last wins): dataclass defaults < ``defaults:`` of ``configs/<profile>.yaml`` < the
``<profile>:`` section of ``configs/notebooks/<notebook>.yaml`` < parameters passed by the notebook (``None``
means "take the profile's value"). Every bad value raises ``ValueError`` naming the value and the valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal

import yaml

from vitadapt.paths import CONFIGS, resolve

PROFILES = ("smoke", "cpu", "gpu", "paper")


class DeviceMissingError(RuntimeError):
    """The accelerator a config asks for is not on this machine (e.g. accelerator='cuda' without CUDA)."""


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and booleans: PyYAML follows YAML 1.1, where ``5e-4`` and ``1e3`` are
    strings and ``yes``/``no``/``on``/``off`` are booleans (``-p dry_run yes`` would be True, not "yes")."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.5  1.  1.5e-3
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                  # 5e-4  1e3
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str):
    """Parse YAML text the same way everywhere (config files and ``-p`` values): YAML 1.1 as PyYAML reads it,
    except that floats and booleans follow YAML 1.2: ``5e-4`` is the number 0.0005, ``yes`` is the string "yes"
    and only true/false are booleans. Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Yaml12Loader)


def opt(default: Any, help: str, *, choices: Callable[[], list] | None = None,
        min: float | None = None, max: float | None = None, yaml_only: bool = False):
    """A dataclass field with help text and validation metadata (peft style): ``choices()`` the valid values (of
    every item, for a list field), ``min``/``max`` the range (of every item)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "yaml_only": yaml_only}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def literal_values(cls: type, name: str) -> tuple:
    """The allowed values of the ``Literal[...]`` field ``name`` of config class ``cls`` (e.g. the ``choices`` of a
    list field whose items take the same values: ``choices=lambda: literal_values(Config, "gate")``)."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def _dataset_names() -> list[str]:
    from vitadapt.data import DATASETS
    return sorted(DATASETS)


def _weight_names() -> list[str]:
    from vitadapt.models import WEIGHTS
    return sorted(WEIGHTS)


@dataclass
class ExperimentConfig:
    """Fields every experiment shares: profile, data, backbone, evaluation scale and devices."""

    profile: Literal["smoke", "cpu", "gpu", "paper"] = opt("smoke", "Profile: smoke (synthetic, tiny random ViT), cpu (real weights and data, small scale), gpu (one GPU, about 1.2 h for the suite), paper (published settings).")
    dataset: str = opt("synthetic", "Labelled target dataset (a name in vitadapt.data.DATASETS).", choices=_dataset_names)
    data_root: str = opt("", "Root folder of the dataset: when given, it must hold the dataset (else an error naming it); '' uses $VITADAPT_<NAME>_ROOT when set (the same rule), else searches data/<name> and ../shared/data/<name>.")
    weights: str = opt("random", "Weight source (a name in vitadapt.models.WEIGHTS) or a path to a local checkpoint.")
    arch: str = opt("vit_tiny_patch16_224", "timm architecture name of the backbone.")
    arch_kwargs: dict = opt({}, "Extra keyword arguments for timm.create_model (depth, embed_dim, ...); YAML only.", yaml_only=True)
    img_size: int = opt(32, "Input resolution in pixels.", min=8, max=1024)
    seeds: tuple = opt((0,), "Seeds; each repeats the experiment (a different training subset and initialisation).")
    n_train_per_class: int = opt(0, "Labelled training images per class (0: all of the split).", min=0)
    n_val_per_class: int = opt(0, "Validation images per class (0: all of the split).", min=0)
    n_test_per_class: int = opt(0, "Test images per class (0: all of the split).", min=0)
    batch_size: int = opt(64, "Batch size for feature extraction and training.", min=1, max=65536)
    num_workers: int = opt(0, "DataLoader worker processes.", min=0, max=64)
    pin_memory: bool = opt(False, "DataLoader pinned host memory, for faster copies to a CUDA device (ignored where batches do not go to one).")
    persistent_workers: bool = opt(False, "Keep DataLoader worker processes alive between passes over the data (ignored when num_workers is 0).")
    feature: Literal["cls", "avg", "cls+avg"] = opt("cls+avg", "Frozen features: CLS token, mean of patch tokens, or both concatenated (DinoV2 harness).")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = opt("cpu", "Lightning Fabric accelerator.")
    devices: int = opt(1, "Devices per node (Fabric).", min=1, max=1024)
    num_nodes: int = opt(1, "Nodes (Fabric; launch with torchrun or SLURM).", min=1, max=4096)
    strategy: Literal["auto", "ddp", "ddp_notebook"] = opt("auto", "Fabric strategy: ddp with one process per device started by torchrun or SLURM; ddp_notebook forks them from the kernel for each training run; auto picks one of these.")
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = opt("32-true", "Fabric precision.")
    accumulate_grad_batches: int = opt(1, "Gradient accumulation: batches per optimizer step (effective batch = batch x devices x this).", min=1, max=4096)
    grad_checkpointing: bool = opt(False, "Activation checkpointing of the ViT blocks while training (timm's set_grad_checkpointing): less memory, about a third more compute.")
    ddp_timeout_min: int = opt(180, "Minutes a rank waits for the others in a collective (rank 0 evaluating alone) before the run fails.", min=1, max=10080)
    dry_run: Literal["no", "yes", "auto"] = opt("no", "yes: build and validate the model and data plan, then stop before training; auto: do so when the data or weights are not available here.")
    out_dir: str = opt("", "Output folder; '' means outputs/<profile>/<notebook>.")
    fallbacks: tuple = opt((), "Alternatives tried in order when this config's data or weights cannot be had here: each a mapping of field values (e.g. {dataset: aid, weights: dinov2_vits14_imgfocus}); the first whose inputs are available is used, said loudly and recorded (protocol.setup.resolve_fallbacks). YAML only.", yaml_only=True)

    # ---- validation -------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            origin = typing.get_origin(hint)
            if origin is Literal:
                allowed = typing.get_args(hint)
                if value not in allowed:
                    raise ValueError(f"{f.name}={value!r} is not valid; valid values: {', '.join(map(repr, allowed))}")
            elif hint is int or hint is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and not float(value).is_integer()):
                    raise ValueError(f"{f.name}={value!r} must be {'an integer' if hint is int else 'a number'}")
                setattr(self, f.name, hint(value))
            elif hint is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} must be True or False")
            elif hint is str and not isinstance(value, str):
                raise ValueError(f"{f.name}={value!r} must be a string")
            elif hint is tuple:
                if isinstance(value, (int, str)) and not isinstance(value, bool):
                    value = (value,)
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"{f.name}={value!r} must be a list")
                setattr(self, f.name, tuple(value))
            elif hint is dict and not isinstance(value, dict):
                raise ValueError(f"{f.name}={value!r} must be a mapping")
            value = getattr(self, f.name)
            meta = f.metadata
            if meta.get("choices") is not None:          # a list field: each of its items is one of them
                allowed = meta["choices"]()
                if bad := [v for v in (value if hint is tuple else (value,)) if v not in allowed]:
                    what = f"{list(value)!r}: {bad}" if hint is tuple else f"{value!r}"
                    raise ValueError(f"{f.name}={what} is not valid; valid values: {', '.join(allowed)}")
            lo, hi = meta.get("min"), meta.get("max")
            items = value if isinstance(value, tuple) else (value,)
            for v in items:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if (lo is not None and v < lo) or (hi is not None and v > hi):
                        raise ValueError(f"{f.name}={value!r} is out of range; valid: {lo} <= {f.name} <= {hi}")
        if not self.seeds:
            raise ValueError("seeds=() is empty; give at least one seed, e.g. seeds=[0, 1, 2]")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise ValueError(f"seeds={self.seeds!r}: every seed must be an integer")
        self._validate_weights()
        self._validate_fallbacks()
        self.check()

    def _validate_fallbacks(self) -> None:
        names = {f.name for f in fields(self)} - {"profile", "fallbacks", "out_dir"}
        for i, alt in enumerate(self.fallbacks):
            if not isinstance(alt, dict) or not alt:
                raise ValueError(f"fallbacks[{i}]={alt!r} must be a non-empty mapping of field values")
            if bad := sorted(set(alt) - names):
                raise ValueError(f"fallbacks[{i}]: unknown field(s) {bad}; valid: {', '.join(sorted(names))}")

    def device_needs(self) -> dict[str, Callable[[], object]]:
        """The devices a real run needs, as probes for the dry-run decision (each raises
        :class:`DeviceMissingError`): a CUDA device when ``accelerator`` is cuda or gpu."""
        if self.accelerator not in ("cuda", "gpu"):
            return {}

        def cuda() -> None:
            import torch
            if not torch.cuda.is_available():
                raise DeviceMissingError(f"no CUDA device (accelerator={self.accelerator!r}, "
                                         f"torch.cuda.is_available() is False); run on a GPU machine or use "
                                         f"the cpu profile")
        return {"CUDA device": cuda}

    def _validate_weights(self) -> None:
        names = _weight_names()
        if self.weights in names:
            return
        if resolve(self.weights).is_file():
            return
        raise ValueError(f"weights={self.weights!r} is neither a known weight source nor an existing file; "
                         f"valid sources: {', '.join(names)}, or a path to a local checkpoint")

    def check(self) -> None:
        """Experiment-specific cross-field checks; subclasses override."""

    @property
    def data_size(self) -> int:
        """The size images are decoded at (at least 32 px, so tiny smoke inputs can still be cropped)."""
        return max(self.img_size, 32)

    # ---- helpers ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default and help text."""
        lines = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{f.name} = {default!r}  # {f.metadata.get('help', '')}")
        return "\n".join(lines)


def load_profile(profile: str, notebook: str | None = None) -> dict:
    """The profile's values for one notebook: ``defaults`` of configs/<profile>.yaml, then the ``<profile>:``
    section of configs/notebooks/<notebook>.yaml."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not valid; valid values: {', '.join(PROFILES)}")
    path = CONFIGS / f"{profile}.yaml"
    data = load_yaml(path.read_text()) or {}
    unknown = set(data) - {"defaults"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: defaults (per-notebook values "
                         f"go in configs/notebooks/<notebook>.yaml)")
    merged = dict(data.get("defaults") or {})
    if notebook is not None:
        per_nb = CONFIGS / "notebooks" / f"{notebook}.yaml"
        if per_nb.exists():
            nb_data = load_yaml(per_nb.read_text()) or {}
            unknown = set(nb_data) - set(PROFILES)
            if unknown:
                raise ValueError(f"{per_nb}: unknown top-level keys {sorted(unknown)}; valid: {', '.join(PROFILES)}")
            merged.update(nb_data.get(profile) or {})
    return merged


def build_config(cls: type[ExperimentConfig], profile: str = "smoke", notebook: str | None = None,
                 **params) -> ExperimentConfig:
    """Build and validate ``cls`` for ``profile``: profile YAML first, then non-None ``params``.

    Keys in the YAML that ``cls`` does not have are ignored (a profile serves many notebooks);
    unknown ``params`` are an error, since they come from the notebook's own parameters cell.
    """
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in params if k not in names)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {cls.__name__}; valid parameters: {', '.join(sorted(names))}")
    values = {k: v for k, v in load_profile(profile, notebook).items() if k in names}
    values.update({k: v for k, v in params.items() if v is not None})
    values["profile"] = profile
    if not values.get("out_dir") and notebook:          # ranks other than 0 write under outputs/<profile>/.ranks/
        from vitadapt.paths import output_dir, shown
        values["out_dir"] = shown(output_dir(profile, notebook))
    return cls(**values)
