"""The model registry: thin builders, one per architecture, looked up by name.

Every builder takes ``in_channels`` and ``num_classes`` (the head follows the card's class list)
plus its own keyword arguments, which the card records so a checkpoint rebuilds its network.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from model_store import ModelCard
from model_store.errors import UsageError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_SIZES: dict[str, int] = {}


def register_model(name: str, default_size: int) -> Callable:
    """Decorator: add a builder under ``name``; ``default_size`` is its textbook input side."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name], _DEFAULT_SIZES[name] = builder, default_size
        return builder

    return add


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def default_size(name: str) -> int:
    _check_name(name)
    return _DEFAULT_SIZES[name]


def get_model(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """The bare network: float input, normalized, of shape [N, in_channels, H, W] -> logits."""
    _check_name(name)
    builder = _BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("in_channels", "num_classes")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UsageError(f"model {name!r} takes no argument(s) {unknown}; it takes: {', '.join(accepted) or 'none'}")
    return builder(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")


class Normalize(nn.Module):
    """uint8 pixels -> normalized float, with the card's mean and std.

    This module is part of the trained model and so of the exported graph: the server feeds raw
    uint8 pixels and cannot normalize differently from training.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        # Not persistent: they are the card's numbers, and the card is the one place they live.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.scale.dtype) * self.scale + self.shift


def build_model(card: ModelCard) -> nn.Sequential:
    """The network a card describes, taking uint8 input [N, C, H, W]: ``normalize`` then ``net``."""
    net = get_model(card.arch, card.in_channels, card.num_classes, **card.arch_args)
    return nn.Sequential(OrderedDict(normalize=Normalize(card.mean, card.std), net=net))


from training.models import alexnet, densenet, googlenet, lenet, nin, resnet, vgg  # noqa: E402,F401  (registers builders)
