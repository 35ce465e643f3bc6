"""ResNets: ResNet-18 / ResNet-34 for 96x96 inputs (the ImageNet stem: 7x7 stride-2 conv and a max
pool), and ResNet-20 for 28x28 (the paper's CIFAR network: a 3x3 stem and three stages of three
blocks, 16, 32 and 64 channels wide), small and fast enough to train on a laptop's CPU.

Module names follow torchvision's (conv1, bn1, layer1..layer4, fc), so a torchvision ImageNet
state_dict loads into ResNet-18 for fine-tuning; only the head, and for grayscale the stem, differ.
"""

import torch
from torch import nn

from model_store.errors import UsageError
from training.models import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the input; a 1x1 conv-BN shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """A stem, then one stage of ``blocks[i]`` blocks ``widths[i]`` wide per entry (each after the
    first halves the resolution), then global average pooling and one linear layer.

    ``small_stem``: a 3x3 stride-1 convolution and no max pool, for 28-32 px inputs; otherwise the
    ImageNet stem, which has already divided the side by 4 before the first block.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        in_channels: int,
        num_classes: int,
        small_stem: bool = False,
    ):
        super().__init__()
        channels = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.layers = []  # the stages, in order; each is also a named child layer1, layer2, ...
        for index, (count, width) in enumerate(zip(blocks, widths), start=1):
            stride = 1 if index == 1 else 2
            layer = [BasicBlock(channels, width, stride)] + [BasicBlock(width, width) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layer))
            self.layers.append(f"layer{index}")
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self) -> nn.Sequential:
        """Everything before the pool, sharing this network's modules: the last feature maps."""
        return nn.Sequential(
            self.conv1, self.bn1, self.relu, self.maxpool, *(getattr(self, name) for name in self.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.layers:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18", default_size=96)
def resnet18(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), in_channels, num_classes)


@register_model("resnet34", default_size=96)
def resnet34(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), in_channels, num_classes)


@register_model("resnet20", default_size=28)
def resnet20(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """He et al. (2016), section 4.2: 6n+2 layers with n=3; ``width`` is the first stage's channels."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise UsageError(f"resnet20: width must be a positive integer, got {width!r}")
    return ResNet((3, 3, 3), (width, 2 * width, 4 * width), in_channels, num_classes, small_stem=True)
