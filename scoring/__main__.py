"""Score every image of a folder, a list of paths or an object-store prefix, one row each.

    python -m scoring photos/ --output scores/                    # Parquet parts in scores/
    python -m scoring photos/ --output scores/ --resume           # continue after a kill
    python -m scoring s3://bucket/photos/ --output scores/ --engine ray --ray-address auto

Every input gets exactly one row, the ones that cannot be scored included (the reason in
``error``). Rows are written in numbered part files as they fill (``scoring.parts``): a kill loses
at most the part being filled, and ``--resume`` scores only what the finished parts lack.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from model_store.cli import prog, run
from model_store.engine import OnnxClassifier
from model_store.errors import UsageError
from model_store.files import file_sha256
from scoring.parts import FORMATS, OutputFolder
from scoring.results import name_bytes
from scoring.sources import open_source

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
SCALE_INSTALL = "pip install 'classic-cnns[scale]' (from a checkout: pip install -e '.[scale]')"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("scoring", "cnn-score"),
        description="Score every image of a folder, a file of paths or an object-store prefix, one row each.",
    )
    parser.add_argument(
        "source", help="a folder (scored recursively), a text file of paths (one per line), or a URI prefix (s3://...)"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for the part files and _manifest.json")
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="part file format (default: parquet)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output, scoring only the inputs it lacks"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model", default="fashion-lenet:latest", help="BentoML store tag (default: fashion-lenet:latest)"
    )
    model.add_argument("--onnx", type=Path, default=None, help="an exported .onnx file instead of a store tag")
    parser.add_argument("--batch-size", type=int, default=256, help="images per inference call (default: 256)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    parser.add_argument(
        "--part-rows", type=int, default=100_000, help="rows per part file, what a kill can lose (default: 100000)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device (default: auto)"
    )
    parser.add_argument("--engine", choices=ENGINES, default="local", help="local or ray (default: local)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="local engine: worker processes, 0 to do everything in the main one (default: CPU count)",
    )
    parser.add_argument(
        "--ray-address", default=None, help="ray engine: the cluster to use (default: $RAY_ADDRESS, else a local one)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="ray engine: model replicas (default: one per GPU, else one per CPU of the cluster)",
    )
    return parser


def main(args: argparse.Namespace) -> dict:
    """Score ``args.source`` into ``args.output``; returns the finished run's record."""
    check_args(args)
    source = open_source(args.source)
    model_path, model_name = _model_file(args)
    classifier = OnnxClassifier(model_path, args.device)
    if classifier.provider_error and args.device == "cuda":
        raise UsageError(f"--device cuda: {classifier.provider_error}")
    card = classifier.card
    if not 1 <= args.top_k <= card.num_classes:
        raise UsageError(f"--top-k must be from 1 to {card.num_classes}, got {args.top_k}")

    settings = {
        "source": source.describe(),
        "model_sha256": file_sha256(model_path),
        "top_k": args.top_k,
        "format": args.format,
    }
    about = {"model": f"{card.arch} from {model_name}", "classes": list(card.class_names)}
    output = OutputFolder(args.output)
    run, finished = output.start(settings, about, args.engine, args.resume)
    skipped = 0

    def pending():
        nonlocal skipped
        for entry in source.entries():
            if finished.done and name_bytes(entry.name) in finished.done:
                skipped += 1
            else:
                yield entry

    provider = score_with_engine(args, source, pending(), classifier, model_path, run, len(finished.done))
    record = output.finish(finished, {"skipped": skipped, "hidden": source.hidden, "provider": provider})
    resumed = f"{skipped} already scored, " if args.resume else ""
    print(
        f"scored {record['scored'] - record['failed']} of {record['scored']} inputs ({record['failed']} failed; "
        f"{resumed}{source.hidden} hidden entries skipped) with {card.arch} on {provider} ({args.engine} engine); "
        f"{args.output} holds {record['rows']} rows in {record['parts']} {args.format} parts"
    )
    return record


def check_args(args: argparse.Namespace) -> None:
    """A UsageError naming the first bad flag; Ray's absence for --engine ray is one too."""
    for flag in ("batch_size", "part_rows"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.workers < 0 or (args.concurrency is not None and args.concurrency < 1):
        raise UsageError(
            f"--workers must be 0 or more and --concurrency 1 or more, got {args.workers}, {args.concurrency}"
        )
    if args.engine == "ray":
        try:
            from scoring import ray_engine  # noqa: F401  (imported here to fail before any work)
        except ModuleNotFoundError as err:
            if err.name != "ray":
                raise
            raise UsageError(
                f"--engine ray needs Ray, which is not installed; install it with {SCALE_INSTALL}"
            ) from None


def score_with_engine(args, source, pending, classifier: OnnxClassifier, model_path: Path, run, done: int) -> str:
    """Score ``pending`` entries with ``args.engine`` into the run's parts; returns the provider used."""
    if args.engine == "ray":
        from scoring import ray_engine

        return ray_engine.score(
            source,
            pending,
            model_path,
            classifier.card,
            args.output,
            run,
            args.format,
            batch_size=args.batch_size,
            top_k=args.top_k,
            part_rows=args.part_rows,
            address=args.ray_address,
            concurrency=args.concurrency,
            device=args.device,
        )
    from scoring import local

    writer = local.PartWriter(args.output, run, args.format, args.part_rows)
    with tqdm(unit="img", initial=done, disable=None, smoothing=0.1) as progress:
        local.count_in_background(source, progress)
        local.score(
            source, pending, classifier, model_path, writer, args.batch_size, args.top_k, args.workers, progress
        )
    return classifier.provider


def _model_file(args: argparse.Namespace) -> tuple[Path, str]:
    """The ONNX file to score with, and how to name it."""
    if args.onnx is not None:
        return args.onnx, str(args.onnx)
    from model_store.store import MODEL_FILE, open_model

    stored = open_model(args.model)
    return Path(stored.path_of(MODEL_FILE)), str(stored.tag)


def cli(argv: list[str] | None = None) -> int:
    return run(main, get_args_parser(), argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(cli())
