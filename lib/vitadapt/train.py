"""Training loops on Lightning Fabric: devices, precision, DDP, checkpoints that carry their config, resume.

One loop serves every objective. An objective is a function ``loss_fn(module, batch) -> (loss, logs)``;
``on_step(step, module)`` runs after each optimizer step (EMA teachers, schedules); ``should_backward(step,
logs) -> bool`` lets a gate (UpStep) skip the backward pass and the optimizer step of an iteration.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn


# ---- divergence ------------------------------------------------------------------------------------

# A plain stack, not a ContextVar: a notebook's cells may run in different contexts (ipykernel), and the
# notebook's name, set once by vitadapt.results.Run, must reach the jobs of later cells.
_JOBS: list[dict] = [{}]


def current_job() -> dict:
    return dict(_JOBS[-1])


@contextlib.contextmanager
def job(**what):
    """Name the job that runs inside (notebook, variant, method, seed, ...): a :class:`Diverged` raised in it
    says which job diverged. Nested jobs add to the outer ones."""
    _JOBS.append({**_JOBS[-1], **{k: v for k, v in what.items() if v is not None}})
    try:
        yield
    finally:
        _JOBS.pop()


def set_notebook(name: str) -> None:
    """The notebook every later job belongs to (called by :class:`vitadapt.results.Run`)."""
    _JOBS[0] = {"notebook": name}


class Diverged(RuntimeError):
    """A training loop met a non-finite loss, gradient norm or parameter: the job stops, its result is lost.

    The message names the job (notebook, variant or method, seed, ...), the step and the learning rates; the
    experiment that catches it marks the job's rows "diverged" instead of reporting a number."""

    def __init__(self, what: str, step: int, lr: float, base_lr: float, job: dict | None = None):
        self.what, self.step, self.lr, self.base_lr = what, int(step), float(lr), float(base_lr)
        self.job = current_job() if job is None else dict(job)
        where = " | ".join(f"{k} {v}" for k, v in self.job.items())
        super().__init__(f"diverged: {where + ' | ' if where else ''}step {self.step} | lr {self.lr:.3g} (peak "
                         f"{self.base_lr:.3g}) | {what}: lower the learning rate")

    def __reduce__(self):            # pickles whole (it comes back from forked training processes)
        return (Diverged, (self.what, self.step, self.lr, self.base_lr, self.job))

    @property
    def short(self) -> str:
        """One line for a table cell or a log: what, step and lr (the job is in the row already)."""
        return f"diverged at step {self.step}, lr {self.lr:.3g} (peak {self.base_lr:.3g}): {self.what}"


# A loss this many times its first value (at least 1) above it has exploded: the run is diverging even where the
# numbers are still finite (a cross-entropy of 2.3 rising past 232, a DINO loss of 8.3 past 840).
EXPLODED = 100.0


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.detach()).all())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_fabric(accelerator: str = "cpu", devices: int = 1, strategy: str = "auto", num_nodes: int = 1,
                precision: str = "32-true", launch: bool = True):
    """A launched Lightning Fabric; on one CPU device this is a thin, cheap wrapper."""
    from lightning.fabric import Fabric
    fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
                    precision=precision)
    if launch and not _launched(fabric):
        fabric.launch()
    return fabric


def _launched(fabric) -> bool:
    return getattr(fabric, "_launched", False)


