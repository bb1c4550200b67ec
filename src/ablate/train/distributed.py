"""More than one process per run (torchrun data parallelism) and one GPU per job (sweeps on one host).

Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) and outside a multirun on a CUDA host,
nothing here changes a run: `placement` yields `SINGLE` and the planned device.

Data parallelism (`torchrun --nproc_per_node=N run.py ...`). Every rank builds the same loader with the
global batch, train.batch_size x N rows, and trains on its own contiguous rows (`shard_rows`), so N ranks
of b rows see exactly the batches of 1 rank of N*b rows. A rank's loss is the *sum* over its rows divided
by the global count of target tokens (every rank holds the whole batch, so it knows that count without
communicating) and multiplied by N, because DDP and FSDP average gradients over ranks: the gradient is the
1-rank gradient. `train.parallel=ddp` replicates the model (DistributedDataParallel); `train.parallel=fsdp`
shards parameters, gradients and optimizer state per block and at the root (FSDP2 `fully_shard`), and its
checkpoints hold the *full* (gathered) state dicts, so that a checkpoint is one file written by rank 0.

GPU pool. A multirun job on a CUDA host (the joblib launcher runs several at once) takes the first free GPU
of `device_pool`: an flock on `<sweep dir>/.gpu_locks/<host>-gpu<id>.lock`, held for the job's life and
released by the OS if the process dies. Locks are named by host and physical id (through
CUDA_VISIBLE_DEVICES), so jobs on other nodes or with other GPU allocations never wait for each other.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ablate.data.packing import PackedBatch
from ablate.data.tokenizer import IGNORE_INDEX

log = logging.getLogger("ablate")
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank `rank` of `world_size` (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host_group: Any = None  # a gloo group for host-side agreement (None: the default group is gloo)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.host_group)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor; the input is left as it was)."""
        if not self.enabled:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def agree_stop(self, stop: str | None) -> str | None:
        """A stop request on any rank stops every rank, after the same step."""
        if not self.enabled:
            return stop
        flag = torch.tensor([int(signal.Signals[stop]) if stop else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        return signal.Signals(int(flag)).name if int(flag) else None


SINGLE = Dist()


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, else None. Inside a submitit Slurm job
    of several tasks (one per GPU), the tasks' Slurm variables are exported as torchrun's first."""
    env = os.environ
    if "RANK" not in env and env.get("SUBMITIT_EXECUTOR") == "slurm" and int(env.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))


@contextmanager
def process_group(rank: int, world_size: int, local_rank: int,
                  device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Join the run's process group (NCCL on CUDA, gloo on CPU) for the duration of the block."""
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)
    try:
        host_group = dist.new_group(backend="gloo") if backend != "gloo" else None
        yield Dist(rank, world_size, local_rank, host_group), device
    finally:
        dist.destroy_process_group()


@contextmanager
def placement(cfg, device: torch.device) -> Iterator[tuple[Dist, torch.device]]:  # noqa: ANN001
    """Where this run's process trains: a rank of a torchrun job, a GPU of the sweep's pool, or as planned."""
    ranks = env_ranks()
    if ranks is not None and ranks[1] > 1:
        with process_group(*ranks, device) as placed:
            yield placed
        return
    lock_dir = sweep_lock_dir()
    pool = list(cfg.get("device_pool") or ())
    if device.type != "cuda" or not pool or lock_dir is None:
        yield SINGLE, device
        return
    with gpu_from_pool(pool, lock_dir) as index:
        torch.cuda.set_device(index)
        torch.cuda.reset_peak_memory_stats(index)  # a reused worker process: this job's peak, not the last's
        try:
            yield SINGLE, torch.device("cuda", index)
        finally:
            torch.cuda.empty_cache()  # the next job on this GPU may be another worker process


# ---- the data: every rank's rows of the global batch


def shard_rows(batch: PackedBatch, rank: int, world_size: int) -> PackedBatch:
    """Rank `rank`'s contiguous rows of a global batch. A rank left without rows (a short last validation
    batch) gets one row without targets, which adds nothing to a summed loss but keeps FSDP's collectives
    in step. `target_bytes` is dropped: counts are taken from the global batch."""
    rows, context = batch.tokens.shape
    per = -(-rows // world_size)
    lo, hi = min(rank * per, rows), min((rank + 1) * per, rows)
    if lo == hi:
        return PackedBatch(
            tokens=torch.zeros(1, context, dtype=batch.tokens.dtype),
            targets=torch.full((1, context), IGNORE_INDEX, dtype=batch.targets.dtype),
            positions=torch.arange(context).unsqueeze(0),
            doc_lens=((context,),), n_pad=context, target_bytes=None,
        )
    take = lambda t: t[lo:hi]  # noqa: E731
    return replace(batch, tokens=take(batch.tokens), targets=take(batch.targets), positions=take(batch.positions),
                   doc_lens=batch.doc_lens[lo:hi], n_pad=batch.n_pad if hi == rows else 0, target_bytes=None)


# ---- the model: wrapped for training, clipped, saved and restored whole


class SummedLoss(nn.Module):
    """The model's loss summed over a batch's targets, as `forward`: the training step's compiled
    region, and what DDP wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, positions_BT: torch.Tensor,
                layout: Any = None) -> torch.Tensor:
        return self.model.loss(tokens_BT, targets_BT, positions_BT, layout=layout, reduction="sum")


class TokenLosses(nn.Module):
    """The model's loss at every position, (B, T) float32 (0 where there is no target): evaluation's
    compiled region, from which losses per document (and their spread) are read."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, positions_BT: torch.Tensor,
                layout: Any = None) -> torch.Tensor:
        losses = self.model.loss(tokens_BT, targets_BT, positions_BT, layout=layout, reduction="none")
        return losses.view(tokens_BT.shape)


def parallelize(model: nn.Module, parallel: str) -> nn.Module:
    """Wrap the model in place for data-parallel training; returns batch -> summed loss, whose backward
    leaves every rank with the rank-averaged gradient (DDP: whole, FSDP: its shard)."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # the logits are a slice (a view) of the head's output; nothing writes into them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # embeddings, tied head and final norm
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "loss")  # the step calls loss(), not forward(): gather around it too
        return SummedLoss(model)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(SummedLoss(model), forward_sync_buffers=False)
    raise ValueError(f"train.parallel='{parallel}' is unknown; choose one of: {', '.join(PARALLEL)}")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_norm(parameters: Iterable[torch.Tensor], sharded: bool = False) -> torch.Tensor:
    """The norm of the whole gradient (gathered over shards for DTensor gradients), on the device."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
    return norm.full_tensor() if sharded and hasattr(norm, "full_tensor") else norm


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, sharded: bool = False) -> torch.Tensor:
    """Scale gradients to a norm of at most `max_norm`; returns the norm before clipping."""
    parameters = list(parameters)
    norm = grad_norm(parameters, sharded)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
    return norm


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts, whole. Sharded models gather them (every rank must call; rank 0
    receives them, on CPU); the optimizer's state is then keyed by parameter name, not index."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """The inverse of `full_state`, on every rank (each reads the same checkpoint file)."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


