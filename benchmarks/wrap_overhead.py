"""What wrapping a foreign ONNX graph costs (export.foreign): ONNX Runtime's time per batch of 32,
the wrapped graph (uint8 in, normalized inside) against the original graph fed images normalized in
numpy, as a user would serve it, in one run.

    python -m benchmarks.wrap_overhead --write BENCHMARKS.md

The originals: torchvision's ResNet-18 and MobileNetV3-small at 224 px with random weights
(the time does not depend on the values), exported by torch.onnx.export's TorchScript exporter.
Both sides run on one CPU thread, in turn, for --rounds rounds of --batches batches each; the
median of the rounds is shown. Goal: the wrapped graph at most 5% slower, normalization included.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.report import device, publish
from benchmarks.servers import REPO

SECTION, HEADING = "wrap-overhead", "## A foreign ONNX graph wrapped: what the wrapper costs"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH, SIZE = 32, 224


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is shown (default: 5)")
    parser.add_argument("--batches", type=int, default=10, help="batches of 32 per round and side (default: 10)")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def originals(folder: Path) -> dict[str, Path]:
    import torch
    import torchvision

    paths = {}
    for name in ("resnet18", "mobilenet_v3_small"):
        net = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
        paths[name] = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (torch.zeros(1, 3, SIZE, SIZE),), str(paths[name]), dynamo=False,
                dynamic_axes={"input": {0: "batch"}}, input_names=["input"],
            )  # fmt: skip
    return paths


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="wrap-") as tmp:
        folder = Path(tmp)
        (folder / "classes.txt").write_text("".join(f"c{i}\n" for i in range(10)))
        pixels = np.random.default_rng(0).integers(0, 256, (BATCH, 3, SIZE, SIZE), dtype=np.uint8)
        mean, std = np.array(MEAN, np.float32).reshape(1, 3, 1, 1), np.array(STD, np.float32).reshape(1, 3, 1, 1)
        for name, path in originals(folder).items():
            wrapped = folder / f"{name}-wrapped.onnx"
            command = [
                sys.executable,
                "-m",
                "export",
                "--from-onnx",
                str(path),
                "--classes",
                str(folder / "classes.txt"),
            ]
            command += ["--mean", *map(str, MEAN), "--std", *map(str, STD), "--output", str(wrapped)]
            subprocess.run(command, cwd=REPO, check=True, capture_output=True)
            theirs, ours = session(path), session(wrapped)

            def original_batch() -> None:
                normalized = (pixels.astype(np.float32) / 255.0 - mean) / std  # what a user's server does
                theirs.run(None, {"input": normalized})

            def wrapped_batch() -> None:
                ours.run(None, {"pixels": pixels})

            for step in (original_batch, wrapped_batch):
                step()  # first run: kernel selection, arena
            times = {"original": [], "wrapped": []}
            for _ in range(args.rounds):
                for side, step in (("original", original_batch), ("wrapped", wrapped_batch)):
                    start = time.perf_counter()
                    for _ in range(args.batches):
                        step()
                    times[side].append((time.perf_counter() - start) / args.batches * 1000)
            ratios = [w / o for o, w in zip(times["original"], times["wrapped"])]
            rows.append(
                {
                    "model": name,
                    "original_ms": statistics.median(times["original"]),
                    "wrapped_ms": statistics.median(times["wrapped"]),
                    "ratio": statistics.median(ratios),
                    "ratios": ratios,
                }
            )
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    lines = [
        f"Device: {device()}, ONNX Runtime {ort.__version__}, one thread. Date: {time.strftime('%Y-%m-%d')}. "
        f"Command: `python -m benchmarks.wrap_overhead{' --write ' + str(args.write) if args.write else ''}`.",
        "",
        f"| model (224 px, batch of {BATCH}) | original graph + numpy normalization, ms | wrapped graph, ms | wrapped / original (median of {args.rounds}) | rounds |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['original_ms']:.1f} | {r['wrapped_ms']:.1f} | **{r['ratio']:.3f}x** | "
            + ", ".join(f"{x:.3f}" for x in r["ratios"])
            + " |"
        )
    lines += ["", "Goal: at most 1.05x."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    publish(table(run(args), args), args.write, SECTION, HEADING)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
