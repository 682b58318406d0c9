"""Set-up shared by every notebook: the config, torch, the run record, the dry-run decision, data and backbone.

A notebook's second cell is ``S = start(NOTEBOOK, Config, profile, **parameters)``; ``S.cfg`` is the validated
config, ``S.run`` the :class:`~vitadapt.results.Run` (outputs written atomically), ``S.dry`` why the run stops
before training (``None``: it runs). Data and weight sources are recorded with :meth:`Setup.use`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from vitadapt.config import DeviceMissingError, ExperimentConfig, build_config
from vitadapt.data import DataMissingError, Splits, get_dataset, subsample


def setup_torch(threads: int | None = None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(False)


def brief(err, limit: int = 160) -> str:
    """An error's first clause (up to ';'), cut at ``limit`` characters with a visible '…' (a dry-run reason)."""
    text = str(err).split(";")[0].strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def dataset(cfg: ExperimentConfig, name: str | None = None, download: bool = True, sized: bool = True) -> Splits:
    """The whole splits of dataset ``name`` (default ``cfg.dataset``; ``kind:task`` for VTAB-1k / FGVC tasks) at
    ``cfg.data_size``; ``cfg.data_root`` applies to ``cfg.dataset`` only. ``sized``: the config's per-class sizes
    go to the source (the generated synthetic sets size their pools by them); False: the source's default pool."""
    name = name or cfg.dataset
    kw = dict(size=cfg.data_size, seed=0, download=download)
    if sized:
        kw.update(n_train_per_class=cfg.n_train_per_class, n_val_per_class=cfg.n_val_per_class,
                  n_test_per_class=cfg.n_test_per_class)
    if ":" in name:
        kind, task = name.split(":", 1)
        return get_dataset(kind, task=task, **kw)
    return get_dataset(name, root=cfg.data_root if name == cfg.dataset else "", **kw)


def labelled(cfg: ExperimentConfig, seed: int, name: str | None = None,
             n_per_class: tuple[int, int, int] | None = None, sized: bool = True) -> Splits:
    """The labelled splits for ``seed``: per-class subsets (train varies with the seed; val and test do not) of
    ``n_per_class`` = (train, val, test) images, default the config's (``sized``: see :func:`dataset`)."""
    splits = dataset(cfg, name, sized=sized)
    n = n_per_class or (cfg.n_train_per_class, cfg.n_val_per_class, cfg.n_test_per_class)
    return subsample(splits, seed, *n) if splits.classes else splits


def backbone(cfg: ExperimentConfig, weights: str | None = None, arch_kwargs: dict | None = None,
             arch: str | None = None, **kw):
    """``(model, info)`` of ``weights`` (default ``cfg.weights``) on ``arch`` (default ``cfg.arch``) at
    ``cfg.img_size``."""
    from vitadapt.models import create_backbone
    return create_backbone(weights or cfg.weights, arch or cfg.arch, cfg.img_size,
                           cfg.arch_kwargs if arch_kwargs is None else arch_kwargs, **kw)


def record_sources(run, weights: dict | None = None, sources: dict | None = None,
                   summary: dict | None = None) -> None:
    """Record where a run's inputs come from in ``run`` (a :class:`~vitadapt.results.Run` or :class:`Setup`), in
    this order: ``weights`` (a backbone's info) under "weights"; each of ``sources`` ({key: a :class:`Splits`,
    recorded by its ``record()``, or a dict}); ``summary`` under "data", the one line 90_results shows (dataset
    names and sources) where a run reads several datasets. None is left out."""
    for key, rec in [("weights", weights), *(sources or {}).items(), ("data", summary)]:
        if rec is not None:
            run.use(key, rec.record() if isinstance(rec, Splits) else rec)


def chance(splits: Splits) -> float:
    return 1.0 / max(1, len(splits.classes))


def check_dataset(field: str, *names, exclude: tuple = ()) -> None:
    """A config check: each of ``names`` (the values of config field ``field``) is a registered dataset (not one of
    ``exclude``, e.g. an unlabelled one) or ``vtab1k:<task>`` / ``fgvc:<task>`` of a known task; else a ValueError
    naming the valid ones. Nothing is read."""
    from vitadapt.data import DATASETS
    from vitadapt.data.vtab import FGVC_TASKS, VTAB1K_TASKS
    tasks = {"vtab1k": VTAB1K_TASKS, "fgvc": FGVC_TASKS}
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{field}: {name!r} must be a dataset name (string)")
        kind, _, task = name.rpartition(":")           # "" for a plain dataset name
        plain = [n for n in DATASETS if n not in (*tasks, *exclude)]
        if task not in (tasks[kind] if kind in tasks else [] if kind else plain):
            raise ValueError(f"{field}: {name!r} is not valid; valid values: "
                             f"{', '.join(sorted(set(DATASETS) - {*tasks, *exclude}))}, "
                             f"vtab1k:<{'|'.join(VTAB1K_TASKS)}> or fgvc:<{'|'.join(FGVC_TASKS)}>")


