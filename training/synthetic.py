"""A tiny learnable data set for tests and smoke runs: no files, no download."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from model_store import ModelCard

SHAPE_CLASSES = tuple(f"shape{i}" for i in range(10))


class SyntheticShapes(Dataset):
    """Class k is a bright square at its own place on dim noise; ``seed`` fixes every image."""

    def __init__(self, count: int, card: ModelCard, seed: int):
        rng = np.random.default_rng(seed)
        self.card, side = card, max(2, min(card.height, card.width) // 4)
        self.labels = rng.integers(0, card.num_classes, count)
        self.inputs = rng.integers(0, 60, (count, card.in_channels, card.height, card.width), dtype=np.uint8)
        for image, label in zip(self.inputs, self.labels):
            row, col = divmod(int(label), 4)
            top, left = (row * side) % (card.height - side + 1), (col * side) % (card.width - side + 1)
            image[:, top : top + side, left : left + side] = rng.integers(200, 256, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.inputs[index].copy()), int(self.labels[index])