def fabric_from_config(cfg) -> Any:
    """The run's Fabric from the config's Fabric settings (:func:`vitadapt.distributed.fabric_for`)."""
    from vitadapt.distributed import fabric_for
    return fabric_for(cfg)


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * base_lr``."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _rng_state() -> dict:
    """RNG states as tensors and plain values (loadable with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)], "random": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["random"])


class _Batches:
    """Endless batches over epochs. Remembers the RNG state at the start of the current epoch, so a resumed
    run rebuilds the same epoch order and skips the batches already seen (exact resume on CPU)."""

    def __init__(self, loader: Iterable, start_step: int = 0, epoch_rng: dict | None = None):
        self.loader = loader
        self.n = len(loader) if hasattr(loader, "__len__") else 0
        self.epoch = start_step // self.n if self.n else 0
        self.epoch_rng = epoch_rng
        self._it = None
        self._skip = start_step % self.n if self.n else 0

    def _generators(self) -> list[torch.Generator]:
        """The loader's own generators (DataLoader(generator=...) and its sampler's), if any."""
        gens = []
        for obj in (self.loader, getattr(self.loader, "sampler", None),
                    getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)):
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in gens):
                gens.append(g)
        return gens

    def _capture(self) -> dict:
        return {**_rng_state(), "loader": [g.get_state() for g in self._generators()]}

    def _restore(self, state: dict) -> None:
        _set_rng_state(state)
        for g, st in zip(self._generators(), state.get("loader", [])):
            g.set_state(st)

    def _new_epoch(self):
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if self.epoch_rng is not None and self._skip:
            now = self._capture()
            self._restore(self.epoch_rng)
            self._it = iter(self.loader)
            for _ in range(self._skip):
                next(self._it)
            _set_rng_state(now)           # the global RNG continues from the checkpoint; the loader's from its epoch
        else:
            self.epoch_rng = self._capture()
            self._it = iter(self.loader)
        self._skip = 0

    def __next__(self):
        if self._it is None:
            self._new_epoch()
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._new_epoch()
            return next(self._it)


@dataclass
class FitResult:
    steps: int
    backward_passes: int
    skipped: int
    wall_time_s: float
    history: list[dict] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    resumed_from: int = 0

    def summary(self) -> dict:
        return {"steps": self.steps, "backward_passes": self.backward_passes, "skipped": self.skipped,
                "skip_fraction": self.skipped / max(1, self.skipped + self.backward_passes),
                "wall_time_s": round(self.wall_time_s, 3), "peak_memory_mb": round(self.peak_memory_mb, 1),
                "resumed_from": self.resumed_from}

    def record(self) -> dict:
        """A run's cost for a results table: steps, backward passes, skips, wall time, s/step, peak memory."""
        s = self.summary()
        return {**{k: s[k] for k in ("steps", "backward_passes", "skipped", "skip_fraction", "wall_time_s")},
                "s_per_step": s["wall_time_s"] / max(1, s["steps"]), "peak_memory_mb": s["peak_memory_mb"]}

    def cost(self, batch_size: int, level_mb: float = 0.0) -> dict:
        """A run's cost, unrounded: steps, images seen (steps x ``batch_size``), wall time, seconds per step, peak
        memory and its increment over ``level_mb`` (the level before the run, from :func:`reset_peak_memory`)."""
        return {"steps": self.steps, "images_seen": self.steps * batch_size, "wall_time_s": self.wall_time_s,
                "s_per_step": self.wall_time_s / max(1, self.steps), "peak_memory_mb": self.peak_memory_mb,
                "memory_increment_mb": max(0.0, self.peak_memory_mb - level_mb)}

    def final(self, keys: Sequence[str], logged: Sequence[str] = ()) -> dict:
        """The last logged step's values as ``final_<key>``: every one of ``keys`` (None when not logged) and those
        of ``logged`` that the step has."""
        last = self.history[-1] if self.history else {}
        return {**{f"final_{k}": last.get(k) for k in keys}, **{f"final_{k}": last[k] for k in logged if k in last}}

    def curves(self, keys: Sequence[str], **tags) -> list[dict]:
        """The logged steps as rows for a history table: ``tags`` (the job's names) and the ``keys`` each step has."""
        return [{**tags, **{k: h[k] for k in keys if k in h}} for h in self.history]


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    except Exception:  # pragma: no cover
        return 0.0


def status_mb(key: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device=None) -> float:
    """Reset the peak-memory counter before a run; returns the current level in MB. CUDA: allocated memory (``fit``
    resets the CUDA peak itself). CPU (Linux): free memory goes back to the OS (``malloc_trim``), then the process's
    resident-set high-water mark (``VmHWM``, which ``fit`` reads through ``getrusage``) is reset to the current
    resident set by writing 5 to ``/proc/self/clear_refs``; elsewhere nothing is reset (then the peak of a run is the
    process's peak so far)."""
    import gc
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS") or 0.0