def weights_or_random(cfg: ExperimentConfig, load: Callable[..., tuple]) -> tuple:
    """``load()`` (a backbone with ``cfg.weights``); where those weights cannot be had here (a dry run checking
    shapes), says so and returns ``load(weights="random", arch=...)``: their architecture, with random weights."""
    from vitadapt.models import WEIGHTS, WeightsMissingError
    try:
        return load()
    except WeightsMissingError as e:
        print(f"weights {cfg.weights!r} not available here ({brief(e)}); building {cfg.arch} with random weights")
        return load(weights="random", arch=getattr(WEIGHTS.get(cfg.weights), "arch", None))


def check_forward(model, adapts: list[Callable], img_size: int) -> None:
    """A dry run's shape check: each ``adapt`` (e.g. a PEFT method) applied to a copy of ``model`` builds and maps a
    blank ``img_size`` image to an output of the model's own shape."""
    import copy
    x = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad():
        shape = model.eval()(x).shape
        for adapt in adapts:
            out = adapt(copy.deepcopy(model)).eval()(x)
            assert out.shape == shape, (out.shape, shape)


def dry_run_reason(cfg: ExperimentConfig, needs: dict[str, Callable[[], object]] | None = None) -> str | None:
    """Why the run stops after building and validating (None: it runs). ``dry_run="auto"`` probes, without
    downloading, each of ``needs`` ({what: probe}; default ``cfg.needs()``, else the dataset) and, for hub
    weights, the timm hub."""
    if cfg.dry_run == "yes":
        return "dry_run='yes'"
    if cfg.dry_run == "no":
        return None
    missing = device_problems(cfg) + unavailable(cfg, needs)
    return ("not available here: " + "; ".join(missing)) if missing else None


def _data_needs(cfg: ExperimentConfig) -> dict[str, Callable[[], object]]:
    return cfg.needs() if hasattr(cfg, "needs") else {f"dataset {cfg.dataset!r}": lambda: dataset(cfg, download=False)}


def device_problems(cfg: ExperimentConfig) -> list[str]:
    """What of ``cfg.device_needs()`` (e.g. a CUDA device) this machine lacks, one line each ("no CUDA device ...")."""
    out = []
    for probe in cfg.device_needs().values():
        try:
            probe()
        except DeviceMissingError as e:
            out.append(str(e))
    return out


def unavailable(cfg: ExperimentConfig, needs: dict[str, Callable[[], object]] | None = None) -> list[str]:
    """What ``cfg`` reads that cannot be had here, one line each (empty: everything can): each of its data probes
    (``needs``, default ``cfg.needs()``; nothing downloaded; a torchgeo set that is not here passes when its server
    is reachable, since a real run downloads it) and hub weights neither in the local cache nor reachable."""
    from vitadapt.models import WEIGHTS, hub_available
    missing = []
    for what, probe in (_data_needs(cfg) if needs is None else needs).items():
        try:
            probe()
        except (DataMissingError, FileNotFoundError) as e:
            missing.append(f"{what} ({brief(e, 140)})")
    src = WEIGHTS.get(cfg.weights)
    if src is not None and src.kind == "hub" and not hub_available(cfg.weights):
        missing.append(f"weights {cfg.weights!r} (need the timm hub, not reachable from here, nor in the local "
                       f"Hugging Face cache)")
    return missing


def _data_used(cfg: ExperimentConfig):
    """The labelled data a config reads: its ``tasks`` (RLRR) or ``domains`` (UpStep), else its ``dataset``."""
    return list(getattr(cfg, "tasks", None) or getattr(cfg, "domains", None) or [cfg.dataset])


def _inputs(cfg: ExperimentConfig) -> dict:
    return {"data": _data_used(cfg), "weights": cfg.weights, "arch": cfg.arch}


