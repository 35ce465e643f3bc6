"""What calibration and ``unsure`` do for calibrated Fashion-MNIST graphs: ECE before and after on
the test set, reliability diagrams, and how well the energy threshold tells Fashion-MNIST from
images that are not clothes.

    python -m benchmarks.ood_eval --onnx runs/lenet/model.onnx runs/lenet_bn/model.onnx \
        --write BENCHMARKS.md --figure docs/reliability.png

Every image goes through ``model_store.to_input`` and ``model_store.engine.OnnxClassifier`` as the
service's would. The images that are not clothes are ``benchmarks.ood_sets``' (digits,
photographs, noise, blank images; from installed packages). AUROC is that of a score between the
10,000 test images and each set: the score the service uses (the OOD head's kNN distance where the
card has a ``knn_threshold``, ``export.ood_head``; else the energy), the energy, the largest logit
and the largest probability. "accepted" is the share of a set the card's out-of-distribution rule
accepts (it accepted 95% of held-out images), and "answered sure" the share the service would
answer with ``unsure: false`` (both thresholds).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from benchmarks.ood_sets import auroc, fashion_test, not_clothes
from benchmarks.report import write_section
from export.calibrate import ECE_BINS, expected_calibration_error, nll
from model_store import to_input
from model_store.calibration import scores
from model_store.engine import OnnxClassifier, Outcomes

SECTION, HEADING = "ood-eval", "## Calibration and unsure answers: the test set and images that are not clothes"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onnx", type=Path, nargs="+", required=True, help="calibrated Fashion-MNIST graphs (python -m export)"
    )
    parser.add_argument("--write", type=Path, default=None, help="replace the section between its markers in this file")
    parser.add_argument("--figure", type=Path, default=None, help="write the reliability diagram PNG here")
    parser.add_argument("--seed", type=int, default=0, help="draws the crops and the noise (default: 0)")
    parser.add_argument(
        "--section",
        default=SECTION,
        help=f"the markers to write between, so that a run can sit beside an earlier one (default: {SECTION})",
    )
    return parser


def outputs_of(classifier: OnnxClassifier, images: list[Image.Image]) -> tuple[np.ndarray, Outcomes]:
    """(logits, outcomes) of ``images``, each decoded and resized as the service does."""
    pixels = np.stack([to_input(image, classifier.card) for image in images])
    outputs = classifier.run(pixels, classifier.outputs, batch_size=512)
    return outputs[0], classifier.outcomes_of(outputs)


def served_score(outcomes: Outcomes) -> np.ndarray:
    """The score the card's out-of-distribution rule compares: the kNN distance, else the energy."""
    return outcomes.energies if outcomes.distances is None else outcomes.distances


