"""Serving benchmark: the BentoML service vs a hand-written FastAPI server vs the in-process limit.

    python benchmarks/serving_compare.py                    # LeNet and ResNet-18, concurrency 1 8 32 128, 10 s each
    python benchmarks/serving_compare.py --models lenet --concurrency 1 8 --seconds 2 --targets service inprocess
    python benchmarks/serving_compare.py --write BENCHMARKS.md

Run from the repository root. For each model, at each concurrency level, in one run on one machine:

- service: ``bentoml serve`` of serving/service.py with both models registered in a temporary
  BentoML home ($SERVING_MODELS); every request names its model in the form field ``model``.
- baseline: benchmarks/fastapi_baseline.py under uvicorn (one worker): PyTorch eager, one image
  per request, the same architecture (ResNet-18: the same weights).
- inprocess: no HTTP. Decode + preprocess in a thread pool, then ``OnnxClassifier.predict`` on a
  batch as large as the concurrency (at most 64, the service's largest batch): what the service's
  engine does with no server around it.

The targets alternate level by level (all three at concurrency 1, then all three at 8, ...), so the
drift of a shared machine hits them alike. Client, servers and the in-process run share the cores.
Every server is started here, in its own process group, and killed when the run ends or fails; they
inherit this environment, so SERVING_* settings set here reach the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import itertools
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import torch
from classify_load import LEVEL_HEADER, level_cells, run_level, summarize  # this script's folder is on sys.path
from PIL import Image
from report import write_section

from model_store import ModelCard, image_bytes_to_input
from serving.engine import OnnxClassifier
from training.checkpoint import save_checkpoint
from training.models import build_model

REPO = Path(__file__).resolve().parents[1]
SECTION = "## HTTP serving: the BentoML service vs a hand-written FastAPI server vs in-process"
MODELS = ("lenet", "resnet18")
TARGETS = ("service", "baseline", "inprocess")
LABELS = {"service": "service", "baseline": "baseline", "inprocess": "in-process"}
MAX_BATCH = 64  # the service's default largest batch: the in-process batch is never larger
READY_SECONDS = 300  # importing torch and building ResNet-18 on a loaded 2-core machine is slow


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models (default: lenet resnet18)"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32, 128], help="levels (default: 1 8 32 128)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each level and target (default: 10)")
    parser.add_argument(
        "--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="what to measure (default: all)"
    )
    parser.add_argument("--images", type=int, default=256, help="distinct test images to cycle through (default: 256)")
    parser.add_argument(
        "--write", type=Path, default=None, help="replace the section between the serving markers in this file"
    )
    return parser


class ServerError(Exception):
    """A server did not start, or answered the warm-up wrongly; its log has been printed."""


@dataclass(frozen=True)
class Subject:
    """One model as all three targets see it."""

    key: str  # the --models name
    store_name: str  # its name in the BentoML store, and the `model` form field of every request
    onnx: Path  # the graph the service and the in-process run load
    checkpoint: Path  # the PyTorch weights the baseline loads
    card: ModelCard
    images: list[bytes]  # encoded test images
    content_type: str
    title: str  # for the report: what the model is, its input, and how the weights relate


def fashion_images(count: int) -> np.ndarray:
    from training.data import load_fashion_mnist

    return load_fashion_mnist("test")[0][:count]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def prepare_lenet(workdir: Path, count: int) -> Subject:
    from model_store.store import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, read_onnx_card

    # The shipped ONNX holds no PyTorch weights (its BatchNorms are folded), so the baseline gets the
    # same architecture and card with random weights: the time per image does not depend on their values.
    card = dataclasses.replace(read_onnx_card(DEFAULT_MODEL_FILE), metrics={}, export={})
    torch.manual_seed(0)
    save_checkpoint(workdir / "lenet.pt", build_model(card), card)
    return Subject(
        "lenet", DEFAULT_MODEL_NAME, DEFAULT_MODEL_FILE, workdir / "lenet.pt", card,
        [encode(Image.fromarray(a), "PNG") for a in fashion_images(count)], "image/png",
        f"LeNet ({card.arch}), 1x28x28, Fashion-MNIST test images as PNG. Service and in-process: the shipped "
        "model; baseline: the same architecture with random weights (the shipped ONNX has no PyTorch weights)",
    )  # fmt: skip


def prepare_resnet18(workdir: Path, count: int) -> Subject:
    from export.onnx_export import export_graph, serialize, with_card

    # Class names no other model has: the label of a warm-up answer proves the service routed to this model.
    card = ModelCard(arch="resnet18", class_names=[f"resnet18-{i}" for i in range(10)], in_channels=3, height=224,
                     width=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dataset="random weights, seed 0")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(card).eval()
    print("exporting resnet18 (random weights, seed 0) to ONNX ...", flush=True)
    proto, _ = export_graph(model, card)
    onnx_path = workdir / "bench-resnet18.onnx"
    onnx_path.write_bytes(serialize(with_card(proto, card)))
    save_checkpoint(workdir / "resnet18.pt", model, card)
    # Fashion-MNIST upscaled to 224x224 RGB, so decoding costs what a real photo of that size would.
    images = [encode(Image.fromarray(a).resize((224, 224), Image.Resampling.BILINEAR).convert("RGB"), "JPEG")
              for a in fashion_images(count)]  # fmt: skip
    return Subject(
        "resnet18", "bench-resnet18", onnx_path, workdir / "resnet18.pt", card, images, "image/jpeg",
        "ResNet-18, 3x224x224, Fashion-MNIST test images upscaled to 224x224 RGB JPEG. "
        "Random weights (seed 0), the same in all three targets",
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@contextlib.contextmanager
def server(name: str, command: list[str], env: dict[str, str], port: int, ready_path: str, logdir: Path):
    """Start ``command`` in its own process group; yield its URL once ``ready_path`` answers 200; kill the group."""
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if process.poll() is not None:
                raise ServerError(f"{name} exited with {process.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerError(f"{name} not ready after {READY_SECONDS} s")
            time.sleep(0.5)
        yield url
    except Exception:
        print(f"--- {name} log, last lines ---\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_service(subjects: list[Subject], workdir: Path) -> contextlib.AbstractContextManager[str]:
    """`bentoml serve` from the repo root with every subject registered in the private $BENTOML_HOME."""
    from model_store.store import register

    tags = []
    for subject in subjects:
        tag = str(register(subject.onnx, subject.store_name).tag)
        print(f"registered {subject.onnx.name} as {tag}", flush=True)
        tags.append(tag)
    port = free_port()
    env = {"SERVING_MODELS": ",".join(tags), "BENTOML_DO_NOT_TRACK": "True"}
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return server("service", command, env, port, "/readyz", workdir)


def start_baseline(subject: Subject, workdir: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "benchmarks.fastapi_baseline:app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--log-level", "warning"]  # fmt: skip
    return server(
        f"baseline-{subject.key}", command, {"BASELINE_CHECKPOINT": str(subject.checkpoint)}, port, "/healthz", workdir
    )


async def check(url: str, subject: Subject, target: str) -> None:
    """A few requests before timing: they warm the server and prove it answers with this model's classes."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for image in subject.images[:8]:
            files = {"image": ("x", image, subject.content_type)}
            response = await client.post("/classify", files=files, data={"model": subject.store_name})
            label = response.json().get("label") if response.status_code == 200 else None
            if label not in subject.card.class_names:
                raise ServerError(
                    f"{target} did not answer with {subject.store_name}'s classes (does it serve $SERVING_MODELS and "
                    f"read the form field `model`?): {response.status_code} {response.text[:300]}"
                )


