"""The fast data path (training/tensors.py): cached inputs equal the per-item ones bit for bit, the
cache is keyed by what the pixels depend on, batches cover an epoch once, and the batched
augmentation keeps Augment's semantics."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from model_store import ModelCard
from training.augment import Augment
from training.fashion_mnist import FashionMNIST
from training.fashion_mnist_files import FASHION_MNIST_CLASSES
from training.folder import ImageFolder
from training.tensors import TensorBatches, as_tensors, augment_batch

CARD = ModelCard(
    arch="lenet_bn", class_names=FASHION_MNIST_CLASSES, in_channels=1, height=32, width=32, mean=(0.3,), std=(0.3,)
)


def per_item(dataset) -> tuple[np.ndarray, np.ndarray]:
    items = [dataset[i] for i in range(len(dataset))]
    return np.stack([pixels.numpy() for pixels, _ in items]), np.array([label for _, label in items])


def test_cached_fashion_mnist_inputs_are_the_per_item_ones_bit_for_bit(fashion_test, tmp_path, monkeypatch):
    split = Subset(FashionMNIST("test", CARD), range(500))  # 28x28 fitted into 32x32: a real resize
    inputs, labels = as_tensors(split, CARD, tmp_path)
    expected_inputs, expected_labels = per_item(split)
    assert inputs.dtype == torch.uint8 and inputs.shape == (500, 1, 32, 32)
    assert np.array_equal(inputs.numpy(), expected_inputs) and np.array_equal(labels.numpy(), expected_labels)
    (cached,) = tmp_path.iterdir()

    def unreachable(self, index):
        raise AssertionError("a cached split is not preprocessed again")

    monkeypatch.setattr(FashionMNIST, "__getitem__", unreachable)
    again, _ = as_tensors(split, CARD, tmp_path)
    assert torch.equal(again, inputs) and list(tmp_path.iterdir()) == [cached]
    monkeypatch.undo()
    bicubic = dataclasses.replace(CARD, interpolation="bicubic")  # other preprocessing: another entry
    as_tensors(Subset(FashionMNIST("test", bicubic), range(500)), bicubic, tmp_path)
    as_tensors(Subset(FashionMNIST("test", CARD), range(400)), CARD, tmp_path)  # another prefix: another entry
    assert len(list(tmp_path.iterdir())) == 3


def test_cached_folder_inputs_match_and_follow_the_files(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for label, name in enumerate(("cats", "dogs")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            path = tmp_path / "data" / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30, 3), dtype=np.uint8)).save(path)
            items.append((path, label))
    card = dataclasses.replace(CARD, class_names=("cats", "dogs"), in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    card = dataclasses.replace(card, resize="crop")
    folder = ImageFolder(items, card)
    inputs, labels = as_tensors(folder, card, tmp_path / "cache")
    assert np.array_equal(inputs.numpy(), per_item(folder)[0]) and labels.tolist() == [0] * 4 + [1] * 4
    path = items[0][0]
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))  # changed content and time: the cache must not answer for the old file
    changed, _ = as_tensors(folder, card, tmp_path / "cache")
    assert not changed[0].any() and len(list((tmp_path / "cache").iterdir())) == 2


def test_batches_cover_an_epoch_once_in_an_order_the_seed_decides():
    inputs, labels = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1), torch.arange(10)
    order = [
        torch.cat(
            [y for _, y in TensorBatches(inputs, labels, 4, torch.device("cpu"), torch.Generator().manual_seed(s))]
        )
        for s in (1, 1, 2)
    ]
    assert sorted(order[0].tolist()) == list(range(10)) and torch.equal(order[0], order[1])
    assert not torch.equal(order[0], order[2])
    assert len(TensorBatches(inputs, labels, 4, torch.device("cpu"), drop_last=True)) == 2
    assert [len(y) for _, y in TensorBatches(inputs, labels, 4, torch.device("cpu"))] == [4, 4, 2]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(1, 256, (64, 3, 12, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_batched_crop_takes_a_window_of_the_zero_padded_image(images):
    out = augment_batch(images, Augment(crop_padding=3), torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3))
    offsets = set()
    for b in range(len(images)):
        found = [
            (t, c) for t in range(7) for c in range(7) if torch.equal(out[b], padded[b, :, t : t + 12, c : c + 16])
        ]
        assert found, b
        offsets.add(found[0])
    assert len(offsets) > 10  # each image drew its own offsets


def test_batched_flip_mirrors_about_half_of_the_images(images):
    out = augment_batch(images, Augment(hflip=True), torch.Generator().manual_seed(2))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48


def test_batched_erasing_replaces_one_rectangle_of_2_to_33_percent_with_noise(images):
    torch.manual_seed(3)
    out = augment_batch(images, Augment(erasing=1.0), torch.Generator().manual_seed(3))
    for o, i in zip(out, images):
        changed = (o != i).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        area = (height * width).item()
        # the changed pixels lie in one rectangle; noise may equal a pixel by chance, so bounds, not equality
        assert changed.any() and area <= 0.33 * 12 * 16 * 1.2, area  # 1.2: h and w are rounded up to whole pixels


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", "truncate"])
def test_a_damaged_cache_entry_is_made_again_not_the_end_of_the_run(fashion_test, tmp_path, damage):
    split = Subset(FashionMNIST("test", CARD), range(50))
    expected, _ = as_tensors(split, CARD, tmp_path)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(entry.read_bytes()[:1000] if damage == "truncate" else damage)
    again, labels = as_tensors(split, CARD, tmp_path)
    assert torch.equal(again, expected) and len(labels) == 50
    assert torch.equal(as_tensors(split, CARD, tmp_path)[0], expected)  # and the entry was replaced