def fit(fabric, module: nn.Module, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]], loader,
        *, steps: int, lr: float, weight_decay: float = 0.05, warmup: int = 0, betas=(0.9, 0.999),
        grad_clip: float | None = None, min_lr_ratio: float = 0.0, ckpt_path: str | os.PathLike | None = None,
        ckpt_every: int = 0, ckpt_every_s: float | None = None, config: dict | None = None, on_step: Callable[[int, nn.Module], None] | None = None,
        should_backward: Callable[[int, dict], bool] | None = None, log_every: int = 1,
        stop_after: int | None = None, progress: bool = False, accumulate: int | None = None,
        grad_checkpointing: bool | None = None, param_groups: Callable[[nn.Module], list[dict]] | None = None,
        lr_schedule: Callable[[int], float] | None = None, wd_schedule: Callable[[int], float] | None = None,
        before_step: Callable[[int, nn.Module], None] | None = None) -> FitResult:
    """Train the parameters of ``module`` that require grad for ``steps`` iterations with AdamW and a
    warm-up + cosine schedule.

    Checkpoints (``ckpt_path``) hold the module, optimizer, step, history and ``config``; when the file
    exists and its config equals ``config``, training resumes from its step (a different config is an
    error, not a silent restart). They are written every ``ckpt_every`` steps, or (``ckpt_every_s``) when that many
    seconds have passed since the last one, and at the last step. ``stop_after`` ends the loop early at that step
    (to test resume).

    A non-finite loss, a loss :data:`EXPLODED` times above its first value, a non-finite gradient norm (with
    ``grad_clip``) or trained parameter raises :class:`Diverged`, naming the
    job (:func:`job`), the step and the learning rate.
    Skipped iterations (``should_backward`` false) still run the forward pass and count as steps.

    Recipes (the official ones differ from the default in these places):

    - ``param_groups(module)``: the optimizer's groups, each ``{"params": [...], "lr_scale": x, "wd_scale": y}``
      (layer-wise LR decay, no decay on norms and biases); the default is one group of tensors with >= 2 dims
      (``wd_scale`` 1) and one of the rest (``wd_scale`` 0), both ``lr_scale`` 1. Every trainable parameter must be
      in exactly one group.
    - ``lr_schedule(step)``: the peak-relative learning rate of each step (a group's lr is ``lr x lr_schedule(step)
      x lr_scale``); default linear warm-up then cosine to ``min_lr_ratio`` (:func:`cosine_lr`).
    - ``wd_schedule(step)``: the weight decay of each step (a group's is this x ``wd_scale``); default constant
      ``weight_decay``.
    - ``before_step(step, module)``: runs after the backward pass and before clipping and the optimizer step of
      every step that back-propagates (drop the gradients of a frozen layer, clip per module).
    - ``on_step`` may return a dict of values logged with the step (e.g. a test accuracy tracked every epoch).

    ``accumulate`` batches make one optimizer step (a step is an optimizer step; the gate decides on the first
    batch's loss and a skipped step skips its other batches); ``grad_checkpointing`` turns timm's activation
    checkpointing on in every module that has it. Both default to the run's settings on ``fabric``
    (:func:`vitadapt.distributed.fabric_for`). On a Fabric that forks its processes from a kernel (in-kernel DDP)
    the loop runs in those processes and rank 0's trained state (module, gate) comes back into ``module``.
    """
    from vitadapt import distributed
    settings = getattr(fabric, "run_settings", {})
    accumulate = int(settings.get("accumulate", 1) if accumulate is None else accumulate)
    grad_checkpointing = bool(settings.get("grad_checkpointing", False) if grad_checkpointing is None
                              else grad_checkpointing)
    if accumulate < 1:
        raise ValueError(f"accumulate={accumulate} must be >= 1")
    if grad_checkpointing:
        for m in module.modules():
            if hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(True)
    kw = dict(steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, betas=betas, grad_clip=grad_clip,
              min_lr_ratio=min_lr_ratio, ckpt_path=ckpt_path, ckpt_every=ckpt_every, ckpt_every_s=ckpt_every_s,
              config=config, on_step=on_step, should_backward=should_backward, log_every=log_every,
              stop_after=stop_after, progress=progress, accumulate=accumulate, param_groups=param_groups,
              lr_schedule=lr_schedule, wd_schedule=wd_schedule, before_step=before_step)
    if distributed.forks(fabric):
        return _fit_forked(fabric, module, loss_fn, loader, kw)
    return _fit(fabric, module, loss_fn, loader, **kw)


def _fit_forked(fabric, module, loss_fn, loader, kw: dict) -> FitResult:
    """:func:`_fit` in the processes ``fabric`` forks; the trained module (and gate) state of rank 0 comes back."""
    from vitadapt import distributed
    gate = kw["should_backward"]

    def train() -> dict:
        res = _fit(fabric, module, loss_fn, loader, **kw)
        return {"result": res, "module": module.state_dict(),
                "gate": gate.state_dict() if hasattr(gate, "state_dict") else None}

    out = distributed.in_processes(fabric, train)
    module.load_state_dict(out["module"])
    if out["gate"] is not None and hasattr(gate, "load_state_dict"):
        gate.load_state_dict(out["gate"])
    return out["result"]


