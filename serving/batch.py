"""Offline batch scoring: every file under a folder -> one CSV row each.

    python -m serving.batch photos/ --output predictions.csv

Same preprocessing (``model_store.image_bytes_to_input``) and engine (``OnnxClassifier``) as the
HTTP service. Files are decoded on a thread pool while the previous batch runs; a file that is
not a usable image gets its reason in the ``error`` column and the run goes on.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from model_store import ImageError, ModelCard, image_bytes_to_input
from model_store.files import atomic_output
from serving.engine import OnnxClassifier, top_k

COLUMNS = ("path", "label", "probability", "top_k", "error")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.batch", description="Score every image under a folder.")
    parser.add_argument("folder", type=Path, help="folder to score, recursively")
    parser.add_argument("--output", type=Path, required=True, help="CSV file to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default="fashion-lenet:latest", help="BentoML store tag (default: fashion-lenet:latest)"
    )
    source.add_argument("--onnx", type=Path, default=None, help="an exported .onnx file instead of a store tag")
    parser.add_argument("--batch-size", type=int, default=256, help="images per inference call (default: 256)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decoding threads (default: CPU count)"
    )
    return parser


def list_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file below ``folder``, in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _load(path: Path, card: ModelCard) -> np.ndarray | str:
    """The model input, or the reason the file cannot be used."""
    try:
        return image_bytes_to_input(path.read_bytes(), card)
    except (ImageError, OSError) as err:
        return str(err)


def score(
    classifier: OnnxClassifier, files: list[Path], batch_size: int, k: int, workers: int
) -> Iterator[tuple[Path, dict | str]]:
    """(path, prediction or error) for each file, in order; decoding of batch i+1 overlaps inference of batch i."""
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        submit = lambda chunk: [pool.submit(_load, p, classifier.card) for p in chunk]  # noqa: E731
        pending: list[Future] = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [x for x in loaded if not isinstance(x, str)]
            probabilities = iter(classifier.predict(np.stack(good)) if good else [])
            for path, item in zip(chunk, loaded):
                yield (
                    path,
                    item if isinstance(item, str) else top_k(next(probabilities), classifier.card.class_names, k),
                )


def main(args: argparse.Namespace) -> tuple[int, int]:
    if not args.folder.is_dir():
        raise FileNotFoundError(f"folder {args.folder} does not exist or is not a folder")
    if args.batch_size < 1 or args.workers < 1:
        raise ValueError(f"--batch-size and --workers must be at least 1, got {args.batch_size} and {args.workers}")
    if args.onnx is not None:
        path = args.onnx
    else:
        from model_store.store import MODEL_FILE, open_model

        path = open_model(args.model).path_of(MODEL_FILE)
    classifier = OnnxClassifier(path)
    if not 1 <= args.top_k <= classifier.card.num_classes:
        raise ValueError(f"--top-k must be from 1 to {classifier.card.num_classes}, got {args.top_k}")
    files = list_files(args.folder)
    failed = 0
    with atomic_output(args.output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        results = score(classifier, files, args.batch_size, args.top_k, args.workers)
        for path, result in tqdm(results, total=len(files), unit="img", disable=None):
            name = path.relative_to(args.folder).as_posix()
            if isinstance(result, str):
                failed += 1
                writer.writerow((name, "", "", "", result))
            else:
                ranked = ";".join(f"{r['label']}:{r['probability']:.4f}" for r in result["top_k"])
                writer.writerow((name, result["label"], f"{result['probability']:.6f}", ranked, ""))
    print(
        f"scored {len(files) - failed} of {len(files)} files ({failed} failed) with {classifier.card.arch} on "
        f"{classifier.provider}; wrote {args.output}"
    )
    return len(files) - failed, failed


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ValueError, OSError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
