"""AlexNet as the course adapts it (one tower, 96-256-384-384-256 channels), for 224x224 inputs."""

from torch import nn

from training.models import register_model


@register_model("alexnet", default_size=224)
def alexnet(in_channels: int = 1, num_classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        # 5x5 at 224 already; adaptive pooling lets other input sizes reach the same classifier.
        nn.AdaptiveAvgPool2d((5, 5)),
        nn.Flatten(),
        nn.Linear(256 * 5 * 5, 4096),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )
