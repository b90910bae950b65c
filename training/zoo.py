"""The BN model zoo: each network has a no-BN twin (``norm=False``) and a BN placement.

Every model is an ``nn.Sequential`` whose first layer standardizes raw inputs
with statistics fitted on the training split, so exported models take raw
features. ``bn_position="before"`` means layer -> BN -> activation (the usual
placement); ``"after"`` means layer -> activation -> BN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

BNPosition = Literal["before", "after"]
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


class ZooError(ValueError):
    """Unknown model or bad architecture option; names the valid choices."""


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed buffers; shapes broadcast over ``(N, *input_shape)``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class NetworkConfig:
    """Everything needed to rebuild a zoo model (stored in a run's ``config.json``)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    norm: bool = True
    bn_position: BNPosition = "before"
    depth: int | None = None
    width: int | None = None
    activation: str = "relu"
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # weight init of every Linear/Conv: "default" (PyTorch's), "glorot" (Xavier-uniform)
    # or "he" (Kaiming-normal, fan-in); init_gain multiplies the init's scale
    init: str = "default"
    init_gain: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ZooError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _unit(layer: nn.Module, bn: nn.Module, act: nn.Module | None, pos: BNPosition) -> nn.Sequential:
    """layer -> BN -> act, or layer -> act -> BN."""
    parts = (
        [layer, bn] if act is None else [layer, bn, act] if pos == "before" else [layer, act, bn]
    )
    return nn.Sequential(*parts)


def _conv_bias(cfg: NetworkConfig) -> bool:
    """A conv needs its bias unless BN directly follows it (BN's beta takes the bias's role)."""
    return not cfg.norm or cfg.bn_position == "after"


def _bn(kind: Literal[1, 2], channels: int, norm: bool) -> nn.Module:
    if not norm:
        return nn.Identity()
    return nn.BatchNorm1d(channels) if kind == 1 else nn.BatchNorm2d(channels)


def build_mlp(cfg: NetworkConfig) -> list[nn.Module]:
    depth, width = cfg.depth or 2, cfg.width or 64
    features = int(np.prod(cfg.input_shape))
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers.append(
            _unit(
                nn.Linear(features, width, bias=True),
                _bn(1, width, cfg.norm),
                _act(cfg.activation),
                cfg.bn_position,
            )
        )
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        features = width
    layers.append(nn.Linear(features, cfg.num_classes))
    return layers


def _need_image(cfg: NetworkConfig) -> tuple[int, int, int]:
    if len(cfg.input_shape) != 3:
        raise ZooError(
            f"model {cfg.name!r} needs image inputs (C, H, W), got input shape {cfg.input_shape}; "
            "use 'mlp' for vector data"
        )
    c, h, w = cfg.input_shape
    return c, h, w


def _head(channels: int, cfg: NetworkConfig) -> list[nn.Module]:
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if cfg.dropout > 0:
        head.append(nn.Dropout(cfg.dropout))
    return [*head, nn.Linear(channels, cfg.num_classes)]


def build_cnn(cfg: NetworkConfig) -> list[nn.Module]:
    """VGG-style stages of two (Conv3x3 -> BN -> act), then 2x2 max-pool while size allows."""
    c, h, w = _need_image(cfg)
    depth, width = cfg.depth or 2, cfg.width or 32
    layers: list[nn.Module] = []
    for stage in range(depth):
        out = width * 2**stage
        for _ in range(2):
            layers.append(
                _unit(
                    nn.Conv2d(c, out, 3, padding=1, bias=_conv_bias(cfg)),
                    _bn(2, out, cfg.norm),
                    _act(cfg.activation),
                    cfg.bn_position,
                )
            )
            c = out
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    return layers + _head(c, cfg)


class BasicBlock(nn.Module):
    """ResNet basic block: two bias-free 3x3 convs with BN; conv1x1+BN shortcut on reshape."""

    def __init__(self, cin: int, cout: int, stride: int, cfg: NetworkConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _unit(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=_conv_bias(cfg)),
                _bn(2, cout, cfg.norm),
                _act(cfg.activation),
                cfg.bn_position,
            ),
            _unit(
                nn.Conv2d(cout, cout, 3, 1, 1, bias=not cfg.norm),
                _bn(2, cout, cfg.norm),
                None,
                cfg.bn_position,
            ),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=not cfg.norm), _bn(2, cout, cfg.norm)
            )
        self.act = _act(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.body(x) + self.shortcut(x))
        return out


