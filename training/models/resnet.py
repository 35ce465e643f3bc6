"""ResNet-18 / ResNet-34 for 96x96 inputs (the ImageNet stem: 7x7 stride-2 conv and a max pool).

Module names follow torchvision's (conv1, bn1, layer1..layer4, fc), so a torchvision ImageNet
state_dict loads into it for fine-tuning; only the head, and for grayscale the stem, differ.
"""

import torch
from torch import nn

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
    def __init__(self, blocks: tuple[int, int, int, int], in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, channels = (64, 128, 256, 512), 64
        for index, (count, width) in enumerate(zip(blocks, widths), start=1):
            stride = 1 if index == 1 else 2
            layer = [BasicBlock(channels, width, stride)] + [BasicBlock(width, width) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layer))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18", default_size=96)
def resnet18(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), in_channels, num_classes)


@register_model("resnet34", default_size=96)
def resnet34(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet((3, 4, 6, 3), in_channels, num_classes)