# ---- sweeps: one GPU per job


def sweep_lock_dir() -> Path | None:
    """Where a multirun job's GPU locks live (<sweep dir>/.gpu_locks), or None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir) / ".gpu_locks"


def physical_gpu(index: int) -> str:
    """The GPU behind CUDA index `index`, as CUDA_VISIBLE_DEVICES names it (an id or a UUID)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    name = visible[index] if index < len(visible) else str(index)
    return re.sub(r"[^\w.-]", "_", name)


@contextmanager
def gpu_from_pool(pool: Sequence[int], lock_dir: Path, poll_s: float = 1.0) -> Iterator[int]:
    """Hold the first free slot of `pool` (CUDA indices; an index listed k times is k slots, so that
    k small jobs share that GPU) for the block, and yield its GPU; wait while every slot is taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^\w.-]", "_", socket.gethostname())
    announced = False
    while True:
        for i, index in enumerate(pool):
            slot = list(pool[:i]).count(index)
            name = f"{host}-gpu{physical_gpu(index)}" + (f"-slot{slot}" if slot else "")
            handle = open(lock_dir / f"{name}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                log.info("job holds GPU %d (%s)", index, handle.name)
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not announced:
            log.info("all GPU slots of device_pool=%s are taken; waiting for one", list(pool))
            announced = True
        time.sleep(poll_s)
