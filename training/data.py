"""A run's data put together from its ``DataSpec``: the card it trains under, its splits (train,
test, and the validation split held out of the training images), and the same splits rebuilt from
a checkpoint for export and evaluate.

The data sets themselves are in ``fashion_mnist``, ``folder`` and ``synthetic``; which one a run
uses, and which of its images, is in ``dataspec``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from model_store import ModelCard
from model_store.card import DECODES
from model_store.errors import UsageError
from training.augment import Augment
from training.dataspec import DataSpec
from training.fashion_mnist import FashionMNIST
from training.fashion_mnist_files import FASHION_MNIST_CLASSES
from training.folder import ImageFolder, scan_folder
from training.reviewed import read_reviewed
from training.synthetic import SHAPE_CLASSES, SyntheticShapes

logger = logging.getLogger(__name__)


class Splits(NamedTuple):
    train: Dataset  # what the run trains on
    test: Dataset  # what it reports on: the test split, or a folder's validation split
    validation: Dataset | None  # held out of the training images for export's calibration; None: not held out
    field: Dataset | None = None  # --reviewed: the labelled captures held out of training
    outside: Dataset | None = None  # --reviewed: the captures labelled not_in_domain (label -1), never trained on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """How images become inputs: choices the card records, with defaults that follow --dataset."""
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
        "--decode",
        default="scaled",
        choices=DECODES,
        help="scaled: a large JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps what the "
        "resize needs (several times faster for photos, pixels within a grey level or so); full: every "
        "pixel (default: %(default)s)",
    )


def make_card(
    spec: DataSpec,
    arch: str,
    arch_args: dict,
    size: int,
    classes: tuple[str, ...] | list[str],
    in_channels: int | None = None,
    resize: str | None = None,
    decode: str = "scaled",
) -> ModelCard:
    """The run's card, with mean and std of 0.5 until ``load_data`` measures them on the training inputs."""
    channels = in_channels or (3 if spec.dataset == "folder" else 1)
    return ModelCard(
        arch=arch,
        arch_args=arch_args,
        class_names=classes,
        in_channels=channels,
        height=size,
        width=size,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        resize=resize or ("crop" if spec.dataset == "folder" else "fit"),
        interpolation="bilinear",
        decode=decode,
        dataset=spec.dataset,
    )


