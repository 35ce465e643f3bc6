"""VGG: blocks of 3x3 convolutions and a 2x2 max pool, depth from one config table, for 224x224.

``width_divisor`` divides every convolution's channels (the course trains VGG-11 at 1/4 width);
``batch_norm`` adds BatchNorm after each convolution.
"""

from torch import nn

from model_store.errors import UsageError
from training.models import register_model

# Output channels per convolution; "M" is a 2x2 max pool. Five pools take 224 to 7.
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _vgg(
    config: list, in_channels: int, num_classes: int, width_divisor: int, batch_norm: bool, dropout: float
) -> nn.Sequential:
    if width_divisor < 1:
        raise UsageError(f"width_divisor must be at least 1, got {width_divisor}")
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = item // width_divisor
        layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not batch_norm))
        layers += [nn.BatchNorm2d(out), nn.ReLU()] if batch_norm else [nn.ReLU()]
        channels = out
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(),
        nn.Linear(channels * 7 * 7, 4096),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


def _register(name: str) -> None:
    def builder(
        in_channels: int = 1,
        num_classes: int = 10,
        width_divisor: int = 1,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> nn.Sequential:
        return _vgg(CONFIGS[name], in_channels, num_classes, width_divisor, batch_norm, dropout)

    builder.__name__ = name
    register_model(name, default_size=224)(builder)


for _name in CONFIGS:
    _register(_name)