def _fit(fabric, module: nn.Module, loss_fn, loader, *, steps: int, lr: float, weight_decay: float, warmup: int,
         betas, grad_clip, min_lr_ratio: float, ckpt_path, ckpt_every: int, ckpt_every_s, config, on_step,
         should_backward, log_every: int, stop_after, progress: bool, accumulate: int, param_groups=None,
         lr_schedule=None, wd_schedule=None, before_step=None) -> FitResult:
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    groups = optimizer_groups(module, param_groups)
    opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": weight_decay * g["wd_scale"]} for g in groups],
                            lr=lr, betas=tuple(betas))
    for g, spec in zip(opt.param_groups, groups):
        g["lr_scale"], g["wd_scale"] = spec["lr_scale"], spec["wd_scale"]
    lr_at = (lambda s: lr * lr_schedule(s)) if lr_schedule is not None else \
        (lambda s: cosine_lr(s, steps, lr, warmup, min_lr_ratio))
    module, opt = fabric.setup(module, opt)
    loader = fabric.setup_dataloaders(loader) if isinstance(loader, torch.utils.data.DataLoader) else loader
    result = FitResult(0, 0, 0, 0.0)
    start = 0
    extra: dict = {}
    config = dict(config or {})
    if ckpt_path is not None and Path(ckpt_path).exists():
        state = {"module": module, "optimizer": opt}
        extra = fabric.load(str(ckpt_path), state)
        if extra.get("config") != config:
            raise ValueError(f"checkpoint {ckpt_path} was written with another config; delete it or use its "
                             f"config to resume")
        start = int(extra["step"])
        if extra.get("rng_now") is not None:
            _set_rng_state(extra["rng_now"])
        if should_backward is not None and hasattr(should_backward, "load_state_dict") and extra.get("gate"):
            should_backward.load_state_dict(extra["gate"])
        result.history = list(extra.get("history", []))
        result.backward_passes = int(extra.get("backward_passes", 0))
        result.skipped = int(extra.get("skipped", 0))
        result.resumed_from = start
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fabric.device)
    t0 = last_save = time.perf_counter()
    ref_loss = None
    it = _Batches(loader, start * accumulate, extra.get("rng_epoch") if start else None)
    bar = None
    if progress and fabric.is_global_zero:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="train", leave=False)
    module.train()
    step = start
    for step in range(start, steps):
        if stop_after is not None and step >= stop_after:
            if ckpt_path is not None:
                save_checkpoint(fabric, ckpt_path, module, opt, step, config, result, it, should_backward)
            break
        cur_lr = lr_at(step)                         # the peak-relative rate of the step; groups scale it
        wd_now = weight_decay if wd_schedule is None else wd_schedule(step)
        for g in opt.param_groups:
            g["lr"] = cur_lr * g["lr_scale"]
            g["weight_decay"] = wd_now * g["wd_scale"]

        def forward(logged: bool = True):
            """A batch's loss, its logs (``logged``) as floats and the loss value; with several ranks, one collective
            makes the value and the logged statistics means over the ranks' batches, so every rank judges the same
            loss (all stop together or none does) and logs the same numbers."""
            nonlocal ref_loss
            loss, logs = loss_fn(module, next(it))
            logs = {k: (v.item() if torch.is_tensor(v) else v) for k, v in dict(logs).items()} if logged else {}
            value = loss.detach().float().mean()
            if fabric.world_size > 1:
                keys = [k for k, v in logs.items() if isinstance(v, float)]
                means = fabric.all_reduce(torch.cat([value.reshape(1), torch.tensor(
                    [logs[k] for k in keys], dtype=value.dtype, device=value.device)]), reduce_op="mean")
                value = means[0]
                logs.update(zip(keys, means[1:].tolist()))
            if not _finite(value):
                raise Diverged(f"non-finite loss ({float(value)})", step, cur_lr, lr)
            if ref_loss is None:
                ref_loss = result.history[0]["loss"] if result.history else float(value)
            elif float(value) > ref_loss + EXPLODED * max(abs(ref_loss), 1.0):
                raise Diverged(f"the loss exploded from {ref_loss:.4g} to {float(value):.4g}", step, cur_lr, lr)
            return loss, logs, float(value)

        loss, logs, value = forward()
        logs.update(step=step, loss=value, lr=cur_lr, **({"wd": wd_now} if wd_schedule is not None else {}))
        do_backward = True if should_backward is None else bool(should_backward(step, logs))
        if should_backward is not None and fabric.world_size > 1:
            do_backward = bool(fabric.broadcast(do_backward, src=0))   # every rank must agree, or DDP hangs
        logs["backward"] = do_backward
        if do_backward:
            opt.zero_grad(set_to_none=True)
            losses = [value]
            for micro in range(accumulate):
                if micro:
                    loss, _, value = forward(logged=False)
                    losses.append(value)
                with fabric.no_backward_sync(module, enabled=fabric.world_size > 1 and micro < accumulate - 1):
                    fabric.backward(loss / accumulate if accumulate > 1 else loss)
            logs["loss"] = sum(losses) / len(losses)
            if before_step is not None:
                before_step(step, module)
            if grad_clip:
                norm = fabric.clip_gradients(module, opt, max_norm=grad_clip, error_if_nonfinite=False)
                if norm is not None and not _finite(torch.as_tensor(norm)):
                    raise Diverged(f"non-finite gradient norm ({float(norm)})", step, cur_lr, lr)
            opt.step()
            result.backward_passes += 1
        else:
            result.skipped += 1
            for _ in range(accumulate - 1):
                next(it)
        if on_step is not None:
            logs.update(on_step(step, module) or {})
        if step % log_every == 0 or step == steps - 1:
            result.history.append(logs)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        done = step + 1
        due = (ckpt_every and done % ckpt_every == 0) or done == steps or \
            (ckpt_every_s is not None and time.perf_counter() - last_save >= ckpt_every_s)
        if ckpt_path is not None and (ckpt_every or ckpt_every_s is not None) and due:
            try:
                save_checkpoint(fabric, ckpt_path, module, opt, done, config, result, it, should_backward)
            except (OSError, RuntimeError) as e:        # a full disk costs the resume point, never the run
                Path(str(ckpt_path) + ".tmp").unlink(missing_ok=True)
                print(f"warning: checkpoint {ckpt_path} not written at step {done} ({str(e).splitlines()[0][:160]}); "
                      f"training goes on, but an interruption now restarts this job from its last checkpoint")
            last_save = time.perf_counter()
    else:
        step = steps
    if bar is not None:
        bar.close()
    bad = next((n for n, p in module.named_parameters() if p.requires_grad and not _finite(p)), None)
    if bad is not None:
        raise Diverged(f"non-finite parameter {bad} after training", step, opt.param_groups[0]["lr"], lr)
    result.steps = step if stop_after is not None and step < steps else steps
    result.wall_time_s = time.perf_counter() - t0
    result.peak_memory_mb = _peak_memory_mb(fabric.device)
    return result