def run_inprocess(
    engine: OnnxClassifier, images: list[bytes], concurrency: int, seconds: float, pool: ThreadPoolExecutor
) -> dict:
    """Decode + preprocess a batch in the pool (PIL releases the GIL), then one ONNX Runtime call."""
    batch_size = min(concurrency, MAX_BATCH)

    def step(first: int) -> None:
        batch = [images[(first + k) % len(images)] for k in range(batch_size)]
        engine.predict(np.stack(list(pool.map(image_bytes_to_input, batch, itertools.repeat(engine.card)))))

    step(0)  # warm-up: the first run of a batch shape allocates
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = time.perf_counter()
        step(len(latencies) * batch_size)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - started
    return summarize(concurrency, latencies, 0, elapsed, count=len(latencies) * batch_size)


def measure(subject: Subject, args: argparse.Namespace, service_url: str | None, workdir: Path) -> list[dict]:
    rows = []
    with contextlib.ExitStack() as stack:
        urls = {"service": service_url}
        if "baseline" in args.targets:
            urls["baseline"] = stack.enter_context(start_baseline(subject, workdir))
            asyncio.run(check(urls["baseline"], subject, "baseline"))
        engine = OnnxClassifier(subject.onnx) if "inprocess" in args.targets else None
        pool = stack.enter_context(ThreadPoolExecutor(os.cpu_count()))
        for concurrency, target in itertools.product(args.concurrency, [t for t in TARGETS if t in args.targets]):
            if target == "inprocess":
                r = run_inprocess(engine, subject.images, concurrency, args.seconds, pool)
            else:
                r = asyncio.run(run_level(urls[target], subject.images, concurrency, args.seconds,
                                          subject.content_type, {"model": subject.store_name}))  # fmt: skip
                if r["errors"]:  # counted in the table; the log says why
                    log = workdir / ("service.log" if target == "service" else f"baseline-{subject.key}.log")
                    print(f"--- {r['errors']} errors; {log.name}, last lines ---\n{tail(log, 2000)}", file=sys.stderr)
            rows.append({**r, "model": subject.key, "target": target})
            print(f"{subject.key} c={concurrency} {target}: | {level_cells(r)} |", flush=True)
    return rows


