"""The README's picture of /explain: the first Fashion-MNIST test image of each class, and the shipped
ResNet-20's class-activation map of its answer drawn over it, exactly as the service draws it.

    python -m benchmarks.explain_figure --out docs/explain.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from model_store.engine import OnnxClassifier
from model_store.files import atomic_output
from model_store.store import EXPLAINER_MODEL_FILE
from serving.heatmap import overlay_png
from training.fashion_mnist_files import load_fashion_mnist


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=EXPLAINER_MODEL_FILE, help="a graph exported with --cam")
    parser.add_argument("--out", type=Path, default=Path("docs/explain.png"), help="the PNG to write")
    return parser


def main(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not args.model.is_file():
        raise SystemExit(f"error: --model {args.model} does not exist")
    engine = OnnxClassifier(args.model, device="cpu")
    if not engine.has_cam:
        raise SystemExit(f"error: --model {args.model} has no class-activation map; export it with --cam")
    names = engine.card.class_names
    images, labels = load_fashion_mnist("test")
    chosen = [int(np.flatnonzero(labels == label)[0]) for label in range(len(names))]
    pixels = images[chosen][:, None]  # uint8 [N, 1, 28, 28]: the test images are already the model's input
    rows, cams = engine.explain(pixels)
    fig, axes = plt.subplots(2, len(chosen), figsize=(1.3 * len(chosen), 3.2))
    for column, (index, row, cam) in enumerate(zip(chosen, rows, cams)):
        answered = int(row.probabilities.argmax())
        overlay = Image.open(io.BytesIO(overlay_png(pixels[column], cam)))
        axes[0, column].imshow(pixels[column, 0], cmap="gray", vmin=0, vmax=255)
        axes[0, column].set_title(names[labels[index]], fontsize=8)
        axes[1, column].imshow(overlay, interpolation="nearest")
        axes[1, column].set_title(f"{names[answered]} {row.probabilities[answered]:.2f}", fontsize=7)
        for axis in axes[:, column]:
            axis.axis("off")
    fig.suptitle(f"{args.model.name}: test image, and the map of its answer (calibrated probability)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    with atomic_output(args.out) as f:
        f.write(buffer.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