def optimizer_groups(module: nn.Module, param_groups: Callable[[nn.Module], list[dict]] | None = None) -> list[dict]:
    """The optimizer's parameter groups of ``module``'s trainable parameters, each ``{"params", "lr_scale",
    "wd_scale"}``: ``param_groups(module)`` (checked: every trainable parameter in exactly one group, nothing
    frozen), or by default tensors of >= 2 dims with weight decay and the rest without."""
    params = trainable_parameters(module)
    if not params:
        raise ValueError("no parameter of the module requires grad: nothing to train")
    if param_groups is None:
        groups = [{"params": [p for p in params if p.ndim >= 2], "lr_scale": 1.0, "wd_scale": 1.0},
                  {"params": [p for p in params if p.ndim < 2], "lr_scale": 1.0, "wd_scale": 0.0}]
        return [g for g in groups if g["params"]]
    groups = [{"lr_scale": 1.0, "wd_scale": 1.0, **g, "params": list(g["params"])} for g in param_groups(module)]
    seen = [id(p) for g in groups for p in g["params"]]
    want = {id(p) for p in params}
    if len(seen) != len(set(seen)) or set(seen) != want:
        raise ValueError(f"param_groups: every trainable parameter must be in exactly one group (groups hold "
                         f"{len(seen)} entries, {len(set(seen))} distinct; the module trains {len(want)}, "
                         f"{len(want - set(seen))} of them in no group, {len(set(seen) - want)} frozen ones given)")
    return [g for g in groups if g["params"]]


def save_checkpoint(fabric, path, module, opt, step: int, config: dict, result: FitResult, batches=None,
                    gate=None) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint. Holds the
    RNG states (now, and at the start of the current epoch) and the gate's state, for an exact resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(str(tmp), {"module": module, "optimizer": opt, "step": step, "config": config,
                           "history": result.history, "backward_passes": result.backward_passes,
                           "skipped": result.skipped, "rng_now": _rng_state(),
                           "rng_epoch": getattr(batches, "epoch_rng", None),
                           "gate": gate.state_dict() if hasattr(gate, "state_dict") else None})
    fabric.barrier()
    if fabric.is_global_zero:
        os.replace(tmp, path)
    fabric.barrier()
