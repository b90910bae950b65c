"""Budgets of one suite run: what each claim trains, for how long, over how many seeds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from training.data import Dataset
from training.zoo import NetworkConfig

IMAGE_LRS = (0.01, 0.03, 0.1)  # the image models' grid: costlier, so three points
# image models: warm-up for both arms, and a longer budget for the slower no-BN arm
IMAGE = {"lrs": IMAGE_LRS, "warmups": (1.0,), "plain_epochs": 30}
HALF_DECADE = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Setting:
    """One (dataset, zoo model) pair with its epoch budget and learning-rate grid."""

    dataset: str
    model: str
    epochs: int
    width: int | None = None
    depth: int | None = None
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3)  # SGD, half-decade steps (extended at an edge)
    warmups: tuple[float, ...] = (0.0, 1.0)  # warm-up epochs tried in tuning
    plain_epochs: int | None = None  # the no-BN arm's own (longer) budget; None: ``epochs``

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.model}"

    def budget(self, norm: bool) -> int:
        """Epochs of the BN arm (``norm``) or of the no-BN arm."""
        return self.epochs if norm or self.plain_epochs is None else self.plain_epochs

    def model_config(self, data: Dataset, **overrides: Any) -> NetworkConfig:
        kw: dict[str, Any] = {"width": self.width, "depth": self.depth, **overrides}
        return NetworkConfig(self.model, data.input_shape, data.num_classes, **kw)


@dataclass(frozen=True)
class SuiteSettings:
    """``full()`` is sized for about 20 minutes on two shared CPU cores; ``quick()`` for tests."""

    mode: str
    seeds: int  # comparison seeds 0..seeds-1 of every experiment
    tuning_seeds: int  # seeds 1000.. on which each arm's learning rate is chosen
    max_extensions: int  # rates tried beyond a grid edge that keeps winning
    speed: tuple[Setting, ...]  # claims 1 and 9 (and 5: the first two)
    target_fractions: tuple[float, ...]  # claim 1: target = f * the slower arm's tuned val acc
    lr_settings: tuple[Setting, ...]  # claim 2
    lr_grid: tuple[float, ...]
    usable_margins: tuple[float, ...]  # claim 2: first one is the primary threshold
    regularization: Setting  # claim 3, on a small training subset, last checkpoint
    small_train: int
    reg_lrs: tuple[float, ...]  # AdamW
    sigmoid: tuple[Setting, ...]  # claim 4, vanishing gradients (Glorot init)
    sigmoid_batch: int
    saturation: tuple[float, ...]  # claim 4: a unit is saturated when s < t or s > 1 - t
    exploding: Setting  # claim 4, exploding gradients at larger init scales
    gains: tuple[float, ...]
    explode_lr: float
    santurkar: Setting  # claims 6 and 7
    santurkar_steps: int
    santurkar_every: int
    santurkar_lr: float
    affine: tuple[Setting, ...]  # claim 8
    batch_sizes: tuple[int, ...]  # the report's own claim: BN at very small batches
    small_batches: tuple[int, ...]
    batch_reference: int
    batch_epochs: int
    dropout: float = 0.3
    workers: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls) -> SuiteSettings:
        return cls(
            mode="full",
            seeds=10,
            tuning_seeds=2,
            max_extensions=2,
            speed=(
                Setting("digits", "mlp", 20),
                Setting("digits_hard", "cnn", 12, width=8, **IMAGE),  # type: ignore[arg-type]
                Setting("digits_hard", "mlp", 25),
                Setting("digits_hard", "resnet", 12, width=8, **IMAGE),  # type: ignore[arg-type]
                Setting("digits_hard", "mobilenet", 12, width=8, **IMAGE),  # type: ignore[arg-type]
            ),
            target_fractions=(0.95, 0.9, 0.98),
            lr_settings=(Setting("digits", "mlp", 8), Setting("breast_cancer", "mlp", 8)),
            lr_grid=HALF_DECADE[1:],
            usable_margins=(0.05, 0.03, 0.1),
            regularization=Setting("digits_small", "mlp", 60, width=128),
            small_train=200,
            reg_lrs=(0.001, 0.003, 0.01),
            sigmoid=(
                Setting("digits", "mlp", 30, 64, 4, lrs=(0.1, 0.3, 1.0), plain_epochs=60),
                Setting("digits", "mlp", 30, 64, 8, lrs=(0.1, 0.3, 1.0), plain_epochs=60),
            ),
            sigmoid_batch=60,
            saturation=(0.05, 0.01, 0.1),
            exploding=Setting("digits", "mlp", 3, width=64, depth=10),
            gains=(1.0, 2.0, 3.0),
            explode_lr=0.01,
            santurkar=Setting("digits_hard", "mlp", 0, width=64, depth=4),
            santurkar_steps=300,
            santurkar_every=25,
            santurkar_lr=0.05,
            affine=(Setting("digits", "mlp", 30), Setting("digits_hard", "mlp", 25)),
            batch_sizes=(2, 8, 64),
            small_batches=(2, 8),
            batch_reference=64,
            batch_epochs=2,
        )

    @classmethod
    def quick(cls) -> SuiteSettings:
        return cls(
            mode="quick",
            seeds=2,
            tuning_seeds=1,
            max_extensions=0,
            speed=(
                Setting("digits", "mlp", 3, lrs=(0.03, 0.1), warmups=(0.0,)),
                Setting(
                    "digits_hard", "cnn", 2, 4, lrs=(0.03, 0.1), warmups=(0.0,), plain_epochs=3
                ),
            ),
            target_fractions=(0.95, 0.9),
            lr_settings=(Setting("breast_cancer", "mlp", 2),),
            lr_grid=(0.01, 0.1, 10.0),
            usable_margins=(0.05, 0.1),
            regularization=Setting("digits_small", "mlp", 3, width=32),
            small_train=100,
            reg_lrs=(0.003,),
            sigmoid=(Setting("digits", "mlp", 2, 16, 3, lrs=(0.1,), plain_epochs=3),),
            sigmoid_batch=60,
            saturation=(0.05, 0.1),
            exploding=Setting("digits", "mlp", 1, width=16, depth=5),
            gains=(1.0, 3.0),
            explode_lr=0.01,
            santurkar=Setting("digits", "mlp", 0, width=16, depth=3),
            santurkar_steps=20,
            santurkar_every=10,
            santurkar_lr=0.05,
            affine=(Setting("digits", "mlp", 2),),
            batch_sizes=(16, 64),
            small_batches=(16,),
            batch_reference=64,
            batch_epochs=1,
            workers=1,
        )

    def with_seeds(self, seeds: int) -> SuiteSettings:
        if seeds < 2:
            raise ValueError(f"seeds must be >= 2 to measure a spread, got {seeds}")
        return replace(self, seeds=seeds)