def resolve_fallbacks(cfg: ExperimentConfig, explicit: tuple = (), say: Callable[[str], None] = print
                      ) -> tuple[ExperimentConfig, dict | None]:
    """The config to run and what was decided: ``cfg`` itself when it has no ``fallbacks`` (record None) or its
    inputs are available here (:func:`unavailable`), else the first of ``cfg.fallbacks`` (each a mapping of field
    values laid over ``cfg``; one that changes a field in ``explicit``, given by the caller, is not tried) whose
    inputs are. A fallback is said loudly (``say`` and a warning); the record (kept under "fallback" in
    metrics.json) names the dataset and weights used, the alternative chosen and why. When nothing is available,
    ``cfg`` is kept and the dry-run decision says what is missing."""
    if not cfg.fallbacks:
        return cfg, None
    first = unavailable(cfg)
    rec = {"configured": _inputs(cfg), "fallback": None, "reason": "", "dataset_used": _data_used(cfg),
           "weights_used": cfg.weights}
    if not first:
        return cfg, rec
    tried = []
    for i, alt in enumerate(cfg.fallbacks):
        if clash := sorted(set(alt) & set(explicit)):
            tried.append(f"fallbacks[{i}] not tried: it changes {clash}, given explicitly")
            continue
        cand = dataclasses.replace(cfg, **alt)
        if gaps := unavailable(cand):
            tried.append(f"fallbacks[{i}] {alt}: also not available ({'; '.join(gaps)})")
            continue
        rec.update(fallback=i, overrides=dict(alt), dataset_used=_data_used(cand), weights_used=cand.weights,
                   reason="not available here: " + "; ".join(first), tried=tried)
        bar = "!" * 8
        msg = (f"FALLBACK: the {cfg.profile} profile's inputs are not available here ({'; '.join(first)}). "
               f"USING fallbacks[{i}] INSTEAD: {', '.join(f'{k}={v!r}' for k, v in alt.items())}. Results are NOT "
               f"those of the configured dataset {cfg.dataset!r} / weights {cfg.weights!r}.")
        say(f"{bar} {msg} {bar}")
        warnings.warn(msg, stacklevel=2)
        return cand, rec
    rec.update(reason="not available here, nor any fallback: " + "; ".join(first), tried=tried,
               how=how_to_get(_data_used(cfg), first))
    say(f"fallback: none of cfg.fallbacks is available here either ({'; '.join(tried)})"
        + "".join(f"\n{h}" for h in rec["how"]))
    return cfg, rec


def how_to_get(names, missing: list[str]) -> list[str]:
    """How to get each dataset of ``names`` that a line of ``missing`` (:func:`unavailable`) names and whose
    layout has a hint (e.g. AID: where its authors distribute it and the folder layout expected)."""
    from vitadapt.data import LAYOUTS, root_env
    return [f"{n}: {LAYOUTS[n].hint} Then data_root=..., ${root_env(n)} or data/{n}."
            for n in dict.fromkeys(names) if getattr(LAYOUTS.get(n), "hint", "")
            and any(f"{n!r}" in line for line in missing)]


@dataclass
class Setup:
    """What a notebook's second cell builds: the config, the run record and the dry-run decision."""
    notebook: str
    cfg: ExperimentConfig
    run: object
    dry: str | None

    def use(self, kind: str, record: dict) -> None:
        """Record a data or weight source (kept in metrics.json, shown by 90_results)."""
        self.run.use(kind, record)

    def source(self, kind: str) -> dict:
        return dict(self.run.sources.get(kind) or {})

    @property
    def weights_used(self) -> str:
        """The weights actually loaded (after ``auto`` and offline fallbacks), or the configured ones."""
        return str(self.source("weights").get("weights_used", self.cfg.weights))


def start(notebook: str, config_cls: type[ExperimentConfig], profile: str, threads: int | None = None,
          quiet: bool = False, trains: bool = True, **params) -> Setup:
    """Build and validate the config (bad values fail here, before any work), set torch up (``threads``; tiny
    smoke models run on one), open the run record and, for a notebook that ``trains`` on data, decide whether this
    is a dry run (the others, reading only our own outputs or shapes, always run). Inputs not available here are
    replaced by the first available of ``cfg.fallbacks`` (:func:`resolve_fallbacks`); with none available and
    ``dry_run='no'``, a :class:`DataMissingError` names what is missing and how to get it."""
    from vitadapt.results import Run
    cfg = build_config(config_cls, profile, notebook, **params)
    if trains and cfg.dry_run == "no" and (problems := device_problems(cfg)):
        raise DeviceMissingError("; ".join(problems) + " (dry_run='no'; dry_run='auto' plans the run instead)")
    fallback = None
    if trains:
        cfg, fallback = resolve_fallbacks(cfg, tuple(k for k, v in params.items() if v is not None),
                                          print if not quiet else (lambda _: None))
        if fallback and fallback["fallback"] is None and fallback["reason"] and cfg.dry_run == "no":
            raise DataMissingError(f"{fallback['reason']}; {'; '.join(fallback['tried'])}. "
                                   + " ".join(fallback["how"])
                                   + " (dry_run='no'; dry_run='auto' plans the run instead)")
    setup_torch(threads if threads is not None else (getattr(cfg, "threads", 0) or
                                                     (1 if cfg.profile == "smoke" else None)))
    run = Run(notebook, cfg, quiet=quiet)
    if fallback is not None:
        run.use("fallback", fallback)
    dry = dry_run_reason(cfg) if trains else None
    if trains and not quiet:
        print("dry run:", dry or "no")
    if trains and not dry:
        from vitadapt.distributed import describe, fabric_for
        run.compute = c = describe(fabric_for(cfg), cfg)
        if not quiet:
            print(f"compute: world size {c['world_size']} ({c['processes']}), {c['device_type']}, {c['precision']}; "
                  f"effective batch (per device x {c['world_size']} x accumulation {c['accumulate_grad_batches']}): "
                  + ", ".join(f"{k} {v}" for k, v in c["effective_batch"].items()))
    return Setup(notebook, cfg, run, dry)
