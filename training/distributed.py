"""Data-parallel training under ``torchrun``: process group, device, SyncBatchNorm, DDP.

``torchrun --nproc_per_node=N -m training train --distributed ...`` starts N
processes and describes them in the environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Each joins one process group
(gloo on CPU, NCCL on GPU, one GPU per process), trains a replica on its shard
of every global batch, and DistributedDataParallel averages the gradients, so
all replicas take the same step. With ``sync_batchnorm`` the BN layers
normalize over the global batch (:mod:`training.sync_batchnorm`); without it
each process normalizes over its own shard and DDP copies rank 0's running
statistics to the others, which then differ from one process's on the global
batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed run that cannot start: not under torchrun, or a device it cannot use."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the group, and the device and backend it trains with."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" or "nccl"
    sync_batchnorm: bool = True

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and progress."""
        return self.rank == 0


def init_distributed(device: str = "auto", sync_batchnorm: bool = True) -> DistributedContext:
    """Join the process group that torchrun's environment describes.

    ``device``: ``auto`` (this process's GPU, ``cuda:LOCAL_RANK``, when CUDA is
    available, else the CPU), ``cpu`` or ``cuda``. Raises DistributedError when
    a torchrun variable is missing or there are fewer GPUs than local processes.
    """
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(
            f"--distributed runs under torchrun (missing {', '.join(missing)}); start it "
            "with `torchrun --nproc_per_node=N -m training train --distributed ...`"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} needs GPU {local_rank}, but "
                f"{torch.cuda.device_count()} are visible; start at most that many "
                "processes per node, or train with --device cpu"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device in ("auto", "cpu"):
        dev = torch.device("cpu")
    else:
        raise DistributedError(f"unknown device {device!r}; choose auto, cpu or cuda")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    log.info("rank %d of %d on %s (%s)", rank, world_size, dev, backend)
    return DistributedContext(rank, world_size, local_rank, dev, backend, sync_batchnorm)


def shutdown_distributed() -> None:
    """Leave the process group once every process has reached this point."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(model: nn.Module, ctx: DistributedContext) -> DistributedDataParallel:
    """``model`` (already on ``ctx.device``) as a DDP replica, BN synced if ``ctx`` asks.

    The BN layers are converted in place, so ``model`` itself (not the wrapper)
    is what to evaluate and checkpoint: its ``state_dict`` keys are the plain
    network's.
    """
    if ctx.sync_batchnorm:
        convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all processes (float64), e.g. per-epoch loss sums and counts."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.cpu()]