def build_resnet(cfg: NetworkConfig) -> list[nn.Module]:
    """A small CIFAR-style ResNet: stem, ``depth`` stages of one basic block each."""
    c, h, w = _need_image(cfg)
    depth, width = cfg.depth or 3, cfg.width or 16
    layers: list[nn.Module] = [
        _unit(
            nn.Conv2d(c, width, 3, 1, 1, bias=_conv_bias(cfg)),
            _bn(2, width, cfg.norm),
            _act(cfg.activation),
            cfg.bn_position,
        )
    ]
    c = width
    for stage in range(depth):
        out = width * 2**stage
        stride = 2 if stage > 0 and min(h, w) >= 4 else 1
        h, w = h // stride, w // stride
        layers.append(BasicBlock(c, out, stride, cfg))
        c = out
    return layers + _head(c, cfg)


def build_mobilenet(cfg: NetworkConfig) -> list[nn.Module]:
    """MobileNet-v1 style: depthwise 3x3 (groups = channels) + BN, pointwise 1x1 + BN."""
    c, h, w = _need_image(cfg)
    depth, width = cfg.depth or 3, cfg.width or 16
    act, pos, norm = cfg.activation, cfg.bn_position, cfg.norm
    stem = nn.Conv2d(c, width, 3, 1, 1, bias=_conv_bias(cfg))
    layers: list[nn.Module] = [_unit(stem, _bn(2, width, norm), _act(act), pos)]
    c = width
    for stage in range(depth):
        out = width * 2 ** (stage + 1)
        stride = 2 if min(h, w) >= 4 else 1
        h, w = h // stride, w // stride
        layers.append(
            _unit(
                nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=_conv_bias(cfg)),
                _bn(2, c, norm),
                _act(act),
                pos,
            )
        )
        pointwise = nn.Conv2d(c, out, 1, bias=_conv_bias(cfg))
        layers.append(_unit(pointwise, _bn(2, out, norm), _act(act), pos))
        c = out
    return layers + _head(c, cfg)


MODELS: dict[str, Callable[[NetworkConfig], list[nn.Module]]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "mobilenet": build_mobilenet,
}
MODEL_DESCRIPTIONS = {
    "mlp": "Linear -> BatchNorm1d -> activation (depth, width, activation configurable)",
    "cnn": "VGG-style Conv2d -> BatchNorm2d -> ReLU stages with max-pool",
    "resnet": "basic blocks, bias-free convs, conv1x1+BN shortcut",
    "mobilenet": "depthwise conv (groups=channels) + BN, pointwise conv + BN",
}


def init_weights(model: nn.Module, scheme: str, gain: float) -> None:
    """Re-initialize every Linear/Conv weight by ``scheme`` times ``gain``, biases to 0."""
    if scheme not in ("default", "glorot", "he"):
        raise ZooError(f"unknown init {scheme!r}; choose default, glorot or he")
    for m in model.modules():
        if not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        if scheme == "glorot":
            nn.init.xavier_uniform_(m.weight)
        elif scheme == "he":
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if scheme != "default" and m.bias is not None:
            nn.init.zeros_(m.bias)
        with torch.no_grad():
            m.weight.mul_(gain)


def build_model(
    cfg: NetworkConfig,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> nn.Sequential:
    """Build ``cfg``'s network, with a first :class:`Standardize` layer.

    ``mean``/``std`` default to identity standardization (used when a state_dict
    will be loaded over the model). Raises :class:`ZooError` on a bad name/option.
    """
    if cfg.name not in MODELS:
        raise ZooError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    if cfg.bn_position not in ("before", "after"):
        raise ZooError(f"bn_position must be 'before' or 'after', got {cfg.bn_position!r}")
    shape = (cfg.input_shape[0],) + (1,) * (len(cfg.input_shape) - 1)
    if len(cfg.input_shape) == 1:
        shape = cfg.input_shape
    mean = np.zeros(shape, np.float32) if mean is None else mean
    std = np.ones(shape, np.float32) if std is None else std
    model = nn.Sequential(Standardize(mean, std), *MODELS[cfg.name](cfg))
    if cfg.init != "default" or cfg.init_gain != 1.0:
        init_weights(model, cfg.init, cfg.init_gain)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_batchnorms(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
