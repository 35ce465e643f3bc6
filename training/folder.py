"""A user's image folder: one sub-folder per class, with ``train/`` and ``val/`` or split by ratio.

    photos/train/cat/*.jpg  photos/train/dog/*.jpg  photos/val/cat/...   (explicit split)
    photos/cat/*.jpg        photos/dog/*.jpg                              (--val-ratio split)

Images go through ``model_store.image_bytes_to_input``: decode, colour mode and resize exactly as
the service will do them.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from model_store import ImageError, ModelCard, image_bytes_to_input
from model_store.captures import NOT_IN_DOMAIN
from model_store.errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
Items = list[tuple[Path, int]]


def _class_dirs(root: Path) -> list[Path]:
    """The class sub-folders: not hidden ones, and not ``not_in_domain/``, where an export of
    reviewed captures keeps the images that are no class at all (model_store.captures)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != NOT_IN_DOMAIN)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_folder(root: Path, val_ratio: float, seed: int) -> tuple[list[str], Items, Items]:
    """(class names, train items, validation items) of an image folder."""
    if not root.is_dir():
        raise UsageError(f"--data-dir {root} is not a folder")
    explicit = (root / "train").is_dir() and (root / "val").is_dir()
    class_root = root / "train" if explicit else root
    classes = [d.name for d in _class_dirs(class_root)]
    if len(classes) < 2:
        raise UsageError(f"{class_root} needs at least two class sub-folders, found {classes}")
    train: Items = []
    val: Items = []
    rng = random.Random(seed)
    for index, name in enumerate(classes):
        files = _images(class_root / name)
        if not files:
            raise UsageError(f"class folder {class_root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if explicit:
            train += [(f, index) for f in files]
            val += [(f, index) for f in _images(root / "val" / name)] if (root / "val" / name).is_dir() else []
        else:
            if not 0.0 < val_ratio < 1.0:
                raise UsageError(f"--val-ratio must be between 0 and 1, got {val_ratio}")
            rng.shuffle(files)  # stratified: each class is split by the same ratio
            cut = max(1, round(len(files) * val_ratio))
            val += [(f, index) for f in files[:cut]]
            train += [(f, index) for f in files[cut:]]
    if explicit:
        unknown = sorted({d.name for d in _class_dirs(root / "val")} - set(classes))
        if unknown:
            raise UsageError(f"{root / 'val'} has classes {unknown} that {root / 'train'} lacks")
    if not val:
        raise UsageError(f"{root} gives no validation images")
    return classes, train, val


class ImageFolder(Dataset):
    """(input uint8 [C, H, W], label) for each (file, label) item."""

    def __init__(self, items: Items, card: ModelCard):
        self.items, self.card = items, card

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            pixels = image_bytes_to_input(path.read_bytes(), self.card)
        except ImageError as err:
            raise UsageError(f"{path}: {err}") from None  # a broken training image is worth stopping for
        return torch.from_numpy(pixels), label

    def identity(self) -> list:
        """What the inputs depend on besides the card: each file by path, size and modification time."""
        return ["folder", [(str(path), *_size_and_time(path), label) for path, label in self.items]]


def _size_and_time(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
