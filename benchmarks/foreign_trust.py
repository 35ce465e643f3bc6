"""Can a model this project did not train say when it is unsure? A torchvision MobileNetV3-small
trained here the way a notebook would train it, on Fashion-MNIST as RGB images, exported with
``--from-torchvision`` and ``--calibrate-on`` the user's own held-out images; then its sure answers'
accuracy on other held-out images and its unsure share on images that are not clothes.

    python -m benchmarks.foreign_trust --write BENCHMARKS.md

The notebook: torchvision's builder, ImageNet's mean and std (the builder's published transforms,
which export's card then defaults to), images resized to 32 px RGB with Pillow's bilinear filter
(what the card's crop does to a 28 px square image), AdamW, --epochs epochs on --train images.
The user's held-out folder: test images 0-1,999 (half fit the calibration and the OOD head, half
measure them). Measured on test images 5,000-9,999 and the 3,953 images that are not clothes of
benchmarks/ood_sets.py (digits, photographs, noise, blank). Goals: sure answers at least 98%
right; at least 80% of the images that are not clothes answered unsure.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.ood_sets import not_clothes
from benchmarks.report import device, publish
from benchmarks.servers import REPO
from model_store.captures import folder_name
from model_store.engine import OnnxClassifier, unsure_reasons
from model_store.preprocess import image_bytes_to_input, to_input
from training.fashion_mnist_files import FASHION_MNIST_CLASSES, load_fashion_mnist

SECTION, HEADING = "foreign-trust", "## A model trained elsewhere, calibrated on its own held-out images"
SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000, help="training images (default: 10000)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (default: 5)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def rgb(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def notebook(images: np.ndarray, labels: np.ndarray, epochs: int, out: Path) -> dict:
    """Train as a user's notebook would, and torch.save the state_dict to ``out``."""
    import torchvision

    torch.manual_seed(0)
    x = torch.from_numpy(np.stack([np.asarray(rgb(a)) for a in images])).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(labels.astype(np.int64))
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(x)).split(128):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(net.state_dict(), out)
    return {"seconds": time.perf_counter() - start}


def run(args) -> dict:
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    with tempfile.TemporaryDirectory(prefix="foreign-") as tmp:
        folder = Path(tmp)
        trained = notebook(images[: args.train], labels[: args.train], args.epochs, folder / "mobilenet.pt")
        (folder / "classes.txt").write_text("".join(f"{name}\n" for name in FASHION_MNIST_CLASSES))
        for i in range(2000):  # the user's held-out images, one folder per class
            target = folder / "held-out" / folder_name(FASHION_MNIST_CLASSES[test_labels[i]])
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{i}.png").write_bytes(png(test_images[i]))
        graph = folder / "mobilenet.onnx"
        command = [sys.executable, "-m", "export", "--from-torchvision", "mobilenet_v3_small"]
        command += ["--weights", str(folder / "mobilenet.pt"), "--classes", str(folder / "classes.txt")]
        command += ["--size", str(SIZE), "--calibrate-on", str(folder / "held-out"), "--output", str(graph)]
        printed = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
        engine = OnnxClassifier(graph, device="cpu")
        card = engine.card
        pixels = np.stack([image_bytes_to_input(png(test_images[i]), card) for i in range(5000, 10000)])
        outcomes = engine.outcomes(pixels)
        right = outcomes.probabilities.argmax(axis=1) == test_labels[5000:10000]
        sure = np.array([r is None for r in unsure_reasons(outcomes, card.calibration)])
        sets, counts = {}, {}
        for name, others in not_clothes(np.random.default_rng(0)).items():
            inputs = np.stack([to_input(image, card) for image in others])
            reasons = unsure_reasons(engine.outcomes(inputs), card.calibration)
            sets[name], counts[name] = float(np.mean([r is not None for r in reasons])), len(others)
        everything = sum(counts.values())
        flagged = sum(sets[name] * counts[name] for name in sets)
    return {
        "train_seconds": trained["seconds"],
        "accuracy": float(right.mean()),
        "sure_share": float(sure.mean()),
        "sure_accuracy": float(right[sure].mean()) if sure.any() else float("nan"),
        "sets": sets,
        "flagged": flagged / everything,
        "everything": everything,
        "export": [line for line in printed.splitlines() if line.startswith(("calibrated", "OOD head", "warning"))],
    }


def table(result: dict, args) -> str:
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: "
        f"`python -m benchmarks.foreign_trust{' --write ' + str(args.write) if args.write else ''}`.",
        "",
        f"MobileNetV3-small trained in {result['train_seconds']:.0f} s ({args.epochs} epochs on {args.train:,} "
        f"images); accuracy on test images 5,000-9,999 {result['accuracy']:.4f}.",
        "",
        "| what | figure | goal |",
        "|---|---:|---:|",
        f"| answered sure (test images 5,000-9,999) | {result['sure_share']:.3f} | |",
        f"| accuracy of the sure answers | **{result['sure_accuracy']:.4f}** | at least 0.98 |",
        *(f"| not clothes answered unsure: {name} | {share:.3f} | |" for name, share in result["sets"].items()),
        f"| **all {result['everything']:,} not clothes: answered unsure** | **{result['flagged']:.3f}** | at least 0.80 |",
        "",
        "Export said: " + " ".join(result["export"]),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    publish(table(run(args), args), args.write, SECTION, HEADING)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
