"""Every textbook row trained, exported and verified, in one command for a GPU machine's short lease.

    python benchmarks/gpu_suite.py --out gpu-results            # on the GPU machine
    python benchmarks/gpu_suite.py --out /tmp/smoke --smoke     # the same sequence on CPU, tiny (CI)

In priority order, each step a subprocess of the project's own commands, each result written the
moment it exists: a JSON line in ``OUT/results.jsonl`` and its row in ``OUT/BENCHMARKS.md``. A run
cut off at its time limit leaves everything finished before.

1. the environment: device, torch and CUDA versions, ONNX Runtime providers (loud when a GPU is
   present and the CUDA provider is not: see benchmarks/wheel_parts.py);
2. training, 10 epochs each at the textbook sizes with the recommended recipe: AlexNet (224),
   VGG-11 channels/4 (224), NiN (224), GoogLeNet (96), ResNet-18 (96), DenseNet (96);
3. export of each trained model, verified against PyTorch (``python -m export``);
4. PyTorch eager against ONNX Runtime (``benchmarks/export_speed.py``) on the device.

Not yet here (issue 13): ResNet-18's longer recipe, fp16/TensorRT rows, serving on the GPU.
``--smoke`` runs every step on the CPU on synthetic data at small sizes, for a few batches.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from report import write_section  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
# (model, textbook size, model args, smoke size): the course's rows, in priority order.
ROWS = [
    ("alexnet", 224, [], 96),
    ("vgg11", 224, ["--model-arg", "width_divisor=4"], 32),
    ("nin", 224, [], 96),
    ("googlenet", 96, [], 32),
    ("resnet18", 96, [], 32),
    ("densenet", 96, [], 32),
]
RECIPE = ["--hflip", "--label-smoothing", "0.1", "--lr-warmup-epochs", "1"]  # "recommended" (BENCHMARKS.md)
SMOKE = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "16", "--epochs", "1", "--device", "cpu"]


class Results:
    """``OUT/results.jsonl`` and ``OUT/BENCHMARKS.md``, both written after every step."""

    def __init__(self, out: Path, command: str):
        self.out, self.command = out, command
        out.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, list[str]] = {}

    def add(self, step: str, record: dict, row: str | None = None, section: str | None = None) -> None:
        record = {"step": step, "date": str(date.today()), **record}
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if row is not None and section is not None:
            self.rows.setdefault(section, []).append(row)
            header = HEADERS[section]
            text = "\n".join([f"Command: `{self.command}`.", "", *header, *self.rows[section]])
            write_section(self.out / "BENCHMARKS.md", f"gpu-suite-{section}", text, f"## GPU suite: {section}")


HEADERS = {
    "training": [
        "| model | input | epochs | test acc | examples/s | seconds | device |",
        "|---|---:|---:|---:|---:|---:|---|",
    ],
    "export": [
        "| model | parity (max abs diff of probabilities) | top-1 agreement | seconds |",
        "|---|---:|---:|---:|",
    ],
}


def environment() -> dict:
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    providers = ort.get_available_providers()
    record = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU {platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "providers": providers,
    }
    # What training and export import; the GPU machines start bare of some (ENVIRONMENT.md): say so first.
    needed = ("numpy", "PIL", "tqdm", "matplotlib", "onnx", "onnxscript")
    record["missing"] = [name for name in needed if importlib.util.find_spec(name) is None]
    if record["missing"]:
        print(
            f"WARNING: not installed here: {', '.join(record['missing'])}; the steps needing them fail", file=sys.stderr
        )
    if cuda and "CUDAExecutionProvider" not in providers:
        record["warning"] = (
            "a GPU is present but this onnxruntime has no CUDAExecutionProvider: ONNX Runtime rows run on the "
            "CPU; install onnxruntime-gpu with benchmarks/wheel_parts.py and put its --target on PYTHONPATH"
        )
        print(f"WARNING: {record['warning']}", file=sys.stderr, flush=True)
    return record


def run(command: list[str], limit_s: float, smoke: bool) -> tuple[subprocess.CompletedProcess, float]:
    """One step's command: a subprocess with a time limit on the GPU (a CUDA error or a hang in one
    model costs that row only); in-process for ``--smoke``, where importing torch for each of a
    dozen subprocesses would be most of the time CI gives it."""
    start = time.perf_counter()
    if smoke and command[1:2] == ["-m"]:
        module = {"training": "training.__main__", "export": "export.__main__"}[command[2]]
        sys.path.insert(0, str(REPO))
        cli = __import__(module, fromlist=["cli"]).cli
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli(command[3:])
        result = subprocess.CompletedProcess(command, code, stdout.getvalue(), stderr.getvalue())
    else:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
    return result, time.perf_counter() - start


def step(results: Results, name: str, model: str, command: list[str], limit_s: float, smoke: bool) -> float | None:
    """Run one model's step; its seconds, or None once its failure is recorded as that row's result."""
    try:
        result, seconds = run(command, limit_s, smoke)
    except subprocess.TimeoutExpired:
        results.add(name, {"model": model, "error": f"not done within {limit_s:.0f} s"})
        return None
    if result.returncode != 0:
        results.add(name, {"model": model, "error": last_line(result.stderr)})
        return None
    return seconds


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


def train(
    results: Results, model: str, size: int, model_args: list[str], smoke: bool, args: argparse.Namespace
) -> None:
    out, epochs, limit_s = results.out / "runs" / model, args.epochs, args.train_limit_s
    command = [sys.executable, "-m", "training", "train", "--model", model, "--size", str(size), *model_args]
    command += ["--data-dir", str(args.data_dir)] if args.data_dir and not smoke else []
    command += [*RECIPE, *(SMOKE if smoke else ["--epochs", str(epochs)]), "--output-dir", str(out)]
    if (seconds := step(results, "train", model, command, limit_s, smoke)) is None:
        return
    log = list(csv.DictReader(open(out / "log.csv")))
    speeds = sorted(float(r["examples_per_s"]) for r in log)
    record = {
        "model": model,
        "size": size,
        "epochs": len(log),
        "test_acc": float(log[-1]["test_acc"]),
        "examples_per_s": speeds[len(speeds) // 2],
        "seconds": round(seconds, 1),
        "command": " ".join(command[1:]),
    }
    device = "CPU (smoke)" if smoke else "GPU"
    row = (
        f"| {model} | {size} | {record['epochs']} | {record['test_acc']:.4f} | {record['examples_per_s']:,.0f} | "
        f"{seconds:.0f} | {device} |"
    )
    results.add("train", record, row, "training")


def export(results: Results, model: str, limit_s: float, smoke: bool):
    checkpoint, onnx_path = results.out / "runs" / model / "last.pt", results.out / "onnx" / f"{model}.onnx"
    if not checkpoint.is_file():
        return results.add("export", {"model": model, "error": "no checkpoint: its training did not finish"})
    command = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--output", str(onnx_path)]
    if (seconds := step(results, "export", model, command, limit_s, smoke)) is None:
        return
    sys.path.insert(0, str(REPO))
    from model_store.store import read_onnx_card

    parity = read_onnx_card(onnx_path).export.get("parity", {})
    record = {"model": model, "parity": parity, "seconds": round(seconds, 1)}
    row = f"| {model} | {parity['max_abs_logit_diff']:.1e} | {parity['top1_agreement']:.4f} | {seconds:.0f} |"
    results.add("export", record, row, "export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, BENCHMARKS.md, runs")
    parser.add_argument("--smoke", action="store_true", help="every step on CPU, synthetic data, small sizes")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per model (default: 10)")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="the Fashion-MNIST idx files (the GPU machine has no download)"
    )
    parser.add_argument("--train-limit-s", type=float, default=600, help="most seconds per training (default: 600)")
    args = parser.parse_args()
    results = Results(args.out, " ".join(["python", *sys.argv]))
    results.add("environment", environment())
    for model, size, model_args, smoke_size in ROWS:
        train(results, model, smoke_size if args.smoke else size, model_args, args.smoke, args)
    for model, *_ in ROWS:
        export(results, model, 300, args.smoke)
    speed = [
        sys.executable,
        "benchmarks/export_speed.py",
        "--models",
        "resnet18",
        "--rounds",
        "1" if args.smoke else "5",
    ]
    import torch

    speed += ["--device", "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"]
    speed += ["--write", str(args.out / "BENCHMARKS.md")]
    try:
        result, seconds = run(speed, 600, args.smoke)
        outcome = {"returncode": result.returncode, "seconds": round(seconds, 1), "last": last_line(result.stdout)}
    except subprocess.TimeoutExpired:
        outcome = {"error": "not done within 600 s"}
    results.add("export_speed", outcome)


if __name__ == "__main__":
    main()
