"""Fashion-MNIST's four original idx files: found, read and checked, with numpy only.

The files come from ``--data-dir`` if given, else from the Debian package's folder
(``apt-get install dataset-fashion-mnist``), else they are downloaded with torchvision into ./data.
Torch-free, so that the benchmarks and tests that only need the images (to send them as PNGs, say)
do not import torch; ``training.fashion_mnist`` makes them a training dataset.
"""

from __future__ import annotations

import functools
import gzip
import logging
from pathlib import Path

import numpy as np

from model_store.errors import UsageError
from model_store.files import file_sha256

logger = logging.getLogger(__name__)

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
        raise UsageError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"{path}: header says shape {shape} but holds {body.size} bytes (truncated?)")
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
            raise UsageError(f"--data-dir {data_dir} lacks Fashion-MNIST file(s): {', '.join(missing)}")
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
        raise UsageError(
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
        raise UsageError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def file_hashes(split: str, data_dir: Path | None = None) -> list[str]:
    """The SHA-256 of the split's two files: what its images and labels are, by content."""
    folder = find_fashion_mnist(data_dir)
    return [file_sha256(_find(folder, stem)) for stem in _FILES[split]]
