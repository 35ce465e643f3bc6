"""PyTorch eager vs the exported graph in ONNX Runtime: latency at batch 1, throughput at batch 64.

    python -m benchmarks.export_speed --write BENCHMARKS.md                  # every model, on the CPU
    python -m benchmarks.export_speed --device cuda --write BENCHMARKS.md    # on a GPU
    python -m benchmarks.export_speed --models resnet34 --rounds 9
    python -m benchmarks.export_speed --device cuda --data-dir /tmp/fashion-mnist --jsonl speed.jsonl

The engines, per device:
- cpu: PyTorch eager fp32; the graph in fp32; the graph quantized to int8 as ``python -m export
  --int8`` does it, calibrated on Fashion-MNIST training images.
- cuda: PyTorch eager fp32; the graph in fp32 and in fp16 (``--fp16``) on the CUDA provider; the
  fp32 graph on the TensorRT provider, in fp32 and with its fp16 mode, when this onnxruntime
  build has TensorRT (an engine it cannot load is a row saying why, never a silent gap).
All get the same real Fashion-MNIST test images resized to the model's input, and are timed in
alternating rounds (these machines are shared and noisy), reporting medians. Each row says what its
speed cost: top-1 agreement with eager fp32 and the largest |logit difference| on the batch-64
input. Weights are random (seed 0): speed does not depend on their values; int8 accuracy on trained
weights is what ``python -m export --int8`` verifies on every export.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.engines import Engine, device_name, eager_engine, onnx_engine, seconds_per_call
from benchmarks.report import write_section
from export.__main__ import calibration_sample
from export.onnx_export import export_graph, serialize
from export.quantize import quantize_int8
from model_store import ModelCard
from training.data import stack_items
from training.fashion_mnist import FashionMNIST
from training.models import build_model, default_size, list_models

SECTIONS = {
    "cpu": ("export-speed", "## Export speed: PyTorch eager vs ONNX Runtime on the CPU"),
    "cuda": ("export-speed-cuda", "## Export speed: PyTorch eager vs ONNX Runtime on a GPU"),
}
BATCHES = (1, 64)
CALIBRATION_IMAGES = 256


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=list_models(), choices=list_models(), help="models (default: all registered)"
    )
    parser.add_argument(
        "--device", default="cpu", choices=tuple(SECTIONS), help="where both engines run (default: cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="cpu: threads for every engine (default: all cores)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default: 5)")
    parser.add_argument(
        "--write", type=Path, default=None, help="replace this device's table between its markers in this file"
    )
    parser.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="also append each row, and each engine not measured, here (default: none)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="the Fashion-MNIST files (default: found as training finds them)"
    )
    return parser


def engines(
    model: torch.nn.Module,
    card: ModelCard,
    device: str,
    threads: int,
    cache: Path,
    data_dir: Path | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, Engine]:
    """The engines of ``device``; each one not measured goes into ``skipped`` with the reason."""
    skipped = {} if skipped is None else skipped
    proto = export_graph(model, card)[0]
    if device == "cpu":
        calibration = calibration_sample(FashionMNIST("train", card, data_dir), CALIBRATION_IMAGES)
        cpu = ["CPUExecutionProvider"]
        return {
            "eager fp32": eager_engine(model, "cpu"),
            "onnx fp32": onnx_engine(serialize(proto), cpu, threads),
            "onnx int8": onnx_engine(serialize(quantize_int8(proto, calibration)), cpu, threads),
        }
    graph, fp16_graph = serialize(proto), serialize(export_graph(model, card, fp16=True)[0])
    found = {
        "eager fp32": eager_engine(model, "cuda"),
        "onnx fp32": onnx_engine(graph, ["CUDAExecutionProvider"], threads),
        "onnx fp16": onnx_engine(fp16_graph, ["CUDAExecutionProvider"], threads),
    }
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        for label in ("tensorrt fp32", "tensorrt fp16"):
            skipped[label] = "this onnxruntime build has no TensorrtExecutionProvider"
    else:
        shape = f"{card.in_channels}x{card.height}x{card.width}"
        for label, fp16 in (("tensorrt fp32", False), ("tensorrt fp16", True)):
            options = {
                "trt_fp16_enable": fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache / label),
                "trt_profile_min_shapes": f"pixels:1x{shape}",
                "trt_profile_opt_shapes": f"pixels:{max(BATCHES)}x{shape}",
                "trt_profile_max_shapes": f"pixels:{max(BATCHES)}x{shape}",
            }
            try:
                found[label] = onnx_engine(
                    graph, [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"], threads
                )
            except Exception as err:  # listed by the build, but its libraries are not installed here
                skipped[label] = f"TensorrtExecutionProvider did not load: {str(err).strip().splitlines()[0][:300]}"
                print(f"{card.arch}: {label} not measured: {skipped[label]}", flush=True)
    return found


def measure(
    name: str,
    device: str,
    threads: int,
    rounds: int,
    cache: Path,
    data_dir: Path | None = None,
    skipped: dict[str, str] | None = None,
) -> list[dict]:
    torch.manual_seed(0)
    size = default_size(name)
    card = ModelCard(
        arch=name,
        class_names=[str(i) for i in range(10)],
        in_channels=1,
        height=size,
        width=size,
        mean=(0.29,),
        std=(0.35,),
    )
    model = build_model(card).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = engines(model, card, device, threads, cache, data_dir, skipped)
    test = FashionMNIST("test", card, data_dir)
    images = stack_items(test, range(max(BATCHES)))[0]
    rows = {label: {"model": name, "input": f"1x{size}x{size}", "engine": label} for label in found}
    for batch in BATCHES:
        pixels = images[:batch]
        times = {label: [] for label in found}
        for run in found.values():
            run(pixels)  # warm-up: allocations, kernel selection, TensorRT engine builds
        for _ in range(rounds):  # alternate, so every engine sees the same machine load
            for label, run in found.items():
                times[label].append(seconds_per_call(lambda run=run: run(pixels)))
        for label in found:
            rows[label][f"seconds_{batch}"] = statistics.median(times[label])
    reference = found["eager fp32"](images)
    for label, run in found.items():
        got = run(images)
        rows[label]["top1"] = float((got.argmax(1) == reference.argmax(1)).mean())
        rows[label]["diff"] = float(np.abs(got - reference).max())
    return list(rows.values())


def table(rows: list[dict], device: str, threads: int, skipped: dict[str, str] | None = None) -> str:
    lines = [
        (
            f"Device: {device_name(device, threads)}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
            f"{time.strftime('%Y-%m-%d')}. Command: `python -m benchmarks.export_speed --device {device} --write BENCHMARKS.md`. "
            f"Random weights (speed does not depend on their values), real Fashion-MNIST test images; medians of alternating rounds."
        ),
        "",
        "| model | input | engine | b1 ms | b1 vs eager | b64 img/s | b64 vs eager | b64 vs onnx fp32 | top-1 agree | max abs diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(row_line(r, {x["engine"]: x for x in rows if x["model"] == r["model"]}))
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{engine}: {why}" for engine, why in skipped.items()) + "."]
    return "\n".join(lines)


def row_line(r: dict, same_model: dict[str, dict]) -> str:
    def ratio(other: str, batch: int) -> str:  # how many times faster than ``other``; none against eager or itself
        base = same_model.get(other)
        if base is None or r["engine"] in (other, "eager fp32"):
            return "—"
        return f"{base[f'seconds_{batch}'] / r[f'seconds_{batch}']:.2f}x"

    return (
        f"| {r['model']} | {r['input']} | {r['engine']} | {r['seconds_1'] * 1e3:.2f} | {ratio('eager fp32', 1)} "
        f"| {64 / r['seconds_64']:,.0f} | {ratio('eager fp32', 64)} | {ratio('onnx fp32', 64)} "
        f"| {r['top1']:.3f} | {r['diff']:.1e} |"
    )


def main(args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit(f"error: --rounds and --threads must be at least 1, got {args.rounds}, {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but PyTorch sees no GPU")
    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(
            f"error: --device cuda, but this onnxruntime has only {ort.get_available_providers()} (install onnxruntime-gpu)"
        )
    torch.set_num_threads(args.threads)
    rows, not_measured = [], {}
    with tempfile.TemporaryDirectory(prefix="export-speed-") as cache:
        for name in args.models:
            skipped: dict[str, str] = {}
            mine = measure(name, args.device, args.threads, args.rounds, Path(cache), args.data_dir, skipped)
            rows += mine
            not_measured.update(skipped)
            for r in mine:
                print(row_line(r, {x["engine"]: x for x in mine}), flush=True)
            if args.jsonl:  # as each model is done, so a run cut short keeps the models before
                records = [{**r, "device": args.device} for r in mine]
                records += [
                    {"model": name, "engine": e, "device": args.device, "skipped": why} for e, why in skipped.items()
                ]
                with open(args.jsonl, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
    text = table(rows, args.device, args.threads, not_measured)
    print(text)
    if args.write:
        section, heading = SECTIONS[args.device]
        write_section(args.write, section, text, heading)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
