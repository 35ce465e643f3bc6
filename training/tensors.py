"""The fast data path: a split made into inputs once, kept as one uint8 tensor on the training
device, and batches drawn and augmented there.

Each item is still made by its dataset, so by ``model_store.to_input`` under the run's card: the
pixels are those the per-item path gives, bit for bit (tested), and those serving computes. What
changes is that this happens once per (dataset files, card preprocessing) and is cached on disk,
not once per item per epoch through PIL in a DataLoader; and that shuffling and augmentation run as
batched tensor operations on the device, so a GPU is not starved by the host. Random draws come
from the run's loader generator (a CPU ``torch.Generator``, saved in the checkpoint), so a resumed
run continues exactly as an uninterrupted one would.

A split too large to hold (``MAX_BYTES``), or distributed training, keeps the DataLoader path;
``training.train`` logs which one a run takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from model_store import ModelCard
from model_store.files import atomic_output
from training.augment import Augment

logger = logging.getLogger(__name__)

MAX_BYTES = 16 * 2**30  # 60,000 x 3 x 224 x 224 is 9 GB: fits host memory and an H100's
CACHE_DIR = Path(os.environ.get("CLASSIC_CNNS_CACHE", Path.home() / ".cache" / "classic-cnns"))
_PREPROCESSING = ("in_channels", "height", "width", "resize", "interpolation", "decode")  # what decoding reads


def input_bytes(dataset: Dataset, card: ModelCard) -> int:
    return len(dataset) * card.in_channels * card.height * card.width


def as_tensors(
    dataset: Dataset, card: ModelCard, cache_dir: Path | None = CACHE_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs uint8 [N, C, H, W], labels int64 [N]) of every item of ``dataset``, in order.

    Cached in ``cache_dir`` under a key of the dataset's identity (its files' hashes, or its items'
    paths, sizes and times), the items taken (a ``--train-limit`` prefix is cached as itself, not
    as the whole split) and the card's preprocessing, when the dataset has an identity.
    """
    indices = range(len(dataset))
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, dataset.indices
    identity = getattr(dataset, "identity", None)
    path = None
    if identity is not None and cache_dir is not None:
        preprocessing = {name: getattr(card, name) for name in _PREPROCESSING}
        taken = [indices.start, indices.stop] if isinstance(indices, range) else list(map(int, indices))
        key = hashlib.sha256(json.dumps([identity(), taken, preprocessing], sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"inputs-{key[:24]}.npz"
        if (cached := _read_cache(path, (len(indices), card.in_channels, card.height, card.width))) is not None:
            return cached
    inputs = np.empty((len(indices), card.in_channels, card.height, card.width), np.uint8)
    labels = np.empty(len(indices), np.int64)
    for row, index in enumerate(indices):
        pixels, labels[row] = dataset[index]
        inputs[row] = pixels.numpy()
    if path is not None:
        with atomic_output(path) as f:
            np.savez(f, inputs=inputs, labels=labels)
        logger.info("inputs cached in %s", path)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _read_cache(path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache entry, or None when there is none or it is unusable (damaged by hand or disk: it is
    then made again and replaced, rather than ending the run)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            inputs, labels = cached["inputs"], cached["labels"]
    except Exception as err:  # BadZipFile, ValueError, KeyError, EOFError...: whatever a damaged file raises
        logger.warning("cache entry %s is unreadable (%s: %s); making the inputs again", path, type(err).__name__, err)
        return None
    if inputs.shape != shape or inputs.dtype != np.uint8 or labels.shape != shape[:1]:
        logger.warning(
            "cache entry %s holds %s %s, not uint8 %s; making the inputs again", path, inputs.dtype, inputs.shape, shape
        )
        return None
    logger.info("inputs from the cache %s", path)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


class TensorBatches:
    """Batches of (uint8 inputs, labels) from tensors on one device: shuffled by ``generator`` each
    epoch when it is given, augmented there when ``augment`` is. ``len()`` is the batch count."""

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        augment: Augment | None = None,
        drop_last: bool = False,
    ):
        self.inputs, self.labels = inputs.to(device), labels.to(device)
        self.batch_size, self.device, self.generator, self.augment = batch_size, device, generator, augment
        self.drop_last = drop_last

    def __len__(self) -> int:
        count = len(self.labels) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.generator is not None else torch.arange(n)
        order = order.to(self.device)
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            pixels = self.inputs[index]
            if self.augment is not None:
                pixels = augment_batch(pixels, self.augment, self.generator)
            yield pixels, self.labels[index]


def augment_batch(pixels: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """:class:`training.augment.Augment`'s three steps on a batch [B, C, H, W], each image with its
    own draws: crop with zero padding, horizontal flip, random erasing with noise."""
    batch, channels, height, width = pixels.shape
    device = pixels.device

    def uniform(*shape) -> torch.Tensor:  # drawn on the CPU generator, then moved: same on any device
        return to_device(torch.rand(shape, generator=generator), device)

    if augment.crop_padding:
        p = augment.crop_padding
        padded = F.pad(pixels, (p, p, p, p))
        top, left = to_device(torch.randint(0, 2 * p + 1, (2, batch), generator=generator), device).unbind(0)
        rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]  # [B, 1, H, 1]
        cols = (left[:, None] + torch.arange(width, device=device))[:, None, None, :]  # [B, 1, 1, W]
        samples = torch.arange(batch, device=device)[:, None, None, None]
        pixels = padded[samples, torch.arange(channels, device=device)[None, :, None, None], rows, cols]
    if augment.hflip:
        flip = uniform(batch) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    if augment.erasing:
        erase = uniform(batch) < augment.erasing
        # Area 2%..33% of the image, aspect ratio 0.3..3.3 (log-uniform), filled with noise.
        area = height * width * (0.02 + 0.31 * uniform(batch))
        aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * uniform(batch))
        h = torch.sqrt(area * aspect).round().clamp(1, height)
        w = torch.sqrt(area / aspect).round().clamp(1, width)
        top = (uniform(batch) * (height - h + 1)).floor()
        left = (uniform(batch) * (width - w + 1)).floor()
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + w)[:, None, None])
        )
        # The noise from the device's own generator (saved in checkpoints like the CPU one): copying a
        # batch of it from the host every step would cost more than the step on a GPU.
        noise = torch.randint(0, 256, pixels.shape, dtype=torch.uint8, device=device)
        pixels = torch.where((inside & erase[:, None, None])[:, None], noise, pixels)
    return pixels.contiguous()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU: a plain copy from pageable memory
    first waits for every step already queued, once per draw, every step. Pinned and non-blocking,
    the host runs ahead; PyTorch keeps the pinned source alive until the copy is done."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