def device() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = f"CPU {cpu}, {os.cpu_count()} cores"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
        )
        if query.returncode == 0 and query.stdout.strip():
            text = f"GPU {', '.join(query.stdout.strip().splitlines())}; {text}"
    return text


def report(rows: list[dict], subjects: list[Subject], args: argparse.Namespace) -> str:
    packages = ", ".join(
        f"{p} {version(p)}" for p in ("torch", "onnxruntime", "bentoml", "fastapi", "uvicorn", "httpx")
    )
    engines = {
        "service": f"one BentoML worker, ONNX Runtime, micro-batches of up to {MAX_BATCH}",
        "baseline": f"uvicorn, one worker, PyTorch eager on {'cuda' if torch.cuda.is_available() else 'cpu'}, one image per request",
        "inprocess": "no HTTP, the service's engine on batches of the concurrency (at most 64); its requests are images, its latencies per batch",
    }  # fmt: skip
    providers = ", ".join(ort.get_available_providers())
    lines = [
        f"Device: {device()}. Date: {time.strftime('%Y-%m-%d')}. Command: `python {shlex.join(sys.argv)}`. {packages} ({providers}).",
        f"Each level ran {args.seconds:g} s per target, with the load client on the same machine "
        f"(client CPU: the cores it used, of {os.cpu_count()}). Targets: "
        + "; ".join(f"{LABELS[t]}: {engines[t]}" for t in TARGETS if t in args.targets) + ".",
    ]  # fmt: skip
    for subject in subjects:
        mine = [r for r in rows if r["model"] == subject.key]
        lines += [
            "",
            f"**{subject.title}.**",
            "",
            f"| concurrency | target | {LEVEL_HEADER} | client CPU |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            batch = f" (batch {min(r['concurrency'], MAX_BATCH)})" if r["target"] == "inprocess" else ""
            client = f"{r['client_cpu']:.2f}" if "client_cpu" in r else "—"
            lines.append(f"| {r['concurrency']} | {LABELS[r['target']]}{batch} | {level_cells(r)} | {client} |")
        pairs = [(a, b) for a, b in (("service", "baseline"), ("service", "inprocess")) if {a, b} <= set(args.targets)]
        if pairs:
            lines += ["", "| concurrency | " + " | ".join(f"{LABELS[a]} / {LABELS[b]} throughput" for a, b in pairs) + " |",
                      "|---:|" + "---:|" * len(pairs)]  # fmt: skip
            for concurrency in args.concurrency:
                rps = {r["target"]: r["rps"] for r in mine if r["concurrency"] == concurrency}
                ratios = [f"{rps[a] / rps[b]:.2f}x" if rps[b] else "n/a" for a, b in pairs]
                lines.append(f"| {concurrency} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if min(args.concurrency) < 1 or args.seconds <= 0 or args.images < 1:
        raise SystemExit("error: --concurrency levels, --seconds and --images must be positive")
    prepare = {"lenet": prepare_lenet, "resnet18": prepare_resnet18}
    try:
        with tempfile.TemporaryDirectory(prefix="serving-compare-") as tmp, contextlib.ExitStack() as stack:
            workdir = Path(tmp)
            # A private model store for this run, never the user's: BentoML reads the variable at its first
            # store access (in start_service), and the servers inherit it.
            os.environ["BENTOML_HOME"] = str(workdir / "bentoml")
            subjects = [prepare[key](workdir, args.images) for key in dict.fromkeys(args.models)]
            service_url = None
            if "service" in args.targets:
                service_url = stack.enter_context(start_service(subjects, workdir))
                for subject in subjects:  # every model, before any timing: a misrouted request fails now
                    asyncio.run(check(service_url, subject, "service"))
            rows = [row for subject in subjects for row in measure(subject, args, service_url, workdir)]
    except ServerError as err:  # a server that did not start or answer; its log was printed above
        raise SystemExit(f"error: {err}") from None
    text = report(rows, subjects, args)
    print(text)
    if args.write:
        write_section(args.write, "serving", text, SECTION)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