def reliability_diagram(results: list[dict], labels: np.ndarray, path: Path) -> None:
    """Per model, accuracy against confidence in ECE's bins, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(len(results), 2, figsize=(7, 3 * len(results)), sharey=True, squeeze=False)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for axes, result in zip(grid, results):
        for axis, name in zip(axes, ("raw", "calibrated")):
            probabilities = result[name]
            confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
            which = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
            counts = np.bincount(which, minlength=ECE_BINS)
            accuracy = np.bincount(which, correct, ECE_BINS) / np.maximum(counts, 1)
            mean_confidence = np.bincount(which, confidence, ECE_BINS) / np.maximum(counts, 1)
            shown, left = counts > 0, edges[:-1][counts > 0]
            axis.bar(left, accuracy[shown], 1 / ECE_BINS, align="edge", edgecolor="k", label="accuracy")
            gap = (mean_confidence - accuracy)[shown]
            axis.bar(left, gap, 1 / ECE_BINS, accuracy[shown], align="edge", color="tab:red", alpha=0.35, label="gap")
            axis.plot([0, 1], [0, 1], "k--", linewidth=1)
            ece = result["ece"][name == "calibrated"]
            title = f"{result['name']}\n{'softmax(logits)' if name == 'raw' else 'calibrated'}: ECE {ece:.4f}"
            axis.set(title=title, xlim=(0, 1), ylim=(0, 1))
            axis.title.set_fontsize(9)
        axes[0].set_ylabel("accuracy")
    for axis in grid[-1]:
        axis.set_xlabel(f"confidence (largest probability), {ECE_BINS} bins")
    grid[0][0].legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    plt.close(figure)


def evaluate(path: Path, sets: dict[str, list[Image.Image]], test: tuple[list[Image.Image], np.ndarray]) -> dict:
    """One graph's figures: the test set before and after calibration, and each set's detection."""
    classifier = OnnxClassifier(path, device="cpu")
    card, calibration = classifier.card, classifier.card.calibration
    if calibration is None:
        raise SystemExit(f"error: {path} has no calibration; export it from a run trained with --hold-out")
    images, labels = test
    logits, outcomes = outputs_of(classifier, images)
    raw, calibrated, energy = scores(logits)[0], outcomes.probabilities, outcomes.energies
    accepted = calibration.accepted(calibrated, energy, outcomes.distances)
    correct = calibrated.argmax(axis=1) == labels
    result = {
        "name": f"{card.arch} {', '.join(f'{k}={v}' for k, v in card.arch_args.items()) or '(builder defaults)'}",
        "card": card,
        "raw": raw,
        "calibrated": calibrated,
        "accuracy": correct.mean(),
        "ece": (expected_calibration_error(raw, labels), expected_calibration_error(calibrated, labels)),
        "nll": (nll(logits, labels), nll(logits, labels, calibration.temperature)),
        "sure": accepted.mean(),
        "sure_accuracy": correct[accepted].mean() if accepted.any() else float("nan"),
        "score": "kNN distance" if classifier.has_ood else "energy",
        "flagged": np.mean(calibration.out_of_distribution(energy, outcomes.distances)),
        "sets": {},
    }
    for name, ood_images in sets.items():
        ood_logits, ood = outputs_of(classifier, ood_images)
        result["sets"][name] = {
            "images": len(ood_images),
            "served": auroc(served_score(outcomes), served_score(ood)),
            "energy": auroc(energy, ood.energies),
            "max_logit": auroc(-logits.max(axis=1), -ood_logits.max(axis=1)),
            "max_probability": auroc(-calibrated.max(axis=1), -ood.probabilities.max(axis=1)),
            "accepted": np.mean(~calibration.out_of_distribution(ood.energies, ood.distances)),
            "sure": np.mean(calibration.accepted(ood.probabilities, ood.energies, ood.distances)),
        }
    return result


def report(results: list[dict], args: argparse.Namespace) -> str:
    command = f"python -m benchmarks.ood_eval --onnx {' '.join(map(str, args.onnx))} --write BENCHMARKS.md"
    if args.section != SECTION:
        command += f" --section '{args.section}'"
    lines = [
        f"Device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), ONNX Runtime "
        f"{ort.__version__}; {time.strftime('%Y-%m-%d')}. Command: `{command}"
        + (f" --figure {args.figure}`." if args.figure else "`."),
        "",
        "| model | test accuracy | test ECE | test NLL | temperature | answered sure | accuracy of those "
        "| confidence threshold | out-of-distribution rule | test images flagged by it |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        calibration = r["card"].calibration
        threshold = calibration.confidence_threshold
        lines.append(
            f"| {r['name']} | {r['accuracy']:.4f} | {r['ece'][0]:.4f} → {r['ece'][1]:.4f} "
            f"| {r['nll'][0]:.4f} → {r['nll'][1]:.4f} | {calibration.temperature:.3f} | {r['sure']:.3f} "
            f"| {r['sure_accuracy']:.4f} | {'unreachable' if threshold is None else f'{threshold:.4f}'} "
            f"| {rule(calibration)} | {r['flagged']:.3f} |"
        )
    lines += [
        "",
        "| model | images that are not clothes | served score | AUROC served | AUROC energy | AUROC max logit "
        "| AUROC max probability | accepted by the OOD rule | answered sure |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, s in r["sets"].items():
            lines.append(
                f"| {r['name']} | {name} | {r['score']} | {s['served']:.4f} | {s['energy']:.4f} | {s['max_logit']:.4f} "
                f"| {s['max_probability']:.4f} | {s['accepted']:.3f} | {s['sure']:.3f} |"
            )
        count = sum(s["images"] for s in r["sets"].values())
        unsure = sum(s["images"] * (1 - s["sure"]) for s in r["sets"].values()) / count
        lines.append(f"| {r['name']} | **all {count:,}: answered unsure** | | | | | | | **{unsure:.3f}** |")
    return "\n".join(lines)


def rule(calibration) -> str:
    if calibration.knn_threshold is not None:
        return f"kNN distance > {calibration.knn_threshold:.3f}"
    return f"energy > {calibration.energy_threshold:.3f}"


def main(args: argparse.Namespace) -> str:
    rng = np.random.default_rng(args.seed)
    sets = not_clothes(rng)
    test = fashion_test()
    results = [evaluate(path, sets, test) for path in args.onnx]
    if args.figure:
        reliability_diagram(results, test[1], args.figure)
    text = report(results, args)
    print(text)
    if args.write:
        heading = HEADING if args.section == SECTION else f"## Calibration and unsure answers: {args.section}"
        write_section(args.write, args.section, text, heading)
    return text


if __name__ == "__main__":
    main(get_args_parser().parse_args())
