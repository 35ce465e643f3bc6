"""Offline scoring throughput: the scorer, Ray-local and the in-process decode + ONNX Runtime limit,
on the same images, side by side in one run.

    python -m benchmarks.score_speed                                          # LeNet, 50,000 PNGs
    python -m benchmarks.score_speed --resnet18-onnx r18.onnx --jpegs 600    # and a ResNet-18 row
    python -m benchmarks.score_speed ... --write BENCHMARKS.md

The images are real Fashion-MNIST test images, written to a temporary folder: 28x28 PNGs for LeNet
(the shipped graph), and the same images upscaled to 224x224 RGB JPEGs (quality 90, ~9 KB) for a
ResNet-18 graph exported by ``python -m export``. More than 10,000 images are copies under other
names. Per model, one after the other:

- **limit** (in-process): one process with the images already in memory, decoding them one after
  another (``image_bytes_to_input``) and running ONNX Runtime at the scorer's batch size on every
  core; no reading, listing or writing. images/s = 1 / (decode + infer), each timed on its own.
  Beside it the **all-core bound** 1 / (decode / cores + infer): decoding spread perfectly over
  every core, which no program reaches on a machine shared with other work.
- **local**: ``python -m scoring`` (``scoring.__main__.main``, in this process) with its defaults:
  one decoding process per core, batch 256, Parquet parts. Wall time of the whole run: listing,
  reading, decoding, inference, parts and the manifest.
- **ray-local**: the same with ``--engine ray`` on a local Ray instance with every core, started
  before the clock (a cluster is started once, not per run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.images import encode, fashion_images, fashion_photos
from benchmarks.load import cpu_seconds, process_tree
from benchmarks.report import device, write_section
from benchmarks.servers import REPO
from model_store import image_bytes_to_input
from model_store.engine import OnnxClassifier
from scoring.__main__ import get_args_parser as scorer_args
from scoring.__main__ import main as score
from scoring.sources import FolderSource

SECTION, HEADING = "score-speed", "## Offline scoring: one machine, Ray-local, and what 100 million images take"
LENET = REPO / "model_store/default/fashion-lenet.onnx"
BATCH = 256
GOAL = 0.70  # the scorer's share of the limit (issue 15)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pngs", type=int, default=50_000, help="LeNet PNGs (default: 50000)")
    parser.add_argument("--resnet18-onnx", type=Path, default=None, help="a ResNet-18 3x224x224 graph: adds its row")
    parser.add_argument("--jpegs", type=int, default=600, help="ResNet-18 JPEGs (default: 600)")
    parser.add_argument(
        "--photos",
        type=int,
        default=0,
        help="LeNet on 12 MP JPEG photos (benchmarks.images.fashion_photos): adds that row",
    )
    parser.add_argument(
        "--section",
        default=SECTION,
        help="the markers' name, for a run kept beside the main one (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of each measurement; medians (default: 1)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray-local runs")
    parser.add_argument("--write", type=Path, default=None, help="replace the section between its markers in this file")
    return parser


def write_folder(folder: Path, files: list[bytes], extension: str) -> None:
    """The files in 100 subfolders, as a photo collection would be split."""
    for i, data in enumerate(files):
        path = folder / f"{i % 100:02d}" / f"{i}.{extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def limit(model: Path, files: list[bytes]) -> dict:
    """One core's decode time per image, all cores' inference time per image, the images/s they
    allow; and the CPU time per image of both (every thread of this process)."""
    classifier = OnnxClassifier(model)
    cpu, start = time.process_time(), time.perf_counter()
    inputs = np.stack([image_bytes_to_input(data, classifier.card) for data in files])
    decode, decode_cpu = (time.perf_counter() - start) / len(files), (time.process_time() - cpu) / len(files)
    classifier.predict(inputs[:BATCH])  # warm-up
    cpu, start = time.process_time(), time.perf_counter()
    for i in range(0, len(inputs), BATCH):
        classifier.predict(inputs[i : i + BATCH])
    infer, infer_cpu = (time.perf_counter() - start) / len(files), (time.process_time() - cpu) / len(files)
    cores = os.cpu_count() or 1
    return {
        "decode_ms": decode * 1e3,
        "infer_ms": infer * 1e3,
        "limit": 1 / (decode + infer),
        "bound": 1 / (decode / cores + infer),
        "limit_cpu_ms": (decode_cpu + infer_cpu) * 1e3,
    }


def run_scorer(model: Path, folder: Path, output: Path, *flags: str) -> tuple[float, float]:
    """images/s of one scorer run, and its CPU ms per image (this process and its worker processes);
    its summary line is kept off the report."""
    args = scorer_args().parse_args([str(folder), "--output", str(output), "--onnx", str(model), *flags])
    with TreeCPU() as cpu:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            record = score(args)
        seconds = time.perf_counter() - start
    assert record["failed"] == 0, record
    return record["scored"] / seconds, cpu.seconds * 1e3 / record["scored"]


class TreeCPU(threading.Thread):
    """CPU seconds of this process and of its descendants while inside: the workers are forked by a
    fork server, so their time never reaches this process's rusage. Descendants are read from
    /proc every 50 ms (``wrk_load.cpu_seconds``); a worker's last 50 ms before it ends can be missed."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = self._descendants()
        self.last: dict[int, float] = {}
        self.done = threading.Event()

    @staticmethod
    def _descendants() -> dict[int, float]:
        return {pid: cpu_seconds([pid]) for pid in process_tree(os.getpid()) if pid != os.getpid()}

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.last.update(self._descendants())

    def __enter__(self) -> TreeCPU:
        self.own = time.process_time()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()
        self.last.update(self._descendants())
        own = time.process_time() - self.own
        self.seconds = own + sum(cpu - self.before.get(pid, 0.0) for pid, cpu in self.last.items())


