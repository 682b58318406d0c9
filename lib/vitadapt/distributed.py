"""Devices and processes: one Lightning Fabric per run, built from the config's five Fabric settings.

Three ways a run uses its devices, all through :func:`fabric_for`:

- **One device** (``devices: 1``): a launched Fabric; everything runs in this process.
- **Processes started outside** (torchrun, SLURM: one process per device, each running the notebook through the
  runner; ``strategy: ddp`` or ``auto``): every rank runs the notebook; :func:`vitadapt.train.fit` shards the
  data and all-reduces the gradients; :func:`on_rank0` runs evaluation on rank 0 and hands its result to the
  others; ranks other than 0 write under ``outputs/<profile>/.ranks/`` (:func:`vitadapt.paths.output_dir`).
  Lightning refuses its ``ddp`` strategy inside a Jupyter kernel because it would spawn processes from there; these
  were spawned by torchrun, so :class:`ExternalDDP` launches nothing and works in a kernel.
- **Processes started from the kernel** (``strategy: ddp_notebook`` with ``devices`` > 1): each training run
  (:func:`vitadapt.train.fit`) forks ``devices`` processes (:func:`in_processes`); rank 0's trained state comes
  back to the kernel, which does everything else (evaluation, caches, outputs) itself. A fork needs CUDA untouched in
  the kernel, so there the kernel evaluates on the CPU (:func:`eval_device`); with GPUs prefer torchrun.
"""

from __future__ import annotations

import os
import platform
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch

from vitadapt.paths import launch_world

IN_KERNEL = ("ddp_notebook", "ddp_fork")
_FABRICS: dict[tuple, Any] = {}
_CHILD = False          # True inside a process forked by in_processes


def external_world() -> int:
    """The number of processes torchrun or SLURM started for this run (:func:`vitadapt.paths.launch_world`, which the
    runner reads too), when Lightning recognises the launcher (1 otherwise)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    return launch_world() if TorchElasticEnvironment.detect() or SLURMEnvironment.detect() else 1


def _external_ddp(timeout: timedelta):
    from lightning.fabric.strategies import DDPStrategy

    class ExternalDDP(DDPStrategy):
        """Lightning's DDP for processes that torchrun or SLURM started: there is nothing to launch (so no launcher,
        and Lightning's check against spawning from an interactive session does not apply: a kernel may use it).
        Each notebook runs in a fresh kernel on every rank, so each forms its own process group: under its own
        prefix (the runner's ``VITADAPT_RUN_ID``) in the rendezvous store, which outlives the kernels under torchrun
        and still holds the addresses of the previous notebook's group."""

        def _configure_launcher(self) -> None:
            self._launcher = None

        def _setup_distributed(self) -> None:
            from lightning.fabric.utilities.distributed import _init_dist_connection
            self._set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            env = self.cluster_environment
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"   # torchrun's own store, or rank 0's
            store = torch.distributed.TCPStore(env.main_address, env.main_port, env.world_size(),
                                               is_master=not agent and env.global_rank() == 0, timeout=timeout)
            prefix = f"vitadapt/{os.environ.get('VITADAPT_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
            kw = {"device_id": self.root_device} if self.root_device.type != "cpu" else {}
            _init_dist_connection(env, self._process_group_backend, timeout=timeout,
                                  store=torch.distributed.PrefixStore(prefix, store), **kw)

    return ExternalDDP(timeout=timeout)


def check_settings(cfg) -> None:
    """Fabric settings that cannot work together fail here, before any work, naming the values."""
    world = external_world()
    want = cfg.devices * cfg.num_nodes
    if world > 1 and want != world:
        raise ValueError(f"devices={cfg.devices} x num_nodes={cfg.num_nodes} = {want} but this run was started as "
                         f"{world} processes (torchrun/SLURM); valid: devices x num_nodes = {world} "
                         f"(e.g. -p devices {world // cfg.num_nodes if world % cfg.num_nodes == 0 else world})")
    if world > 1 and cfg.strategy not in ("auto", "ddp"):
        raise ValueError(f"strategy={cfg.strategy!r} with {world} processes started by torchrun/SLURM; valid "
                         f"values there: 'ddp', 'auto'")
    if world == 1 and want > 1 and cfg.strategy == "ddp":
        raise ValueError(f"strategy={cfg.strategy!r} with devices={cfg.devices} needs one process per device: start "
                         f"it with `torchrun --nproc-per-node {cfg.devices} -m vitadapt.runner ...` (or SLURM), or "
                         f"use strategy='ddp_notebook' to fork them from the kernel; valid here: 'ddp_notebook', "
                         f"'auto'")
    if cfg.num_nodes > 1 and world == 1:
        raise ValueError(f"num_nodes={cfg.num_nodes} needs torchrun or SLURM to start the processes on each node")


def fabric_for(cfg) -> Any:
    """The Fabric of a run (one per settings, reused): launched unless it forks processes for each training run."""
    check_settings(cfg)
    timeout = timedelta(minutes=getattr(cfg, "ddp_timeout_min", 180))
    settings = {"accumulate": getattr(cfg, "accumulate_grad_batches", 1),
                "grad_checkpointing": bool(getattr(cfg, "grad_checkpointing", False))}
    key = (cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision, external_world(), timeout,
           *settings.values())
    if key in _FABRICS:
        return _FABRICS[key]
    from lightning.fabric import Fabric
    strategy: Any = cfg.strategy
    if external_world() > 1:
        strategy = _external_ddp(timeout)
    elif cfg.devices * cfg.num_nodes > 1 and cfg.strategy in ("auto", *IN_KERNEL):
        strategy = "ddp_fork"
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
                    precision=cfg.precision)
    fabric.run_settings = settings          # what vitadapt.train.fit takes from the run: accumulation, checkpointing
    if not forks(fabric):
        fabric.launch()
    _FABRICS[key] = fabric
    return fabric


