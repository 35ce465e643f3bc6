"""Training-time augmentation on uint8 inputs [C, H, W], as the course uses it: random crop with
zero padding, horizontal flip, random erasing. All off by default (a faithful textbook run)."""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from model_store.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random-crop-padding", type=int, default=0, help="pad by N then crop back at random (default: 0, off)"
    )
    parser.add_argument("--hflip", action="store_true", help="random horizontal flip (default: off)")
    parser.add_argument(
        "--random-erasing", type=float, default=0.0, help="probability of erasing a rectangle (default: 0, off)"
    )


class Augment:
    """Picklable, so DataLoader workers can run it; randomness from torch's per-worker generator."""

    def __init__(self, crop_padding: int = 0, hflip: bool = False, erasing: float = 0.0):
        if crop_padding < 0 or not 0.0 <= erasing <= 1.0:
            raise UsageError(
                f"--random-crop-padding must be >= 0 and --random-erasing in [0, 1], got {crop_padding}, {erasing}"
            )
        self.crop_padding, self.hflip, self.erasing = crop_padding, hflip, erasing

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Augment | None:
        augment = cls(args.random_crop_padding, args.hflip, args.random_erasing)
        return augment if augment.active else None

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.hflip or self.erasing)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        _, height, width = pixels.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(pixels, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            pixels = padded[:, top : top + height, left : left + width]
        if self.hflip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        if self.erasing and torch.rand(()) < self.erasing:
            pixels = pixels.clone()
            # Area 2%..33% of the image, aspect ratio 0.3..3.3 (log-uniform), filled with noise.
            area = height * width * (0.02 + 0.31 * torch.rand(()).item())
            aspect = math.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(()).item())
            h = min(height, max(1, round(math.sqrt(area * aspect))))
            w = min(width, max(1, round(math.sqrt(area / aspect))))
            top = torch.randint(0, height - h + 1, ()).item()
            left = torch.randint(0, width - w + 1, ()).item()
            pixels[:, top : top + h, left : left + w] = torch.randint(
                0, 256, (pixels.shape[0], h, w), dtype=pixels.dtype
            )
        return pixels.contiguous()
