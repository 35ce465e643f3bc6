"""What int8 costs and buys on trained weights: accuracy on the whole test set, size and speed.

    python benchmarks/int8_accuracy.py --checkpoints runs/default/last.pt runs/resnet34/last.pt --write BENCHMARKS.md

Per checkpoint, three graphs of the same weights: fp32 as ``python -m export`` writes it; int8 as
``python -m export --int8`` writes it (7-bit weights, calibrated on 512 training images); and int8
with full 8-bit weights, the setting the export does not use (see ``export/quantize.py``), so that
the choice is measured rather than asserted. Each graph runs in ONNX Runtime on every test image
against PyTorch eval; batch-64 throughput is timed in alternating rounds on real test images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

from benchmarks.engines import device_name, onnx_engine, seconds_per_call
from benchmarks.report import write_section
from export.__main__ import calibration_sample
from export.onnx_export import compare_with_torch, export_graph, serialize
from export.quantize import DEFAULT_CALIBRATION_IMAGES, quantize_int8
from training.checkpoint import load_model
from training.data import run_splits, stack_items
from training.dataspec import DataSpec

SECTION, HEADING = "int8-accuracy", "## int8 on trained weights: accuracy, size, speed (CPU)"
BATCH = 64
GRAPHS = ("fp32", "int8, 7-bit weights (the export's)", "int8, 8-bit weights")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoints", type=Path, nargs="+", required=True, help="checkpoints written by `python -m training train`"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default: 5)")
    parser.add_argument("--write", type=Path, default=None, help="replace the table between its markers in this file")
    return parser


def measure(checkpoint: Path, threads: int, rounds: int) -> list[dict]:
    model, card, payload = load_model(checkpoint)
    train, test, _ = run_splits(card, DataSpec.from_checkpoint(payload, card))
    pixels, labels = stack_items(test, range(len(test)))
    calibration = calibration_sample(train, DEFAULT_CALIBRATION_IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_graph(model, card)[0]
    graphs = dict(
        zip(GRAPHS, (proto, quantize_int8(proto, calibration), quantize_int8(proto, calibration, reduce_range=False)))
    )
    rows = {}
    for label, graph in graphs.items():
        data = serialize(graph)
        parity = compare_with_torch(model, data, pixels, (256,), labels)
        rows[label] = {
            "model": card.arch,
            "checkpoint": str(checkpoint),
            "input": f"{card.in_channels}x{card.height}x{card.width}",
            "graph": label,
            "kib": len(data) / 1024,
            "parity": parity,
            "engine": onnx_engine(data, ["CPUExecutionProvider"], threads),
        }
    batch = pixels[:BATCH]
    times = {label: [] for label in rows}
    for row in rows.values():
        row["engine"](batch)  # warm-up
    for _ in range(rounds):  # alternate, so every graph sees the same machine load
        for label, row in rows.items():
            times[label].append(seconds_per_call(lambda row=row: row["engine"](batch)))
    for label, row in rows.items():
        row["images_per_second"] = BATCH / statistics.median(times[label])
        del row["engine"]
    return list(rows.values())


def table(rows: list[dict], threads: int, checkpoints: list[Path]) -> str:
    lines = [
        (
            f"Device: {device_name('cpu', threads)}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
            f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/int8_accuracy.py --checkpoints "
            f"{' '.join(map(str, checkpoints))} --write BENCHMARKS.md`. Accuracy and agreement on every test image, at batch 256; "
            f"throughput at batch {BATCH}, medians of alternating rounds."
        ),
        "",
        f"| model | input | graph | size KiB | accuracy | PyTorch accuracy | top-1 agree | max abs diff | b{BATCH} img/s | vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp32 = next(x for x in rows if x["checkpoint"] == r["checkpoint"] and x["graph"] == GRAPHS[0])
        p = r["parity"]
        lines.append(
            f"| {r['model']} | {r['input']} | {r['graph']} | {r['kib']:,.0f} | {p['accuracy_onnx']:.4f} | {p['accuracy_torch']:.4f} "
            f"| {p['top1_agreement']:.4f} | {p['max_abs_logit_diff']:.1e} | {r['images_per_second']:,.0f} "
            f"| {r['images_per_second'] / fp32['images_per_second']:.2f}x |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit(f"error: --rounds and --threads must be at least 1, got {args.rounds}, {args.threads}")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        raise SystemExit(f"error: no such checkpoint: {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    rows = [row for checkpoint in args.checkpoints for row in measure(checkpoint, args.threads, args.rounds)]
    text = table(rows, args.threads, args.checkpoints)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