def forks(fabric) -> bool:
    """Whether a training run on ``fabric`` forks its processes from this one (in-kernel DDP, not in a child)."""
    from lightning.fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    return not _CHILD and isinstance(getattr(fabric.strategy, "launcher", None), _MultiProcessingLauncher)


def in_processes(fabric, fn: Callable, *args) -> Any:
    """``fn(*args)`` in ``fabric``'s forked processes (one per device, a process group among them); returns rank 0's
    result. A :class:`~vitadapt.train.Diverged` is raised here again as it was; any other exception in a process
    stops them all and is raised here by torch (``ProcessRaisedException``, with the process's traceback)."""

    from vitadapt.train import Diverged

    def child(fabric, *args):
        global _CHILD
        _CHILD = True
        try:
            out = ("ok", fn(*args))
        except Diverged as e:           # every rank stops at the same step (fit decides together): the kernel
            out = ("error", e)          # raises it again, so the job's rows read "diverged"
        # any other exception ends this process; torch then stops the others and raises it in the kernel
        if fabric.global_rank != 0:
            return None
        # Through a file, not the launcher's queue: Lightning reads its queue only after every process has exited,
        # so a result larger than a pipe's buffer would block rank 0 for ever (and a tensor sent through it would
        # be a handle into the shared memory of a process that is gone).
        fd, path = tempfile.mkstemp(prefix="vitadapt-rank0-", suffix=".pt")
        with os.fdopen(fd, "wb") as f:
            torch.save(out, f)
        return path

    path = fabric.launch(child, *args)
    try:
        status, value = torch.load(path, weights_only=False)
    finally:
        os.unlink(path)
    if status == "error":
        raise value
    return value


def on_rank0(fabric, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (evaluation, caches), its result broadcast to every rank (a pickled object; keep it
    small: rows, not features). One process: just ``fn()``."""
    if not shares_work(fabric):
        return fn()
    result, error = (None, None)
    if fabric.global_rank == 0:
        try:
            result = fn()
        except Exception as e:          # noqa: BLE001 - every rank raises it, rather than waiting forever
            error = e
    result, error = fabric.broadcast((result, error), src=0)
    if error is not None:
        raise error
    return result


def work_device(fabric) -> torch.device:
    """Where this process computes outside training (evaluation, embeddings): ``fabric``'s device, but the CPU
    without a fabric and in a kernel that forks its training processes on GPUs (a forked process cannot use CUDA
    once the kernel has)."""
    if fabric is None or (forks(fabric) and fabric.device.type == "cuda"):
        return torch.device("cpu")
    return fabric.device


def shares_work(fabric) -> bool:
    """Whether this process is one of several ranks that all run the notebook (torchrun / SLURM)."""
    return fabric is not None and fabric.world_size > 1 and not forks(fabric)


def describe(fabric, cfg) -> dict:
    """The run record's ``compute``: world size, device type and name, the precision Fabric actually uses, strategy,
    gradient accumulation and the effective batch (per-device batch x devices x accumulation)."""
    dev = fabric.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    accumulate = getattr(cfg, "accumulate_grad_batches", 1)
    out = {"world_size": fabric.world_size, "device_type": dev.type, "device_name": name,
           "precision": str(fabric._precision.precision), "strategy": type(fabric.strategy).__name__,
           "processes": "torchrun/SLURM" if external_world() > 1 else "forked per training run" if forks(fabric)
           else "this one", "accumulate_grad_batches": accumulate,
           "grad_checkpointing": bool(getattr(cfg, "grad_checkpointing", False))}
    batches = {k: getattr(cfg, k) for k in ("pretrain_batch_size", "adapt_batch_size", "ft_batch_size")
               if isinstance(getattr(cfg, k, None), int)} or {"batch_size": cfg.batch_size}   # RLRR trains with it
    out["effective_batch"] = {k: v * fabric.world_size * accumulate for k, v in batches.items()}
    return out
