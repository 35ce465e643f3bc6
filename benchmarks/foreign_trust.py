"""Can a model this project did not train say when it is unsure? A torchvision ResNet-18 trained
here the way a notebook trains one on a folder of images (``torchvision.datasets.ImageFolder``),
exported with ``--from-torchvision`` and ``--calibrate-on`` the user's own held-out images; then
its sure answers' accuracy on other held-out images, and its unsure share on images that are not
clothes.

    python -m benchmarks.foreign_trust --write BENCHMARKS.md

The folder: Fashion-MNIST training images 0 to ``--train`` as PNG files, one sub-folder per class.
The notebook: torchvision's builder with no weights, ``Resize(32)``, a random horizontal flip,
``ToTensor``, ImageNet's ``Normalize`` (the builder's published mean and std, which export's card
defaults to), Adam with a one-cycle schedule, ``--epochs`` epochs. Export is told what the notebook
did that the builder's published transforms do not: ``--size 32 --crop-fraction 1``. The user's
held-out folder: test images 0-3,999 (half fit the calibration and the OOD head, half measure
them). Measured on test images 5,000-9,999 and the 3,953 images that are not clothes of
benchmarks/ood_sets.py (digits, photographs, noise, blank). Goals (issue 38): sure answers at least
98% right; at least 80% of the images that are not clothes answered unsure.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import onnx
import onnxruntime
import torch
from PIL import Image

from benchmarks.ood_sets import not_clothes
from benchmarks.report import device, publish
from benchmarks.servers import REPO
from export.ood_head import DIMS, K
from model_store import ModelCard
from model_store.captures import folder_name
from model_store.engine import FEATURES_OUTPUT, OOD_OUTPUT, OnnxClassifier, unsure_reasons
from model_store.preprocess import image_bytes_to_input, to_input
from training.fashion_mnist_files import FASHION_MNIST_CLASSES, load_fashion_mnist

SECTION, HEADING = "foreign-trust", "## A model trained elsewhere, calibrated on its own held-out images"
SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HELD_OUT = range(0, 4000)  # test images: the user's --calibrate-on folder
MEASURED = range(5000, 10000)  # test images the figures are measured on


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20000, help="training images (default: 20000)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs (default: 6)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    parser.add_argument(
        "--heads", action="store_true", help="also measure other OOD heads on the same weights and calibration"
    )
    parser.add_argument("--keep", type=Path, default=None, help="also save the trained state_dict to this file")
    parser.add_argument(
        "--weights", type=Path, default=None, help="a state_dict --keep saved: export and measure it, no training"
    )
    return parser


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, indices) -> None:
    for i in indices:
        target = root / folder_name(FASHION_MNIST_CLASSES[labels[i]])
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{i}.png").write_bytes(png(images[i]))


def notebook(folder: Path, epochs: int, out: Path) -> dict:
    """Train as a user's notebook would, on an image folder, and torch.save the state_dict to ``out``."""
    import torchvision
    from torchvision import transforms

    torch.manual_seed(0)
    recipe = transforms.Compose(
        [
            transforms.Resize(SIZE),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(folder, transform=recipe)  # its loader converts to RGB
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, num_workers=1, drop_last=True)
    net = torchvision.models.resnet18(num_classes=len(dataset.classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        losses = []
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    torch.save(net.state_dict(), out)
    return {"seconds": time.perf_counter() - start, "classes": dataset.classes}


def run(args) -> dict:
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    with tempfile.TemporaryDirectory(prefix="foreign-") as tmp:
        folder = Path(tmp)
        write_folder(folder / "train", images, labels, range(args.train))
        write_folder(folder / "held-out", test_images, test_labels, HELD_OUT)
        if args.weights is None:
            trained = notebook(folder / "train", args.epochs, folder / "resnet18.pt")
            if args.keep is not None:
                shutil.copyfile(folder / "resnet18.pt", args.keep)
        else:  # ImageFolder's classes are the sorted folder names
            shutil.copyfile(args.weights, folder / "resnet18.pt")
            trained = {"seconds": float("nan"), "classes": sorted(p.name for p in (folder / "train").iterdir())}
        # ImageFolder numbers the classes in sorted folder order: the user's classes file follows it
        (folder / "classes.txt").write_text("".join(f"{unquote(name)}\n" for name in trained["classes"]))
        graph = folder / "resnet18.onnx"
        command = [sys.executable, "-m", "export", "--from-torchvision", "resnet18"]
        command += ["--weights", str(folder / "resnet18.pt"), "--classes", str(folder / "classes.txt")]
        command += ["--size", str(SIZE), "--crop-fraction", "1", "--calibrate-on", str(folder / "held-out")]
        command += ["--output", str(graph)]
        printed = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
        engine = OnnxClassifier(graph, device="cpu")
        proto = onnx.load(graph)
    card = engine.card
    names = [FASHION_MNIST_CLASSES[label] for label in test_labels[MEASURED.start : MEASURED.stop]]
    truth = np.array([card.class_names.index(name) for name in names])
    measured = np.stack([image_bytes_to_input(png(test_images[i]), card) for i in MEASURED])
    others = {
        name: np.stack([to_input(image, card) for image in them]) for name, them in not_clothes(seeded_rng()).items()
    }
    held_out = np.stack([image_bytes_to_input(png(test_images[i]), card) for i in HELD_OUT])
    return {
        "train_seconds": trained["seconds"],
        **measure(engine, card.calibration, measured, truth, others),
        "export": [line for line in printed.splitlines() if line.startswith(("calibrated", "OOD head", "warning"))],
        "heads": compare_heads(proto, card, held_out, measured, truth, others) if args.heads else None,
    }


def seeded_rng() -> np.random.Generator:
    """Seeded as every run's: the same images that are not clothes, and the same split, each time."""
    return np.random.default_rng(0)


def measure(engine: OnnxClassifier, calibration, measured, truth, others: dict[str, np.ndarray]) -> dict:
    """The measured test images' accuracy, sure share and sure answers' accuracy, and the share of
    each set of images that are not clothes answered unsure."""
    outcomes = engine.outcomes(measured)
    right = outcomes.probabilities.argmax(axis=1) == truth
    sure = np.array([r is None for r in unsure_reasons(outcomes, calibration)])
    sets = {
        name: float(np.mean([r is not None for r in unsure_reasons(engine.outcomes(inputs), calibration)]))
        for name, inputs in others.items()
    }
    everything = sum(len(inputs) for inputs in others.values())
    return {
        "accuracy": float(right.mean()),
        "sure_share": float(sure.mean()),
        "sure_accuracy": float(right[sure].mean()) if sure.any() else float("nan"),
        "sets": sets,
        "flagged": sum(sets[name] * len(others[name]) for name in sets) / everything,
        "everything": everything,
    }


def compare_heads(proto, card: ModelCard, held_out, measured, truth, others) -> dict[str, dict]:
    """The same weights and calibration with other OOD heads, each built by export.ood_head on 1,000
    held-out images and thresholded, as export does, to accept 95% of 1,000 others."""
    from export.onnx_export import serialize, with_card
    from export.ood_head import feature_tensor, with_head, with_outputs, with_residual_head, without_head

    proto = without_head(proto)
    features = feature_tensor(proto)
    order = seeded_rng().permutation(len(held_out))
    banked, rest = held_out[order[:1000]], held_out[order[1000:2000]]
    plain = onnxruntime.InferenceSession(serialize(with_outputs(proto, features)), providers=["CPUExecutionProvider"])
    bank = plain.run([FEATURES_OUTPUT], {plain.get_inputs()[0].name: banked})[0]  # the graph normalizes
    heads = {
        f"{K}th nearest of the bank on {DIMS} principal axes (the shipped models' head)": with_head(
            proto, features, bank
        )
    }
    for axes in (32, 64, 128, 256):
        heads[f"residual off {axes} principal axes"] = with_residual_head(proto, features, bank, span_axes=axes)
    figures = {}
    for name, headed in heads.items():
        engine = OnnxClassifier(serialize(with_card(headed, card)), device="cpu")
        distances = engine.run(rest, [OOD_OUTPUT])[0]
        threshold = float(np.quantile(distances, card.calibration.id_acceptance, method="higher"))
        calibration = dataclasses.replace(card.calibration, knn_threshold=threshold)
        figures[name] = measure(engine, calibration, measured, truth, others)
    return figures


def table(result: dict, args) -> str:
    flags = [f"--weights {args.weights}" if args.weights else "", "--heads" if args.heads else ""]
    flags += [f"--write {args.write}" if args.write else ""]
    trained = (
        f"trained by an earlier run of this benchmark (`--keep`), read back with `--weights` ({args.epochs} epochs"
        if args.weights
        else f"trained from an image folder in {result['train_seconds']:.0f} s ({args.epochs} epochs"
    )
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: "
        f"`python -m benchmarks.foreign_trust {' '.join(f for f in flags if f)}`.",
        "",
        f"torchvision ResNet-18 {trained} on {args.train:,} images at {SIZE} px); accuracy on test images "
        f"{MEASURED.start:,}-{MEASURED.stop - 1:,} {result['accuracy']:.4f}. Calibrated on test images "
        f"{HELD_OUT.start:,}-{HELD_OUT.stop - 1:,} (`--calibrate-on`).",
        "",
        "| what | figure | goal |",
        "|---|---:|---:|",
        f"| answered sure (test images {MEASURED.start:,}-{MEASURED.stop - 1:,}) | {result['sure_share']:.3f} | |",
        f"| accuracy of the sure answers | **{result['sure_accuracy']:.4f}** | at least 0.98 |",
        *(f"| not clothes answered unsure: {name} | {share:.3f} | |" for name, share in result["sets"].items()),
        f"| **all {result['everything']:,} not clothes: answered unsure** | **{result['flagged']:.3f}** | at least 0.80 |",
        "",
        "Export said: " + " ".join(result["export"]),
    ]
    if result["heads"]:
        sets = list(result["sets"])
        lines += [
            "",
            "The same weights and calibration with other OOD heads (`--heads`: each fitted on 1,000 held-out "
            "images, its threshold accepting 95% of 1,000 others); the share of each set answered unsure:",
            "",
            "| OOD head | answered sure | sure answers right | " + " | ".join(sets) + " | all not clothes |",
            "|---|" + "---:|" * (len(sets) + 3),
            *(
                f"| {name} | {f['sure_share']:.3f} | {f['sure_accuracy']:.4f} | "
                + " | ".join(f"{f['sets'][s]:.3f}" for s in sets)
                + f" | {f['flagged']:.3f} |"
                for name, f in result["heads"].items()
            ),
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    publish(table(run(args), args), args.write, SECTION, HEADING)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
