"""python -m training evaluate --checkpoint runs/lenet_bn/best.pt

Per-class accuracy (printed, and written to per_class.csv) and a confusion-matrix PNG, on the
test or validation split the run was tested on, rebuilt from the data spec in the checkpoint.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from model_store.files import atomic_output
from training.checkpoint import load_model
from training.data import run_splits
from training.dataspec import DataSpec
from training.plots import plot_confusion


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="a checkpoint written by `python -m training train`"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the data is now, if it moved (default: as trained)"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where to write the files (default: the checkpoint's folder)"
    )
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default: 512)")


@torch.no_grad()
def confusion_matrix(model: torch.nn.Module, loader: DataLoader, num_classes: int) -> np.ndarray:
    """matrix[true, predicted] = count."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for pixels, labels in loader:
        predicted = model(pixels).argmax(1)
        matrix += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(
            num_classes, num_classes
        )
    return matrix.numpy()


def main(args: argparse.Namespace) -> np.ndarray:
    model, card, payload = load_model(args.checkpoint)
    test = run_splits(card, DataSpec.from_checkpoint(payload, card, args.data_dir)).test
    matrix = confusion_matrix(model, DataLoader(test, args.batch_size), card.num_classes)
    output_dir = args.output_dir or args.checkpoint.parent
    images, correct = matrix.sum(axis=1), np.diag(matrix)
    with atomic_output(output_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("class", "images", "correct", "accuracy"))
        for name, n, c in zip(card.class_names, images, correct):
            writer.writerow((name, int(n), int(c), f"{c / max(1, n):.4f}"))
    plot_confusion(matrix, list(card.class_names), output_dir / "confusion.png")
    width = max(len(n) for n in card.class_names)
    for name, n, c in zip(card.class_names, images, correct):
        print(f"{name:<{width}}  {c / max(1, n):.4f}  ({int(c)}/{int(n)})")
    print(
        f"{'all':<{width}}  {correct.sum() / matrix.sum():.4f}  ({int(correct.sum())}/{int(matrix.sum())}); "
        f"wrote {output_dir / 'per_class.csv'} and {output_dir / 'confusion.png'}"
    )
    return matrix