def load_data(
    spec: DataSpec,
    arch: str,
    arch_args: dict,
    size: int,
    in_channels: int | None = None,
    resize: str | None = None,
    augment: Augment | None = None,
    decode: str = "scaled",
) -> tuple[Splits, ModelCard]:
    """(the run's splits, its card) of ``spec``: the card's mean and std are measured on the
    training inputs, ``augment`` wraps the training set, and the test and validation splits are cut
    to ``spec.test_limit``."""
    scanned = _scan(spec) if spec.dataset == "folder" else None  # walk a folder once, however large
    if scanned:
        classes = scanned[0]
    else:
        classes = FASHION_MNIST_CLASSES if spec.dataset == "fashion-mnist" else SHAPE_CLASSES
    card = make_card(spec, arch, arch_args, size, classes, in_channels, resize, decode)
    parts = splits(spec, card, scanned)
    if parts.validation is not None:
        logger.info("held out %d of the %s training images for validation", len(parts.validation), spec.dataset)
    train, test = _limit(parts.train, spec.train_limit), _limit(parts.test, spec.test_limit)
    validation = _limit(parts.validation, spec.test_limit) if parts.validation is not None else None
    base, rows = (train.dataset, train.indices) if isinstance(train, Subset) else (train, range(len(train)))
    if isinstance(base, FashionMNIST):
        mean, std = channel_stats(base.images[np.asarray(rows)])  # exact, from all raw training pixels
        mean, std = mean * card.in_channels, std * card.in_channels  # grayscale: the same on each channel
    else:
        step = max(1, len(train) // 1000)  # at most 1,000 evenly spaced images for the statistics
        mean, std = channel_stats(stack_items(train, range(0, len(train), step))[0])
    # Only mean and std change, and to_input does not read them: the datasets already preprocess right.
    card = dataclasses.replace(card, mean=mean, std=std)
    return Splits(Augmented(train, augment) if augment else train, test, validation), card


def splits(spec: DataSpec, card: ModelCard, scanned: tuple | None = None) -> Splits:
    """The full splits of ``spec``, preprocessed under ``card``; ``scanned`` is a folder's
    ``scan_folder`` result when the caller already has it."""
    if spec.dataset == "fashion-mnist":
        train, test = FashionMNIST("train", card, spec.data_dir), FashionMNIST("test", card, spec.data_dir)
    elif spec.dataset == "folder":
        classes, train_items, val_items = scanned or _scan(spec)
        if classes != list(card.class_names):
            raise UsageError(
                f"{spec.data_dir} now has classes {classes}, the model was trained on {list(card.class_names)}"
            )
        train, test = ImageFolder(train_items, card), ImageFolder(val_items, card)
    else:
        train = SyntheticShapes(spec.synthetic_size, card, spec.seed)
        test = SyntheticShapes(max(64, spec.synthetic_size // 4), card, spec.seed + 1)
    if not spec.hold_out:
        parts = Splits(train, test, None)
    else:
        kept, held = hold_out(np.asarray(train.labels), spec.val_ratio, spec.seed)
        parts = Splits(Subset(train, kept), test, Subset(train, held) if held else None)  # too few: none held
    return with_reviewed(parts, spec, card) if spec.reviewed is not None else parts


def with_reviewed(parts: Splits, spec: DataSpec, card: ModelCard) -> Splits:
    """``parts`` with the reviewed images of ``spec.reviewed`` trained on beside a replay of the
    dataset's training images (``spec.replay_ratio`` of them per reviewed image, all when None),
    their held-out share as ``field``, and the not-in-domain ones as ``outside``."""
    reviewed = read_reviewed(spec.reviewed, card.class_names)
    replay = parts.train
    if spec.replay_ratio is not None:
        count = min(len(replay), round(spec.replay_ratio * len(reviewed.train)))
        picked = np.sort(np.random.default_rng(spec.seed).permutation(len(replay))[:count]).tolist()
        replay = (
            Subset(replay.dataset, [replay.indices[i] for i in picked])
            if isinstance(replay, Subset)
            else Subset(replay, picked)
        )
    train = (
        ConcatDataset([ImageFolder(reviewed.train, card), replay]) if len(replay) else ImageFolder(reviewed.train, card)
    )
    field = ImageFolder(reviewed.held_out, card) if reviewed.held_out else None
    outside = ImageFolder([(path, -1) for path in reviewed.outside], card) if reviewed.outside else None
    return parts._replace(train=train, field=field, outside=outside)


def hold_out(labels: np.ndarray, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) positions, each in order: ``ratio`` of each class held out, drawn with ``seed``
    (a class of one image keeps it)."""
    rng = np.random.default_rng(seed)
    held = [
        rng.permutation(members)[: round(len(members) * ratio)]
        for members in (np.flatnonzero(labels == label) for label in np.unique(labels))
    ]
    out = np.zeros(len(labels), bool)
    out[np.concatenate([np.zeros(0, np.int64), *held])] = True
    return np.flatnonzero(~out).tolist(), np.flatnonzero(out).tolist()


def run_splits(card: ModelCard, spec: DataSpec) -> Splits:
    """The full splits a checkpoint's run used, without augmentation or limits: ``spec`` is
    ``DataSpec.from_checkpoint`` of it, ``card`` its card."""
    if card.dataset != spec.dataset:
        raise UsageError(f"the checkpoint's card says dataset {card.dataset!r} but its data spec says {spec.dataset!r}")
    return splits(spec, card)


def stack_items(dataset: Dataset, indices) -> tuple[np.ndarray, np.ndarray]:
    """The chosen items of a preprocessed dataset as arrays: uint8 inputs [N, C, H, W] and labels [N]."""
    items = [dataset[int(i)] for i in indices]
    return np.stack([pixels.numpy() for pixels, _ in items]), np.array([label for _, label in items])


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


def _scan(spec: DataSpec):
    return scan_folder(spec.data_dir, spec.val_ratio, spec.seed)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    if not limit:
        return dataset
    if isinstance(dataset, Subset):  # a subset of the dataset itself, so the tensor cache still knows it
        return Subset(dataset.dataset, dataset.indices[:limit])
    return Subset(dataset, range(min(limit, len(dataset))))


def folder_halves(folder, card: ModelCard, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A labelled image folder split in half per class (``scan_folder`` at a ratio of 0.5), each
    half decoded under ``card`` as the service decodes: {"validation": (pixels, labels), "test":
    (...)}, labels indexing ``card.class_names``. Folders are class names, "/" percent-encoded
    (``model_store.captures.folder_name``); one that is not a class of the card is a UsageError."""
    from urllib.parse import unquote

    classes, first, second = scan_folder(folder, 0.5, seed)
    unknown = sorted({unquote(name) for name in classes} - set(card.class_names))
    if unknown:
        raise UsageError(
            f"{folder} has class folder(s) {unknown} that are not the model's classes: {', '.join(card.class_names)}"
        )
    index = {i: card.class_names.index(unquote(name)) for i, name in enumerate(classes)}
    halves = {}
    for split, items in (("validation", second), ("test", first)):
        dataset = ImageFolder([(path, index[label]) for path, label in items], card)
        halves[split] = stack_items(dataset, range(len(dataset)))
    return halves
