"""Class-activation maps (Zhou et al., 2016) computed inside the exported graph.

For a network whose head is global average pooling then one linear layer, the logit of class k is
the average over positions of ``w_k . f(x, y)``; that sum before averaging, ``w_k . f(x, y)``, is
where the network saw class k. The graph computes it for the top class and upsamples it to the
input size, so serving explains an answer with one extra output: no torch, no gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model_store.card import CAM_ARCHS
from model_store.errors import UsageError

CAM_OUTPUT_NAME = "cam"


def cam_parts(arch: str, net: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """The network split at its global average pool: the feature extractor, and the linear layer
    after the pool (None for NiN, whose last convolution already emits one map per class)."""
    if arch.startswith("resnet"):
        return net.features(), net.fc
    if arch == "densenet":  # ... BN, ReLU, AdaptiveAvgPool2d, Flatten, Linear
        return net[:-3], net[-1]
    if arch == "googlenet":  # the last block ends Inception, Inception, AdaptiveAvgPool2d, Flatten; then Linear
        return nn.Sequential(*net[:-2], net[-2][:-2]), net[-1]
    if arch == "nin":  # ... the class-map block, AdaptiveAvgPool2d, Flatten
        return net[:-2], None
    raise UsageError(
        f"model {arch!r} has no global-average-pool head, so it has no class-activation map; "
        f"the models that have one: {', '.join(CAM_ARCHS)}"
    )


class CamModel(nn.Module):
    """uint8 pixels (or normalized floats) -> (logits [N, classes], cam [N, H, W]): the map of each
    image's top class, bilinearly upsampled to the input's height and width, in logit units."""

    def __init__(self, model: nn.Sequential, arch: str, float_input: bool = False):
        super().__init__()
        self.normalize = None if float_input else model.normalize
        self.features, self.fc = cam_parts(arch, model.net)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        if self.normalize is not None:
            x = self.normalize(x)
        maps = self.features(x)  # [N, C, h, w]
        if self.fc is None:  # NiN: a map per class already; the logits are their averages
            logits = maps.mean((2, 3))
            cam = torch.gather(maps, 1, logits.argmax(1)[:, None, None, None].expand(-1, 1, *maps.shape[-2:]))
        else:
            logits = self.fc(maps.mean((2, 3)))
            weights = self.fc.weight[logits.argmax(1)]  # [N, C]: the top class's row
            # The bias is a constant over positions: left out, as in the paper; it shifts no peak.
            cam = (maps * weights[:, :, None, None]).sum(1, keepdim=True)
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
        return logits, cam[:, 0]
