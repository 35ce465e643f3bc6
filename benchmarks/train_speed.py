"""Training's two data paths side by side: seconds per epoch of LeNet-BN on Fashion-MNIST.

    python -m benchmarks.train_speed --write BENCHMARKS.md

``loader``: a DataLoader that makes each item through PIL (``to_input``) and augments it, every
epoch; ``tensors``: the inputs made once and cached, batches drawn and augmented as tensors on the
device (training/tensors.py). The two take turns; the first ``tensors`` run also builds the cache,
and is reported apart. One epoch each, the run's own ``python -m training train`` command.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks.report import write_section

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["--model", "lenet_bn", "--epochs", "1", "--batch-size", "256", "--seed", "0", "--hflip"]
RECIPE += ["--random-crop-padding", "2"]


def one_epoch(path: str, cache: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "training", "train", *RECIPE, "--data-path", path, "--output-dir", str(out)]
    env = {**os.environ, "CLASSIC_CNNS_CACHE": str(cache)}
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start  # the whole command: start-up, data (and the cache build), epoch
    row = next(csv.DictReader(open(out / "log.csv")))
    return {"examples_per_s": float(row["examples_per_s"]), "seconds": float(row["seconds"]), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="epochs of each path after the cold one (default: 2)")
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section in this file")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"loader": [], "tensors": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold = one_epoch("tensors", cache, Path(tmp) / "cold")
        print(f"tensors, building the cache: {cold}", flush=True)
        for round_ in range(args.rounds):
            for path in runs:
                runs[path].append(one_epoch(path, cache, Path(tmp) / f"{path}{round_}"))
                print(f"{path} round {round_ + 1}: {runs[path][-1]}", flush=True)
    median = {path: statistics.median(r["examples_per_s"] for r in results) for path, results in runs.items()}
    epoch = {path: statistics.median(r["seconds"] for r in results) for path, results in runs.items()}
    wall = {path: statistics.median(r["wall"] for r in results) for path, results in runs.items()}
    rows = [
        "| data path | train examples/s | epoch s (train + test) | whole command s |",
        "|---|---:|---:|---:|",
        f"| loader (DataLoader, PIL per item, 0 workers) | {median['loader']:,.0f} | {epoch['loader']:.1f} | "
        f"{wall['loader']:.1f} |",
        f"| tensors (cached, batched on the device) | {median['tensors']:,.0f} | {epoch['tensors']:.1f} | "
        f"{wall['tensors']:.1f} |",
        f"| tensors, first run (builds the cache first) | {cold['examples_per_s']:,.0f} | {cold['seconds']:.1f} | "
        f"{cold['wall']:.1f} |",
    ]
    text = "\n".join(
        [
            f"Device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Date: {date.today()}. "
            f"Command: `python -m benchmarks.train_speed --write BENCHMARKS.md`. torch {torch.__version__}. "
            f"Recipe: `python -m training train {' '.join(RECIPE)} --data-path PATH` on all 60,000 training "
            f"images; medians of {args.rounds} epochs each, the paths taking turns.",
            "",
            *rows,
            "",
            f"The tensor path trains at **{median['tensors'] / median['loader']:.2f}x** the loader's examples/s.",
        ]
    )
    print(text)
    if args.write:
        write_section(args.write, "train-speed", text, "## Training data paths: LeNet-BN epochs on the CPU")


if __name__ == "__main__":
    main()
