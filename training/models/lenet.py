"""LeNet-5 as the course builds it: conv-pool-conv-pool-fc-fc-fc, for 28x28 inputs.

``lenet`` is the original (sigmoid, average pooling); ``lenet_bn`` puts BatchNorm before every
activation but the last. ``activation="relu"`` and ``pool="max"`` give the modern variant.
"""

from torch import nn

from model_store.errors import UsageError
from training.models import register_model

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
_POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


def _lenet(in_channels: int, num_classes: int, batch_norm: bool, activation: str, pool: str) -> nn.Sequential:
    if activation not in _ACTIVATIONS:
        raise UsageError(f"invalid activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
    if pool not in _POOLS:
        raise UsageError(f"invalid pool {pool!r}; choose from {sorted(_POOLS)}")
    act, pool_layer = _ACTIVATIONS[activation], _POOLS[pool]

    def norm(layer: nn.Module, features: int, bn: type[nn.Module]) -> list[nn.Module]:
        # Bias is redundant before BatchNorm, which has its own shift.
        return [layer, bn(features), act()] if batch_norm else [layer, act()]

    return nn.Sequential(
        *norm(nn.Conv2d(in_channels, 6, 5, padding=2, bias=not batch_norm), 6, nn.BatchNorm2d),
        pool_layer(2, 2),
        *norm(nn.Conv2d(6, 16, 5, bias=not batch_norm), 16, nn.BatchNorm2d),
        pool_layer(2, 2),
        nn.Flatten(),
        # LazyLinear would infer 16*5*5, but an explicit size fails early on a wrong input size.
        *norm(nn.Linear(16 * 5 * 5, 120, bias=not batch_norm), 120, nn.BatchNorm1d),
        *norm(nn.Linear(120, 84, bias=not batch_norm), 84, nn.BatchNorm1d),
        nn.Linear(84, num_classes),
    )


@register_model("lenet", default_size=28)
def lenet(in_channels: int = 1, num_classes: int = 10, activation: str = "sigmoid", pool: str = "avg"):
    return _lenet(in_channels, num_classes, False, activation, pool)


@register_model("lenet_bn", default_size=28)
def lenet_bn(in_channels: int = 1, num_classes: int = 10, activation: str = "sigmoid", pool: str = "avg"):
    return _lenet(in_channels, num_classes, True, activation, pool)
