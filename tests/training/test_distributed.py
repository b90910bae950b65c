"""Two torchrun processes with SyncBatchNorm train what one process trains on the global batch.

Both runs go through the real command (``torchrun ... -m training train
--distributed``, gloo on CPU); the reference replays the same global batches
(each the concatenation of the two processes' DistributedSampler shards) in one
process with plain BatchNorm. SyncBatchNorm must match it to 1e-5 in every
weight and running statistic, and lie far from what plain DDP trains (each shard
normalized alone, rank 0's running statistics kept), replayed in this process too
(docs/benchmarks.md: the replay equals a real ``--no-sync-bn`` launch in every weight and
statistic). That ``--no-sync-bn`` leaves the network's own BN layers under DDP is
checked in a one-process group, not in a third launch.

Both sides train in float64. In float32 the comparison is a coin toss for the
CNN: at its 21st step on digits a max-pool window holds two values 4e-7 apart,
below float32's rounding of the forward pass, so which one wins (and takes the
gradient) depends on summation order; the losing run ends 3.7e-3 away in
running_mean. The float32 reference itself, fed each global batch with its two
shards swapped, lands that far from itself, as do half of its runs on shuffled
(mathematically equal) batches. In float64 such runs agree to 1e-14.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DistributedSampler, TensorDataset

from tests import ROOT
from training.data import load_dataset
from training.distributed import data_parallel, init_distributed, shutdown_distributed
from training.sync_batchnorm import SyncBatchNorm
from training.train import TrainConfig, seed_everything
from training.zoo import NetworkConfig, build_model

PROCESSES = 2
CONFIG = TrainConfig(
    optimizer="sgd", lr=0.05, schedule="constant", epochs=1, batch_size=32, dtype="float64"
)
# The CNN at 8 channels (32 by default): the same BatchNorm2d layers and steps, on 4-D
# inputs, for less CPU in each launch.
WIDTH = {"mlp": None, "cnn": 8}


def _torchrun(out: Path, model: str, dataset: str, sync_bn: bool) -> dict[str, torch.Tensor]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={PROCESSES}",
        "-m",
        "training",
        "train",
        "--distributed",
        "--sync-bn" if sync_bn else "--no-sync-bn",
        "--device",
        "cpu",
        f"--model={model}",
        f"--dataset={dataset}",
        *([f"--width={WIDTH[model]}"] if WIDTH[model] else []),
        f"--optimizer={CONFIG.optimizer}",
        f"--lr={CONFIG.lr}",
        f"--schedule={CONFIG.schedule}",
        f"--epochs={CONFIG.epochs}",
        f"--batch-size={CONFIG.batch_size}",
        f"--seed={CONFIG.seed}",
        f"--dtype={CONFIG.dtype}",
        f"--out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state: dict[str, torch.Tensor] = torch.load(out / "model.pt", weights_only=True)
    return state


def _one_process(model: str, dataset: str, per_shard_bn: bool) -> dict[str, torch.Tensor]:
    """What the two processes train, replayed in this one on the same shards.

    ``per_shard_bn`` False: one network fed each global batch (rank 0's samples, then
    rank 1's), which is what SyncBatchNorm promises. True: what plain DDP does, two
    replicas each normalizing over its own shard, their gradients averaged, rank 0's
    replica returned (DDP keeps rank 0's running statistics).
    """
    data = load_dataset(dataset, seed=CONFIG.seed)
    seed_everything(CONFIG.seed)
    mean, std = data.standardization()
    dtype = getattr(torch, CONFIG.dtype)
    config = NetworkConfig(model, data.input_shape, data.num_classes, width=WIDTH[model])
    net = build_model(config, mean, std).to(dtype)
    replicas = [net, *(copy.deepcopy(net) for _ in range(PROCESSES - 1))] if per_shard_bn else [net]
    opts = [
        torch.optim.SGD(
            r.parameters(), lr=CONFIG.lr, momentum=CONFIG.momentum, weight_decay=CONFIG.weight_decay
        )
        for r in replicas
    ]
    ds = TensorDataset(torch.from_numpy(data.X_train).to(dtype), torch.from_numpy(data.y_train))
    shards = []
    for rank in range(PROCESSES):
        sampler = DistributedSampler(ds, PROCESSES, rank, shuffle=True, seed=CONFIG.seed)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    local = CONFIG.batch_size // PROCESSES
    size = len(shards[0])
    last = size if size % local != 1 else size - 1  # train() drops a 1-sample last batch
    for r in replicas:
        r.train()
    for start in range(0, last, local):
        batches = [shard[start : start + local] for shard in shards]
        if not per_shard_bn:
            batches = [[i for batch in batches for i in batch]]  # the global batch
        for replica, opt, index in zip(replicas, opts, batches, strict=True):
            x, y = ds[index]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(replica(x), y).backward()
        for params in zip(*(r.parameters() for r in replicas), strict=True):
            grad = torch.stack([p.grad for p in params if p.grad is not None]).mean(0)
            for p in params:
                p.grad = grad.clone()
        for opt in opts:
            opt.step()
    return net.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> float:
    keys = [k for k in a if k.endswith(part) and a[k].is_floating_point()]
    assert keys, part
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


# Both BN kinds (BatchNorm1d in the MLP, BatchNorm2d in the CNN) go through SyncBatchNorm
# in a real two-process launch (each launch is three processes importing torch).
@pytest.mark.parametrize(("model", "dataset"), [("mlp", "breast_cancer"), ("cnn", "digits")])
def test_sync_batchnorm_trains_as_one_process_on_the_global_batch(
    tmp_path: Path, model: str, dataset: str
):
    reference = _one_process(model, dataset, per_shard_bn=False)
    synced = _torchrun(tmp_path / "sync", model, dataset, sync_bn=True)

    assert synced.keys() == reference.keys()
    steps = [k for k in reference if k.endswith("num_batches_tracked")]
    assert all(synced[k] == reference[k] > 10 for k in steps)
    for part in ("running_mean", "running_var", "weight", "bias"):
        assert _max_diff(synced, reference, part) < 1e-5, part
    # What plain DDP trains (each process's BN on its own shard, rank 0's statistics kept)
    # lies far from it: the comparison above tells synced BN from plain.
    plain = _one_process(model, dataset, per_shard_bn=True)
    assert _max_diff(plain, synced, "running_mean") > 1e-3
    assert _max_diff(plain, synced, "running_var") > 1e-3
    assert _max_diff(plain, synced, "weight") > 1e-5


@pytest.mark.parametrize("sync_bn", [False, True])
def test_sync_bn_flag_picks_the_batchnorm_that_ddp_wraps(
    monkeypatch: pytest.MonkeyPatch, unused_port: int, sync_bn: bool
) -> None:
    """What ``--sync-bn`` / ``--no-sync-bn`` hand to init_distributed: every BN layer becomes
    a SyncBatchNorm, or each stays the network's own (plain DDP), in a one-process group
    joined from torchrun's variables."""
    torchrun = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 1, "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**torchrun, "MASTER_PORT": unused_port}.items():
        monkeypatch.setenv(name, str(value))
    ctx = init_distributed("cpu", sync_batchnorm=sync_bn)
    try:
        net = build_model(NetworkConfig("mlp", (4,), 3, depth=2, width=8))
        ddp = data_parallel(net, ctx)
        kinds = [type(m) for m in net.modules() if isinstance(m, _BatchNorm)]
        assert kinds == [SyncBatchNorm if sync_bn else nn.BatchNorm1d] * 2
        assert ddp.module is net and ctx.world_size == 1 and ctx.backend == "gloo"
    finally:
        shutdown_distributed()
