"""Training data: Fashion-MNIST, a user's image folder, or a tiny synthetic set, as uint8 inputs.

Fashion-MNIST comes from its four original idx files: in ``--data-dir`` if given, else in the
Debian package's folder (``apt-get install dataset-fashion-mnist``), else downloaded with
torchvision into ./data. Every image goes through ``model_store.to_input`` with the run's card,
the same function serving uses, so training and serving cannot disagree about pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from model_store import ModelCard, to_input
from model_store.files import file_sha256
from training.augment import Augment
from training.folder import ImageFolder, scan_folder

logger = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "folder", "synthetic")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path("data")
# The label order of the dataset's authors (zalandoresearch/fashion-mnist README).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz): the big-endian format MNIST and Fashion-MNIST ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: Path | None) -> Path:
    """The folder holding the four files; downloads them only if no local copy exists."""
    stems = [stem for pair in _FILES.values() for stem in pair]
    if data_dir is not None:
        missing = [s for s in stems if _find(data_dir, s) is None]
        if missing:
            raise FileNotFoundError(f"--data-dir {data_dir} lacks Fashion-MNIST file(s): {', '.join(missing)}")
        return data_dir
    for folder in (DEBIAN_DIR, DOWNLOAD_ROOT / "FashionMNIST" / "raw"):
        if all(_find(folder, s) for s in stems):
            return folder
    logger.info("Fashion-MNIST not found locally; downloading it with torchvision into %s", DOWNLOAD_ROOT)
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(DOWNLOAD_ROOT), train=True, download=True)
        FashionMNIST(str(DOWNLOAD_ROOT), train=False, download=True)
    except Exception as err:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {DEBIAN_DIR} and could not be downloaded ({err}); "
            "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir"
        ) from None
    return DOWNLOAD_ROOT / "FashionMNIST" / "raw"


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the "train" or "test" split, read-only and
    cached: statistics, datasets and verification share one copy."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(_FILES)}")
    folder = find_fashion_mnist(data_dir)
    images_stem, labels_stem = _FILES[split]
    images, labels = read_idx(_find(folder, images_stem)), read_idx(_find(folder, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


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
        folder = find_fashion_mnist(self.data_dir)
        return ["fashion-mnist", *(_file_hash(_find(folder, stem)) for stem in _FILES[self.split])]


@functools.lru_cache(maxsize=8)
def _file_hash(path: Path) -> str:
    return file_sha256(path)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale of uint8 images [N, H, W] or [N, C, H, W]."""
    x = images.astype(np.float64) / 255.0
    axes = (0, 1, 2) if x.ndim == 3 else (0, 2, 3)
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    return tuple(np.atleast_1d(mean).round(4).tolist()), tuple(np.atleast_1d(std).round(4).tolist())


class SyntheticShapes(Dataset):
    """A tiny learnable set for tests: class k is a bright square at its own place on dim noise."""

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
        classes = list(FASHION_MNIST_CLASSES) if args.dataset == "fashion-mnist" else [f"shape{i}" for i in range(10)]
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
