"""Several processes on the CPU (gloo): torchrun running the notebooks through the runner, in-kernel DDP forking
each training run, and the pieces under them (settings checks, gradient accumulation, epochs across ranks, results
and divergence coming back from forked processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vitadapt import distributed
from vitadapt.paths import REPO_ROOT

PY = Path(sys.executable)
DDP = ["-p", "devices", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A repository root whose outputs/ and cache are private to this module (everything else linked)."""
    r = tmp_path_factory.mktemp("root")
    for entry in REPO_ROOT.iterdir():
        if entry.name not in ("outputs", ".git"):
            (r / entry.name).symlink_to(entry)
    return r


def _run(root: Path, cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS")}
    env.update(VITADAPT_ROOT=str(root), VITADAPT_CACHE=str(root / "outputs" / "cache"), VITADAPT_OFFLINE="1",
               TQDM_DISABLE="1", PYTHONHASHSEED="0")
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def _accuracies(blob) -> list:
    """Every test/val accuracy in a metrics blob, in order (what the ranks must agree on)."""
    out = []
    if isinstance(blob, dict):
        for k in sorted(blob):
            out += [(k, blob[k])] if k in ("test_acc", "val_acc") and isinstance(blob[k], float) else \
                _accuracies(blob[k])
    elif isinstance(blob, list):
        for v in blob:
            out += _accuracies(v)
    return out


def _numbers(blob, key: str = "") -> list:
    """Every number in a metrics blob but times, speeds and memory (which differ from rank to rank)."""
    if isinstance(blob, dict):
        return [x for k in sorted(blob) for x in _numbers(blob[k], str(k))]
    if isinstance(blob, list):
        return [x for v in blob for x in _numbers(v, key)]
    timing = any(w in key.lower() for w in ("time", " s", "_s", "s/", "memory", "img/s", "step_s"))
    return [] if timing or not isinstance(blob, float) or blob != blob else [(key, round(blob, 6))]


def test_torchrun_runs_smoke_notebooks_as_two_ranks(root):
    """One runner per process under torchrun (strategy ddp): every notebook completes on both ranks, world size 2
    is recorded, rank 0's results are in outputs/smoke/<nb>, rank 1's apart, and both report the same accuracies."""
    nbs = ["10_explora_dinov2", "20_upstep", "30_rlrr"]
    r = _run(root, [str(PY.parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "vitadapt.runner",
                    "--profile", "smoke", "--nb", "10,20,30", "--force", "--progress", "off", *DDP, "-p", "strategy", "ddp"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("3/3 notebooks ok") == 2, r.stdout
    for nb in nbs:
        rank0 = _metrics(root / "outputs" / "smoke" / nb / "metrics.json")
        rank1 = _metrics(root / "outputs" / "smoke" / ".ranks" / "rank1" / nb / "metrics.json")
        for blob in (rank0, rank1):
            assert blob["run"]["compute"]["world_size"] == 2
            assert blob["run"]["compute"]["processes"] == "torchrun/SLURM"
        accs = _accuracies(rank0["metrics"])
        assert accs and accs == _accuracies(rank1["metrics"]), nb
        assert _numbers(rank0["metrics"]) == _numbers(rank1["metrics"]), nb     # logged statistics too
    compute = _metrics(root / "outputs" / "smoke" / "10_explora_dinov2" / "metrics.json")["run"]["compute"]
    assert compute["effective_batch"]["pretrain_batch_size"] == 2 * \
        _metrics(root / "outputs" / "smoke" / "10_explora_dinov2" / "metrics.json")["run"]["config"]["pretrain_batch_size"]


def test_slurm_tasks_run_a_notebook_as_two_ranks(root):
    """Two runners started as SLURM would start them (srun --ntasks 2 on one node: SLURM_* variables, no torchrun):
    rank 0 hosts the rendezvous, both complete with world size 2, rank 1 writes apart."""
    slurm = dict(SLURM_NTASKS="2", SLURM_NODEID="0", SLURM_JOB_ID="4242", SLURM_NODELIST="localhost",
                 SLURM_JOB_NAME="vitadapt", SLURM_NTASKS_PER_NODE="2")
    cmd = [str(PY), "-m", "vitadapt.runner", "--profile", "smoke", "--nb", "30", "--force", "--progress", "off", *DDP,
           "-p", "strategy", "ddp"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(VITADAPT_ROOT=str(root), VITADAPT_CACHE=str(root / "outputs" / "cache"), VITADAPT_OFFLINE="1", **slurm)
    procs = [subprocess.Popen(cmd, cwd=root, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rank0 = _metrics(root / "outputs" / "smoke" / "30_rlrr" / "metrics.json")
    rank1 = _metrics(root / "outputs" / "smoke" / ".ranks" / "rank1" / "30_rlrr" / "metrics.json")
    assert rank0["run"]["compute"]["world_size"] == rank1["run"]["compute"]["world_size"] == 2
    assert _accuracies(rank0["metrics"]) == _accuracies(rank1["metrics"])


def test_in_kernel_ddp_notebook_forks_each_training_run(root):
    """strategy ddp_notebook, devices 2, one runner: the kernel forks two processes per training run and the
    notebook completes with world size 2 recorded in rank 0's folder."""
    r = _run(root, [str(PY), "-m", "vitadapt.runner", "--profile", "smoke", "--nb", "30", "--force", "--progress",
                    "off", *DDP, "-p", "strategy", "ddp_notebook"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    blob = _metrics(root / "outputs" / "smoke" / "30_rlrr" / "metrics.json")
    assert blob["run"]["compute"]["world_size"] == 2
    assert blob["run"]["compute"]["processes"] == "forked per training run"
    assert _accuracies(blob["metrics"])


# ---- the pieces ---------------------------------------------------------------------------------------------

def _cfg(**kw):
    from vitadapt.config import ExperimentConfig
    return ExperimentConfig(**kw)


def test_settings_that_cannot_work_fail_before_any_work(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        distributed.check_settings(_cfg(devices=2, strategy="ddp"))
    with pytest.raises(ValueError, match="num_nodes=2"):
        distributed.check_settings(_cfg(num_nodes=2))
    with pytest.raises(ValueError, match="strategy='fsdp' is not valid; valid values: 'auto', 'ddp', 'ddp_notebook'"):
        _cfg(strategy="fsdp")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"devices=1 x num_nodes=1 = 1 but this run was started as 4 processes"):
        distributed.check_settings(_cfg())
    with pytest.raises(ValueError, match="strategy='ddp_notebook' with 4 processes"):
        distributed.check_settings(_cfg(devices=4, strategy="ddp_notebook"))
    distributed.check_settings(_cfg(devices=4, strategy="ddp"))


def _train(batch: int, accumulate: int, steps: int = 3) -> dict:
    from vitadapt.train import fit, make_fabric
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    data = TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1]), {}

    res = fit(make_fabric(), model, loss_fn, DataLoader(data, batch_size=batch, shuffle=False), steps=steps, lr=0.1,
              accumulate=accumulate)
    return {"params": {k: v.clone() for k, v in model.state_dict().items()}, "losses": [h["loss"] for h in res.history]}


def test_accumulating_two_half_batches_is_one_whole_batch():
    whole, halves = _train(8, 1), _train(4, 2)
    for k in whole["params"]:
        torch.testing.assert_close(halves["params"][k], whole["params"][k], rtol=1e-5, atol=1e-6)
    assert halves["losses"] == pytest.approx(whole["losses"], rel=1e-5)     # logged: the mean over the batches
    with pytest.raises(ValueError, match="accumulate=0"):
        _train(4, 0)


def test_epochs_are_counted_once_across_ranks_and_accumulation():
    from vitadapt.finetune import _steps
    fabric = SimpleNamespace(world_size=2, run_settings={"accumulate": 2})
    assert _steps(100, 10, None, 1.0) == 10
    assert _steps(100, 10, None, 1.0, fabric) == 2        # 100 // (10 x 2 ranks x 2 batches per step)
    assert _steps(100, 10, 7, None, fabric) == 7           # steps are optimizer steps, as given
    from vitadapt.config import build_config
    from vitadapt.experiments import rlrr
    one, two = (rlrr.plan(build_config(rlrr.RLRRConfig, "smoke", "30_rlrr", devices=d, strategy="ddp_notebook"), 1)
                for d in (1, 2))                           # the plan 30 prints counts the same way
    cfg = build_config(rlrr.RLRRConfig, "smoke", "30_rlrr")
    assert one["selection_steps_per_run"] == _steps(cfg.n_train, cfg.batch_size, None, cfg.epochs)
    assert two["selection_steps_per_run"] == _steps(cfg.n_train, cfg.batch_size, None, cfg.epochs,
                                                    SimpleNamespace(world_size=2, run_settings={}))
    assert two["selection_steps_per_run"] < one["selection_steps_per_run"]


def test_grad_checkpointing_is_switched_on_and_changes_no_number(tiny_vit):
    from vitadapt.train import fit, make_fabric

    def run(flag: bool):
        torch.manual_seed(0)
        vit = tiny_vit(num_classes=3)
        data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
        fit(make_fabric(), vit, lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), {}),
            DataLoader(data, batch_size=2), steps=2, lr=1e-3, grad_checkpointing=flag)
        return vit

    on, off = run(True), run(False)
    assert on.grad_checkpointing and not off.grad_checkpointing
    for (k, a), (_, b) in zip(on.state_dict().items(), off.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def _forking():
    from lightning.fabric import Fabric
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    assert distributed.forks(fabric)
    return fabric


def _big(n: int):
    t = torch.full((1,), float(torch.distributed.get_rank() + 1))
    torch.distributed.all_reduce(t)
    return {"sum": t, "big": torch.arange(n, dtype=torch.float32)}


def test_forked_processes_return_rank0_results_larger_than_a_pipe():
    """Lightning's launcher reads its queue only after the processes exit: a result of 4 MB once blocked rank 0
    for ever; it now comes back through a file."""
    out = distributed.in_processes(_forking(), _big, 1_000_000)
    assert float(out["sum"]) == 3.0 and out["big"].shape == (1_000_000,) and float(out["big"][-1]) == 999_999


def _diverge():
    from vitadapt.train import Diverged
    raise Diverged("the loss exploded from 1 to 1e9", step=3, lr=0.1, base_lr=0.1, job={"method": "rlrr"})


def test_a_divergence_in_the_forked_processes_is_raised_in_the_kernel_as_one():
    from vitadapt.train import Diverged
    with pytest.raises(Diverged, match="method rlrr | step 3"):
        distributed.in_processes(_forking(), _diverge)


def test_on_rank0_without_several_ranks_just_calls():
    assert distributed.on_rank0(None, lambda: 7) == 7
