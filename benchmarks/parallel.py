"""The Fashion-MNIST test images as photos, scored in parallel: the arguments and the split between
processes that ``benchmarks.photo_accuracy`` and ``benchmarks.heic_agreement`` share."""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np


def photo_args(description: str, side: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=10_000, help="test images (default: all 10,000)")
    parser.add_argument("--side", type=int, default=side, help=f"the photos' side in pixels (default: {side})")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="(default: one per core)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def check_photo_args(args: argparse.Namespace) -> None:
    if args.images < 1 or args.side < 28 or args.processes < 1:
        raise SystemExit("error: --images and --processes must be at least 1, --side at least 28")


def over_test_images(work: Callable[..., dict], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """``work(indices, side)`` over the first ``args.images`` test images, in four chunks per process
    (so a slow chunk does not leave a core idle at the end). Each part is a dict whose "answers" map
    a key to one answer per index. Returns the parts, and each key's answers in image order."""
    chunks = [c.tolist() for c in np.array_split(np.arange(args.images), args.processes * 4) if len(c)]
    with ProcessPoolExecutor(args.processes) as pool:
        parts = list(pool.map(work, chunks, [args.side] * len(chunks)))
    order = np.argsort(np.concatenate(chunks))
    keys = parts[0]["answers"]
    return parts, {key: np.concatenate([p["answers"][key] for p in parts])[order] for key in keys}
