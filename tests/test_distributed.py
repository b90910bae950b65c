"""Two torchrun processes with SyncBatchNorm train what one process trains on the global batch.

Both runs go through the real command (``torchrun ... -m training train
--distributed``, gloo on CPU); the reference replays the same global batches
(each the concatenation of the two processes' DistributedSampler shards) in one
process with plain BatchNorm. SyncBatchNorm must match it to 1e-5 in every
weight and running statistic; plain DDP (``--no-sync-bn``) normalizes each
shard alone and keeps rank 0's running statistics, which must not match (on the MLP).

Both sides train in float64. In float32 the comparison is a coin toss for the
CNN: at its 21st step on digits a max-pool window holds two values 4e-7 apart,
below float32's rounding of the forward pass, so which one wins (and takes the
gradient) depends on summation order; the losing run ends 3.7e-3 away in
running_mean. The float32 reference itself, fed each global batch with its two
shards swapped, lands that far from itself, as do half of its runs on shuffled
(mathematically equal) batches. In float64 such runs agree to 1e-14.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from training.data import load_dataset
from training.train import TrainConfig, seed_everything
from training.zoo import NetworkConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
CONFIG = TrainConfig(
    optimizer="sgd", lr=0.05, schedule="constant", epochs=1, batch_size=32, dtype="float64"
)


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


def _one_process_on_global_batches(model: str, dataset: str) -> dict[str, torch.Tensor]:
    """What train() does in one process, fed the global batches the two processes shared."""
    data = load_dataset(dataset, seed=CONFIG.seed)
    seed_everything(CONFIG.seed)
    mean, std = data.standardization()
    dtype = getattr(torch, CONFIG.dtype)
    net = build_model(NetworkConfig(model, data.input_shape, data.num_classes), mean, std).to(dtype)
    opt = torch.optim.SGD(
        net.parameters(), lr=CONFIG.lr, momentum=CONFIG.momentum, weight_decay=CONFIG.weight_decay
    )
    ds = TensorDataset(torch.from_numpy(data.X_train).to(dtype), torch.from_numpy(data.y_train))
    shards = []
    for rank in range(PROCESSES):
        sampler = DistributedSampler(ds, PROCESSES, rank, shuffle=True, seed=CONFIG.seed)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    local = CONFIG.batch_size // PROCESSES
    size = len(shards[0])
    last = size if size % local != 1 else size - 1  # train() drops a 1-sample last batch
    net.train()
    for start in range(0, last, local):
        index = [i for shard in shards for i in shard[start : start + local]]
        x, y = ds[index]  # (B, *input_shape), (B,): rank 0's samples, then rank 1's
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> float:
    keys = [k for k in a if k.endswith(part) and a[k].is_floating_point()]
    assert keys, part
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


# Both BN kinds (BatchNorm1d in the MLP, BatchNorm2d in the CNN) go through SyncBatchNorm;
# that plain DDP does not match is shown once, on the MLP (a torchrun launch costs 15-20 s
# of CPU: three processes importing torch).
@pytest.mark.parametrize(
    ("model", "dataset", "check_plain"), [("mlp", "breast_cancer", True), ("cnn", "digits", False)]
)
def test_sync_batchnorm_trains_as_one_process_on_the_global_batch(
    tmp_path: Path, model: str, dataset: str, check_plain: bool
):
    reference = _one_process_on_global_batches(model, dataset)
    synced = _torchrun(tmp_path / "sync", model, dataset, sync_bn=True)

    assert synced.keys() == reference.keys()
    steps = [k for k in reference if k.endswith("num_batches_tracked")]
    assert all(synced[k] == reference[k] > 10 for k in steps)
    for part in ("running_mean", "running_var", "weight", "bias"):
        assert _max_diff(synced, reference, part) < 1e-5, part
    if not check_plain:
        return
    plain = _torchrun(tmp_path / "plain", model, dataset, sync_bn=False)
    # Plain DDP: each process's BN saw half the batch, and rank 0's statistics won.
    assert _max_diff(plain, reference, "running_mean") > 1e-3
    assert _max_diff(plain, reference, "running_var") > 1e-3
    assert _max_diff(plain, reference, "weight") > 1e-5