def listing_rate(folder: Path) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in FolderSource(str(folder)).entries())
    return count / (time.perf_counter() - start)


def measure(name: str, model: Path, files: list[bytes], extension: str, args, workdir: Path) -> dict:
    folder = workdir / name
    write_folder(folder, files, extension)
    keys = ("limit", "bound", "local", "ray", "decode_ms", "infer_ms", "limit_cpu_ms", "local_cpu_ms")
    rounds: dict[str, list[float]] = {key: [] for key in keys}
    bytes_per_row = 0.0
    for r in range(args.rounds):
        figures = limit(model, files)
        for key in ("limit", "bound", "decode_ms", "infer_ms", "limit_cpu_ms"):
            rounds[key].append(figures[key])
        output = workdir / f"{name}-local-{r}"
        speed, cpu_ms = run_scorer(model, folder, output)
        rounds["local"].append(speed)
        rounds["local_cpu_ms"].append(cpu_ms)
        bytes_per_row = sum(p.stat().st_size for p in output.glob("part-*")) / len(files)
        if not args.no_ray:
            rounds["ray"].append(run_scorer(model, folder, workdir / f"{name}-ray-{r}", "--engine", "ray")[0])
        print(f"{name} round {r}: " + ", ".join(f"{k} {v[-1]:,.3f}" for k, v in rounds.items() if v), flush=True)
    row = {key: statistics.median(values) if values else float("nan") for key, values in rounds.items()}
    return {"model": name, "images": len(files), **row, "list_rate": listing_rate(folder), "row_bytes": bytes_per_row}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    command = "python -m benchmarks.score_speed" + (
        f" --resnet18-onnx {args.resnet18_onnx} --jpegs {args.jpegs}" if args.resnet18_onnx else ""
    )
    command += f" --pngs {args.pngs}" if args.pngs != 50_000 else ""
    command += f" --photos {args.photos} --section {args.section}" if args.photos else ""
    command += " --no-ray" if args.no_ray else ""
    lines = [
        f"Device: {device()}, shared with other work while it ran. Date: {time.strftime('%Y-%m-%d')}. Command: "
        f"`{command} --write BENCHMARKS.md`. onnxruntime {version('onnxruntime')}, pyarrow {version('pyarrow')}, "
        f"ray {version('ray') if not args.no_ray else '(not run)'}; batch {BATCH}; {args.rounds} round(s), medians. "
        "Limit: one process, images in memory, decode then ONNX Runtime on every core, no file reading, listing "
        "or writing; all-core bound: the same with decoding spread perfectly over every core. Local: "
        "`python -m scoring` with its defaults (a worker process per core, each reading, decoding and running a "
        "one-thread session), the whole run from listing to manifest; ray-local: `--engine ray` on a local Ray "
        "instance with every core (one replica per CPU), started before the clock. CPU: user + system time of "
        "every thread and worker process, per image.",
        "",
        "| model, images | decode ms/img | infer ms/img (all cores) | limit img/s | local img/s | local / limit | "
        "all-core bound img/s | CPU ms/img: limit, local | ray-local img/s | ray / local | listing entries/s | "
        "Parquet bytes/row |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']}, {r['images']:,} | {r['decode_ms']:.3f} | {r['infer_ms']:.3f} | {r['limit']:,.0f} | "
            f"{r['local']:,.0f} | **{r['local'] / r['limit']:.0%}** | {r['bound']:,.0f} | "
            f"{r['limit_cpu_ms']:.3f}, {r['local_cpu_ms']:.3f} | {r['ray']:,.0f} | {r['ray'] / r['local']:.2f}x | "
            f"{r['list_rate']:,.0f} | {r['row_bytes']:.0f} |"
        )
    lines += ["", f"Goal: local at least {GOAL:.0%} of the limit."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    subjects = []
    if args.pngs:
        subjects.append(
            ("LeNet PNG 28x28", LENET, [encode(Image.fromarray(a), "PNG") for a in fashion_images(args.pngs)], "png")
        )
    if args.photos:  # the shipped card decodes scaled: each photo at 1/8 scale
        subjects.append(("LeNet JPEG 12 MP photos", LENET, fashion_photos(args.photos), "jpg"))
    if args.resnet18_onnx:
        jpegs = [
            encode(Image.fromarray(a).resize((224, 224), Image.Resampling.BILINEAR).convert("RGB"), "JPEG")
            for a in fashion_images(args.jpegs)
        ]
        subjects.append(("ResNet-18 JPEG 224x224", args.resnet18_onnx, jpegs, "jpg"))
    if not subjects:
        raise SystemExit("error: nothing to score: --pngs 0 needs --photos or --resnet18-onnx")
    if not args.no_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="score-speed-") as workdir:
        rows = [measure(name, model, files, ext, args, Path(workdir)) for name, model, files, ext in subjects]
    text = report(rows, args)
    print(text)
    if args.write:
        heading = HEADING if args.section == SECTION else f"{HEADING}: {args.section}"
        write_section(args.write, args.section, text, heading)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
