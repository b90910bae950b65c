"""Training quality bars of the foundation issue: accuracy and wall time per model/dataset.

    python bench/train_quality.py [--seeds 3]

Prints one row per (model, dataset, seed) and the mean, with the machine's conditions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch

from training.data import load_dataset
from training.train import TrainConfig, train
from training.zoo import NetworkConfig

CASES = [
    ("cnn", "digits", TrainConfig(epochs=10), 0.98),
    ("mlp", "breast_cancer", TrainConfig(epochs=30, batch_size=32, lr=1e-3), 0.95),
    ("mlp", "wine", TrainConfig(epochs=50, batch_size=16, lr=3e-3), 0.95),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| model | dataset | seed | test accuracy | epochs | seconds | bar |")
    print("|---|---|---|---|---|---|---|")
    for model, dataset, cfg, bar in CASES:
        accs, secs = [], []
        for seed in range(args.seeds):
            ds = load_dataset(dataset, seed=seed)
            tcfg = TrainConfig(**{**cfg.__dict__, "seed": seed})
            m = train(
                NetworkConfig(model, ds.input_shape, ds.num_classes), ds, tcfg, progress=False
            ).metrics
            accs.append(m["test_accuracy"])
            secs.append(m["seconds"])
            print(
                f"| {model} | {dataset} | {seed} | {m['test_accuracy']:.4f} | {m['epochs']} "
                f"| {m['seconds']:.1f} | >= {bar} |"
            )
        print(
            f"| {model} | {dataset} | mean | {statistics.mean(accs):.4f} "
            f"(min {min(accs):.4f}) | | {statistics.mean(secs):.1f} | >= {bar} |"
        )


if __name__ == "__main__":
    main()
