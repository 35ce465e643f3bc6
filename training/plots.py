"""The pictures the course draws: training curves per epoch, and a confusion matrix.

Pictures are a convenience, not a result: without matplotlib (a bare GPU machine) they are skipped
with one warning, and training and evaluation go on.
"""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path

import numpy as np

from model_store.files import atomic_output

logger = logging.getLogger(__name__)


@functools.cache
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no curves.png or confusion.png are drawn")
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(log_csv: Path, output: Path) -> None:
    if (plt := _pyplot()) is None:
        return
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, style in (("train_loss", "-"), ("train_acc", "--"), ("val_acc", ":"), ("test_acc", "-.")):
        if key in rows[0]:  # val_acc: only runs that held images out
            ax.plot(epochs, [float(r[key]) for r in rows], style, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, output)


def plot_confusion(matrix: np.ndarray, class_names: list[str], output: Path) -> None:
    """Rows are true classes, columns predictions; each row normalized to sum to 1."""
    if (plt := _pyplot()) is None:
        return
    rates = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    size = max(5, 0.55 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    f"{rates[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    _save(fig, output)


def _save(fig, output: Path) -> None:
    with atomic_output(output) as f:
        fig.savefig(f, format="png", dpi=120)
    _pyplot().close(fig)
