"""Fashion-MNIST as (uint8 input, label) pairs under a card, for training and evaluation.

The files are found and read by ``training.fashion_mnist_files``. Every image goes through
``model_store.to_input`` with the run's card, the same function serving uses, so training and
serving cannot disagree about pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from model_store import ModelCard, to_input
from training.fashion_mnist_files import file_hashes, load_fashion_mnist


class FashionMNIST(Dataset):
    """(input uint8 [C, H, W], label) pairs, each input made by ``to_input`` under ``card``."""

    def __init__(self, split: str, card: ModelCard, data_dir: Path | None = None):
        self.images, self.labels = load_fashion_mnist(split, data_dir)
        self.card, self.split, self.data_dir = card, split, data_dir

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = to_input(Image.fromarray(self.images[index]), self.card)
        return torch.from_numpy(pixels), int(self.labels[index])

    def identity(self) -> list:
        """What the inputs depend on besides the card: the split's two files, by content."""
        return ["fashion-mnist", *file_hashes(self.split, self.data_dir)]
