"""A run's data put together: its flags, the card it trains under, its (train, test) splits, and
the same splits rebuilt from a checkpoint for export and evaluate.

The data sets themselves are in ``fashion_mnist``, ``folder`` and ``synthetic``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from model_store import ModelCard
from training.augment import Augment
from training.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from training.folder import ImageFolder, scan_folder
from training.synthetic import SHAPE_CLASSES, SyntheticShapes

DATASETS = ("fashion-mnist", "folder", "synthetic")


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale of uint8 images [N, H, W] or [N, C, H, W]."""
    x = images.astype(np.float64) / 255.0
    axes = (0, 1, 2) if x.ndim == 3 else (0, 2, 3)
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    return tuple(np.atleast_1d(mean).round(4).tolist()), tuple(np.atleast_1d(std).round(4).tolist())


class Augmented(Dataset):
    def __init__(self, dataset: Dataset, augment: Augment):
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.dataset[index]
        return self.augment(pixels), label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="fashion-mnist", choices=DATASETS, help="training data (default: fashion-mnist)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Fashion-MNIST files or the image folder (default: auto for fashion-mnist)",
    )
    parser.add_argument(
        "--in-channels",
        type=int,
        default=None,
        choices=(1, 3),
        help="input channels (default: 1 for fashion-mnist and synthetic, 3 for folder)",
    )
    parser.add_argument(
        "--resize",
        default=None,
        choices=("fit", "stretch", "crop"),
        help="how images reach the input size (default: fit; crop for folder)",
    )
    parser.add_argument(
        "--val-ratio", type=float, default=0.1, help="folder without train/ and val/: validation share (default: 0.1)"
    )
    parser.add_argument("--synthetic-size", type=int, default=512, help="synthetic: training images (default: 512)")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use only the first N training images (default: all)"
    )
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (default: all)")


def load_data(args: argparse.Namespace, arch: str, arch_args: dict, size: int) -> tuple[Dataset, Dataset, ModelCard]:
    """(train set, test/validation set, the run's card) for the chosen dataset; the card's mean and
    std are measured on the training inputs."""
    channels = args.in_channels or (3 if args.dataset == "folder" else 1)
    scanned = _scan(args) if args.dataset == "folder" else None  # walk a folder once, however large
    if scanned:
        classes = scanned[0]
    else:
        classes = FASHION_MNIST_CLASSES if args.dataset == "fashion-mnist" else SHAPE_CLASSES
    card = ModelCard(
        arch=arch,
        arch_args=arch_args,
        class_names=classes,
        in_channels=channels,
        height=size,
        width=size,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        resize=args.resize or ("crop" if args.dataset == "folder" else "fit"),
        interpolation="bilinear",
        dataset=args.dataset,
    )
    train, test = splits(args, card, scanned)
    if isinstance(train, FashionMNIST):
        mean, std = channel_stats(train.images[: args.train_limit])  # exact, from all raw training pixels
        mean, std = mean * channels, std * channels  # a grayscale set has the same statistics on each channel
    else:
        step = max(1, len(train) // 1000)  # at most 1,000 evenly spaced images for the statistics
        mean, std = channel_stats(stack_items(train, range(0, len(train), step))[0])
    # Only mean and std change, and to_input does not read them: the datasets already preprocess right.
    card = dataclasses.replace(card, mean=mean, std=std)
    train, test = _limit(train, args.train_limit), _limit(test, args.test_limit)
    augment = Augment.from_args(args)
    return (Augmented(train, augment) if augment else train), test, card


def splits(args: argparse.Namespace, card: ModelCard, scanned: tuple | None = None) -> tuple[Dataset, Dataset]:
    """The full (train, test/validation) sets of a run's dataset, preprocessed under ``card``;
    ``scanned`` is a folder's ``scan_folder`` result when the caller already has it."""
    if args.dataset == "fashion-mnist":
        return FashionMNIST("train", card, args.data_dir), FashionMNIST("test", card, args.data_dir)
    if args.dataset == "folder":
        classes, train_items, val_items = scanned or _scan(args)
        if classes != list(card.class_names):
            raise ValueError(
                f"{args.data_dir} now has classes {classes}, the model was trained on {list(card.class_names)}"
            )
        return ImageFolder(train_items, card), ImageFolder(val_items, card)
    return SyntheticShapes(args.synthetic_size, card, args.seed), SyntheticShapes(
        max(64, args.synthetic_size // 4), card, args.seed + 1
    )


def stack_items(dataset: Dataset, indices) -> tuple[np.ndarray, np.ndarray]:
    """The chosen items of a preprocessed dataset as arrays: uint8 inputs [N, C, H, W] and labels [N]."""
    items = [dataset[int(i)] for i in indices]
    return np.stack([pixels.numpy() for pixels, _ in items]), np.array([label for _, label in items])


def run_splits(card: ModelCard, run_args: dict, data_dir: Path | None = None) -> tuple[Dataset, Dataset]:
    """The (train, test/validation) sets a checkpoint's run used, rebuilt from the arguments it
    saved (``data_dir`` overrides where the data now is), without augmentation."""
    run = argparse.Namespace(**run_args)
    if not hasattr(run, "dataset"):
        run.dataset = card.dataset  # checkpoints from before --dataset existed were all Fashion-MNIST
    if card.dataset != run.dataset:
        raise ValueError(f"the checkpoint's card says dataset {card.dataset!r} but its arguments say {run.dataset!r}")
    run.data_dir = data_dir or (Path(run.data_dir) if getattr(run, "data_dir", None) else None)
    for name, default in (("val_ratio", 0.1), ("seed", 0), ("synthetic_size", 512)):
        setattr(run, name, getattr(run, name, default))
    return splits(run, card)


def evaluation_split(
    card: ModelCard, run_args: dict, data_dir: Path | None = None, limit: int | None = None
) -> Dataset:
    """The test or validation set a checkpoint's run was tested on (see ``run_splits``); the
    first ``limit`` images if given."""
    return _limit(run_splits(card, run_args, data_dir)[1], limit)


def _scan(args: argparse.Namespace):
    if args.data_dir is None:
        raise ValueError("--dataset folder needs --data-dir, the folder of class sub-folders")
    return scan_folder(Path(args.data_dir), args.val_ratio, args.seed)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
