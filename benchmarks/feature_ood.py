"""Which out-of-distribution score to serve: the energy of the logits (what the cards use today)
against two scores of the penultimate features, on each shipped graph and the images that are not
clothes of ``benchmarks.ood_sets``.

    python -m benchmarks.feature_ood --write BENCHMARKS.md
    python -m benchmarks.feature_ood --onnx runs/lenet/model.onnx --k 10

The features are the input of the graph's last Gemm (the layer that makes the logits: 84 values
for LeNet, the 64 pooled channels for ResNet-20), read by adding it to the graph's outputs. The
Fashion-MNIST test set is split in two: the first half, held out of training like a run's
validation split, fits each score; the second half is the in-distribution set it is measured on.

- energy: ``-logsumexp(logits / T)`` with the card's temperature (Liu et al., 2020);
- mahalanobis: the squared Mahalanobis distance to the nearest class mean, with one covariance
  shared by the classes (Lee et al., 2018), means and covariance fitted on the first half;
- knn: the distance of the L2-normalised features to their k-th nearest neighbour among the first
  half's (Sun et al., 2022);
- knn-raw: the same without normalising, so that a feature vector's length counts too.

Per score and set: AUROC (in-distribution half against the set), and the share of the set flagged
at the threshold that accepts 95% of the in-distribution half, as a card's threshold does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from benchmarks.ood_sets import auroc, fashion_test, not_clothes
from benchmarks.report import device, write_section
from benchmarks.servers import REPO
from model_store import to_input
from model_store.calibration import scores
from model_store.store import DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE, read_onnx_card

SECTION, HEADING = "feature-ood", "## Out-of-distribution scores: energy against the penultimate features"
SCORES = ("energy", "mahalanobis", "knn", "knn-raw")
ACCEPTANCE = 0.95  # of in-distribution images, as the cards' energy threshold
BATCH = 512


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shipped = [DEFAULT_MODEL_FILE, EXPLAINER_MODEL_FILE]
    parser.add_argument("--onnx", type=Path, nargs="+", default=shipped, help="calibrated graphs (default: shipped)")
    parser.add_argument("--k", type=int, default=10, help="the neighbour knn measures to (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="draws the crops and the noise (default: 0)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def with_features(path: Path) -> tuple[bytes, str]:
    """The graph with its penultimate features as a second output, and that output's name."""
    model = onnx.load(path)
    graph = model.graph
    made_by = {output: node for node in graph.node for output in node.output}
    last = made_by.get(graph.output[0].name)
    if last is None or last.op_type != "Gemm":
        raise SystemExit(f"error: {path}: its logits are not made by a Gemm, so it has no penultimate features here")
    graph.output.append(onnx.helper.make_tensor_value_info(last.input[0], onnx.TensorProto.FLOAT, None))
    return model.SerializeToString(), last.input[0]


def run(session: ort.InferenceSession, features: str, card, images: list[Image.Image]) -> tuple[np.ndarray, ...]:
    """(logits, features) of ``images``, each decoded and resized as the service does."""
    pixels = np.stack([to_input(image, card) for image in images])
    name = session.get_inputs()[0].name
    parts = [session.run(["logits", features], {name: pixels[i : i + BATCH]}) for i in range(0, len(pixels), BATCH)]
    return tuple(np.concatenate([part[j] for part in parts]).astype(np.float64) for j in range(2))


class Mahalanobis:
    def __init__(self, features: np.ndarray, labels: np.ndarray, classes: int):
        self.means = np.stack([features[labels == c].mean(axis=0) for c in range(classes)])
        centred = features - self.means[labels]
        self.precision = np.linalg.pinv(centred.T @ centred / len(features))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        gaps = features[:, None, :] - self.means[None]  # [N, classes, D]
        return np.einsum("ncd,de,nce->nc", gaps, self.precision, gaps).min(axis=1)


class KNearest:
    def __init__(self, features: np.ndarray, k: int, normalise: bool):
        self.normalise, self.k = normalise, k
        self.bank = self.prepared(features)

    def prepared(self, features: np.ndarray) -> np.ndarray:
        return (
            features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
            if self.normalise
            else features
        )

    def __call__(self, features: np.ndarray) -> np.ndarray:
        out, banked = [], (self.bank**2).sum(axis=1)
        for i in range(0, len(features), BATCH):
            batch = self.prepared(features[i : i + BATCH])
            squared = (batch**2).sum(axis=1)[:, None] + banked[None] - 2 * batch @ self.bank.T
            out.append(np.sqrt(np.maximum(np.partition(squared, self.k - 1, axis=1)[:, self.k - 1], 0)))
        return np.concatenate(out)


def evaluate(path: Path, sets: dict[str, list[Image.Image]], test, k: int) -> dict:
    card = read_onnx_card(path)
    if card.calibration is None:
        raise SystemExit(f"error: {path} has no calibration (its temperature scales the energy)")
    graph, features_name = with_features(path)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    images, labels = test
    half = len(images) // 2
    fit_logits, fit_features = run(session, features_name, card, images[:half])
    fit_labels = np.asarray(labels[:half])
    mahalanobis = Mahalanobis(fit_features, fit_labels, card.num_classes)
    knn, knn_raw = KNearest(fit_features, k, normalise=True), KNearest(fit_features, k, normalise=False)

    def score_all(logits: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "energy": scores(logits, card.calibration.temperature)[1],
            "mahalanobis": mahalanobis(features),
            "knn": knn(features),
            "knn-raw": knn_raw(features),
        }

    held_in = score_all(*run(session, features_name, card, images[half:]))
    thresholds = {name: np.quantile(values, ACCEPTANCE) for name, values in held_in.items()}
    rows = {}
    for set_name, set_images in sets.items():
        scored = score_all(*run(session, features_name, card, set_images))
        rows[set_name] = {
            name: (auroc(held_in[name], scored[name]), float(np.mean(scored[name] > thresholds[name])))
            for name in SCORES
        }
    return {
        "name": path.stem,
        "dims": fit_features.shape[1],
        "rows": rows,
    }


def report(results: list[dict], args: argparse.Namespace) -> str:
    graphs = " ".join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in args.onnx)
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: `python -m benchmarks.feature_ood --onnx "
        f"{graphs} --k {args.k}`. Scores fitted on the first 5,000 Fashion-MNIST test images, measured on the other "
        "5,000 against each set; flagged: the share of a set above the threshold that accepts 95% of those 5,000.",
        "",
        "| model | images that are not clothes | AUROC energy | AUROC mahalanobis | AUROC knn | AUROC knn-raw "
        "| flagged energy | flagged mahalanobis | flagged knn | flagged knn-raw |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for set_name, row in r["rows"].items():
            aurocs = " | ".join(f"{row[name][0]:.4f}" for name in SCORES)
            flagged = " | ".join(f"{row[name][1]:.3f}" for name in SCORES)
            lines.append(f"| {r['name']} ({r['dims']} features) | {set_name} | {aurocs} | {flagged} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    if args.k < 1:
        raise SystemExit(f"error: --k must be at least 1, got {args.k}")
    sets, test = not_clothes(np.random.default_rng(args.seed)), fashion_test()
    text = report([evaluate(path, sets, test, args.k) for path in args.onnx], args)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)
    return text


if __name__ == "__main__":
    main(get_args_parser().parse_args())
