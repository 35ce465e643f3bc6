"""DenseNet as the course builds it: growth rate 32, four dense blocks of four BN-ReLU-conv units,
transition layers halving channels and size, for 96x96 inputs."""

import torch
from torch import nn

from training.models import register_model


def bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
    )


class DenseBlock(nn.Module):
    """Each unit sees the concatenation of the block input and every earlier unit's output."""

    def __init__(self, units: int, in_channels: int, growth_rate: int):
        super().__init__()
        self.units = nn.ModuleList(bn_relu_conv(in_channels + i * growth_rate, growth_rate, 3) for i in range(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = torch.cat((x, unit(x)), dim=1)
        return x


@register_model("densenet", default_size=96)
def densenet(
    in_channels: int = 1, num_classes: int = 10, growth_rate: int = 32, units: tuple = (4, 4, 4, 4)
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    channels = 64
    for index, count in enumerate(units):
        layers.append(DenseBlock(count, channels, growth_rate))
        channels += count * growth_rate
        if index != len(units) - 1:  # a transition halves channels and spatial size
            layers += [bn_relu_conv(channels, channels // 2, 1), nn.AvgPool2d(2, stride=2)]
            channels //= 2
    layers += [
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    ]
    return nn.Sequential(*layers)
