"""Serving benchmark: the service against what a user would run instead, side by side in one run.

    python -m benchmarks.serving_compare                                   # LeNet, c=1 32 128; 15 s, 2 rounds
    python -m benchmarks.serving_compare --resnet18-checkpoint runs/resnet18-224/last.pt   # + ResNet-18 rows
    python -m benchmarks.serving_compare --subjects lenet --concurrency 32 --seconds 5 --rounds 1 --targets service floor
    python -m benchmarks.serving_compare ... --write BENCHMARKS.md

Run from the repository root; needs `wrk` (apt-get install wrk) and the bench extra (LitServe).
Targets, each its own server process tree on loopback, all started before timing and loaded in
turn (every target at one level, then the next round), so a shared machine's drift hits them alike:

- service: ``bentoml serve`` of serving/service.py, one worker (``service-2w``: two; ``service-nolog``:
  SERVING_LOG_REQUESTS=false; ``service-traced``: SERVING_TRACING=true; ``service-int8``: the int8 graph).
- fastapi: the hand-written FastAPI + PyTorch eager server (benchmarks/fastapi_baseline.py), one image per request.
- litserve-1ms / litserve-5ms: LitServe with its batching (max 64) at two batch timeouts (benchmarks/litserve_peer.py).
- floor: bare Starlette, batch 1 on the event loop, nothing else (benchmarks/starlette_floor.py).

The load client is wrk, posting real Fashion-MNIST test images as multipart forms in a closed loop
(benchmarks/wrk_load.py); server CPU per request is read from /proc for each target's process tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from benchmarks.images import encode, fashion_images, fashion_pngs
from benchmarks.load import Bodies, run_wrk, write_bodies
from benchmarks.peers import lenet_checkpoint
from benchmarks.report import device, write_section
from benchmarks.servers import REPO, free_port, metric_sums, process
from model_store import ModelCard
from training.checkpoint import read_checkpoint

SECTION = "## HTTP serving: the service against a hand-written server, LitServe and a bare floor"
LEVELS = {"lenet": [1, 32, 128], "resnet18": [32]}
EXTRA_AT = 32  # service-2w, -nolog and -traced run at this level only: they answer one question each
TARGETS = (
    "service",
    "service-before",
    "service-2w",
    "service-nolog",
    "service-traced",
    "service-int8",
    "fastapi",
    "litserve-1ms",
    "litserve-5ms",
    "floor",
)
DESCRIPTIONS = {
    "service": "`bentoml serve`, 1 worker, defaults",
    "service-before": "`bentoml serve`, 1 worker, defaults, run from the checkout --before names (a change's before)",
    "service-2w": "`bentoml serve`, SERVING_WORKERS=2",
    "service-nolog": "`bentoml serve`, SERVING_LOG_REQUESTS=false",
    "service-traced": "`bentoml serve`, SERVING_TRACING=true (sampled 1.0, no exporter)",
    "service-int8": "`bentoml serve`, the `python -m export --int8` graph",
    "fastapi": "FastAPI + PyTorch eager, uvicorn, 1 worker, one image per request",
    "litserve-1ms": "LitServe 0.2.19, max batch 64, batch_timeout 1 ms",
    "litserve-5ms": "LitServe 0.2.19, max batch 64, batch_timeout 5 ms",
    "floor": "bare Starlette + uvicorn, batch 1 on the event loop, no limits, metrics or logs",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--subjects",
        nargs="+",
        choices=list(LEVELS),
        default=None,
        help="models (default: lenet, and resnet18 when --resnet18-checkpoint is given)",
    )
    parser.add_argument(
        "--resnet18-checkpoint",
        type=Path,
        default=None,
        help="a trained 3x224x224 ResNet-18 checkpoint: its fp32 and verified int8 graphs are served",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=None, help="levels (default: lenet 1 32 128, resnet18 32)"
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=[t for t in TARGETS if t != "service-before"],
        help="what to run (default: all; service-before with --before)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout (a git worktree of the commit before a change): its service runs as the target "
        "service-before, in turn with this one's, so a change is measured before and after in one run",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each run (default: 15)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each target at each level; medians reported (default: 2)"
    )
    parser.add_argument("--images", type=int, default=256, help="distinct test images to cycle through (default: 256)")
    parser.add_argument(
        "--write", type=Path, default=None, help="replace the section between the serving markers in this file"
    )
    parser.add_argument(
        "--section",
        default="serving",
        help="the markers' name, for a run kept beside the main one (default: serving; a new name is appended)",
    )
    return parser


@dataclass(frozen=True)
class Subject:
    key: str
    title: str
    onnx: Path  # the fp32 graph
    int8: Path | None  # the verified int8 graph, if there is one
    checkpoint: Path  # the PyTorch weights FastAPI serves
    bodies: Bodies


@dataclass(frozen=True)
class Running:
    url: str  # the classify endpoint
    pid: int  # the root of the server's process tree
    batches: Callable[[], tuple[float, float]] | None  # (batches, images) so far, where the server counts them


def prepare_lenet(workdir: Path, args: argparse.Namespace) -> Subject:
    from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card

    card = read_onnx_card(DEFAULT_MODEL_FILE)
    return Subject(
        "lenet",
        f"LeNet ({card.arch}), 1x28x28, Fashion-MNIST test images as PNG (~0.7 KB). The shipped graph; "
        "FastAPI: the same architecture with random weights (the shipped ONNX holds no PyTorch weights)",
        DEFAULT_MODEL_FILE,
        None,
        lenet_checkpoint(workdir / "lenet.pt"),
        write_bodies(workdir / "lenet-bodies", fashion_pngs(args.images), "image/png"),
    )


def prepare_resnet18(workdir: Path, args: argparse.Namespace) -> Subject:
    checkpoint = args.resnet18_checkpoint
    card = ModelCard.from_dict(read_checkpoint(checkpoint)["card"])
    if (card.arch, card.in_channels, card.height, card.width) != ("resnet18", 3, 224, 224):
        raise SystemExit(
            f"error: {checkpoint} is a {card.arch} at {card.in_channels}x{card.height}x{card.width}; want resnet18 3x224x224"
        )
    graphs = {}
    for name, flags in (("fp32", []), ("int8", ["--int8"])):
        graphs[name] = workdir / f"resnet18-{name}.onnx"
        print(f"exporting {checkpoint} ({name}), verified against PyTorch ...", flush=True)
        export = ["-m", "export", "--checkpoint", str(checkpoint), "--output", str(graphs[name]), *flags]
        subprocess.run([sys.executable, *export], cwd=REPO, check=True)
    # Fashion-MNIST upscaled to 224x224 RGB, so decoding costs what a real photo of that size would.
    jpegs = [
        encode(Image.fromarray(a).resize((224, 224), Image.Resampling.BILINEAR).convert("RGB"), "JPEG")
        for a in fashion_images(args.images)
    ]
    return Subject(
        "resnet18",
        f"ResNet-18, 3x224x224, Fashion-MNIST test images upscaled to 224x224 RGB JPEG (~9 KB); weights "
        f"{checkpoint} in every target, int8: its verified `python -m export --int8` graph",
        graphs["fp32"],
        graphs["int8"],
        checkpoint,
        write_bodies(workdir / "resnet18-bodies", jpegs, "image/jpeg"),
    )


@contextlib.contextmanager
def start(target: str, subject: Subject, workdir: Path, before: Path | None) -> Iterator[Running]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    batches, cwd = None, REPO
    if target.startswith("service"):
        cwd = before if target == "service-before" else REPO
        command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
        env, ready = service_env(target, subject, workdir, cwd), "/readyz"
        batches = lambda: metric_sums(base, "classify_batch_size")  # noqa: E731
    elif target == "fastapi":
        command, ready = [*uvicorn, "benchmarks.fastapi_baseline:app"], "/healthz"
        env = {"BASELINE_CHECKPOINT": str(subject.checkpoint)}
    elif target.startswith("litserve"):
        stats = workdir / f"{target}-{subject.key}.json"
        command, ready = [sys.executable, "-m", "benchmarks.litserve_peer", "--port", str(port)], "/health"
        timeout = "0.001" if target == "litserve-1ms" else "0.005"
        env = {"LITSERVE_ONNX": str(subject.onnx), "LITSERVE_BATCH_TIMEOUT": timeout, "LITSERVE_STATS": str(stats)}
        env["PYTHONPATH"] = str(REPO)
        batches = lambda: _litserve_batches(stats)  # noqa: E731
    else:
        command = [*uvicorn, "--loop", "uvloop", "--http", "httptools", "benchmarks.starlette_floor:app"]
        env, ready = {"FLOOR_ONNX": str(subject.onnx)}, "/healthz"
    with process(f"{target}-{subject.key}", command, env, base + ready, workdir, cwd) as pid:
        yield Running(base + "/classify", pid, batches)


def service_env(target: str, subject: Subject, workdir: Path, checkout: Path) -> dict[str, str]:
    """The service variant's settings, with its own BentoML home holding its graph.

    A home per service: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it
    starts, which would wipe the metrics of every other service sharing that home. A free gRPC port
    per service, likewise: two at once would both ask for 8001, and the second would not start.
    """
    home = workdir / f"bentoml-{target}-{subject.key}"
    graph = subject.int8 if target == "service-int8" else subject.onnx
    if checkout != REPO and graph.is_relative_to(REPO):  # the checkout's own graph: a change may have remade it
        graph = checkout / graph.relative_to(REPO)
    register = [sys.executable, "-m", "model_store", "register", str(graph), "--name", f"bench-{subject.key}"]
    subprocess.run(
        register, cwd=checkout, env={**os.environ, "BENTOML_HOME": str(home)}, check=True, capture_output=True
    )
    variant = {
        "service-2w": {"SERVING_WORKERS": "2"},
        "service-nolog": {"SERVING_LOG_REQUESTS": "false"},
        "service-traced": {"SERVING_TRACING": "true"},
    }
    env = {"SERVING_MODELS": f"bench-{subject.key}:latest", "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    env["SERVING_GRPC_PORT"] = str(free_port())
    return {**env, **variant.get(target, {})}


def _version(package: str) -> str:
    """Its installed version; a peer left out of this run may not be installed (the bench extra)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def _litserve_batches(stats: Path) -> tuple[float, float]:
    import json

    time.sleep(1.1)  # the worker writes its counts once a second
    counts = json.loads(stats.read_text()) if stats.exists() else {"batches": 0, "images": 0}
    return counts["batches"], counts["images"]


def measure(
    subject: Subject, levels: list[int], targets: list[str], args: argparse.Namespace, workdir: Path
) -> list[dict]:
    wanted = [t for t in targets if t != "service-int8" or subject.int8 is not None]
    rows: dict[tuple[int, str], list[dict]] = {}
    with contextlib.ExitStack() as stack:
        running = {t: stack.enter_context(start(t, subject, workdir, args.before)) for t in wanted}
        for target, server in running.items():  # warm every server up, and prove it answers
            run_wrk(server.url, subject.bodies, 4, 2, server.pid)
        for concurrency in levels:
            here = [
                t
                for t in wanted
                if concurrency == EXTRA_AT or t not in ("service-2w", "service-nolog", "service-traced")
            ]
            for round_ in range(args.rounds):
                for target in here:
                    server = running[target]
                    before = server.batches() if server.batches else None
                    result = run_wrk(server.url, subject.bodies, concurrency, args.seconds, server.pid)
                    if before is not None:
                        after = server.batches()
                        batches = after[0] - before[0]
                        result["mean_batch"] = (after[1] - before[1]) / batches if batches else float("nan")
                    else:
                        result["mean_batch"] = 1.0  # one image per model call, by construction
                    rows.setdefault((concurrency, target), []).append(result)
                    print(f"{subject.key} c={concurrency} {target} round {round_ + 1}: {cells(result)}", flush=True)
    return [{**median_of(results), "target": target, "subject": subject.key} for (c, target), results in rows.items()]


def median_of(results: list[dict]) -> dict:
    counted = ("concurrency", "errors", "requests")
    merged = {key: statistics.median(r[key] for r in results) for key in results[0] if key not in counted}
    totals = {"errors": sum(r["errors"] for r in results), "requests": sum(r["requests"] for r in results)}
    return {**merged, **totals, "concurrency": results[0]["concurrency"]}


HEADER = (
    "| c | target | req/s | p50 ms | p99 ms | server CPU ms/req | server cores | mean batch | errors | client cores |"
)


def cells(r: dict) -> str:
    rate = f"{r['rps']:,.0f}" if r["rps"] >= 100 else f"{r['rps']:.1f}"
    return (
        f"{rate} | {r['p50']:.2f} | {r['p99']:.2f} | {r['server_cpu_ms']:.3f} | {r['server_cores']:.2f} | "
        f"{r['mean_batch']:.1f} | {r['errors']} | {r['client_cores']:.2f}"
    )


def goals(rows: list[dict]) -> list[str]:
    """Each goal of the serving issue, met or missed, with its figure."""
    at = {(r["subject"], r["concurrency"], r["target"]): r for r in rows}
    lines = ["| goal | figure | |", "|---|---|---|"]

    def check(goal: str, keys: list[tuple], figure: Callable[..., tuple[str, bool]]) -> None:
        if all(k in at for k in keys):
            text, met = figure(*(at[k] for k in keys))
            lines.append(f"| {goal} | {text} | {'met' if met else '**missed**'} |")
        else:
            lines.append(f"| {goal} | not measured in this run | |")

    def best_litserve(subject: str, c: int) -> tuple:
        options = [k for k in ((subject, c, "litserve-1ms"), (subject, c, "litserve-5ms")) if k in at]
        return max(options, key=lambda k: at[k]["rps"]) if options else (subject, c, "litserve")

    def faster(goal: str, ours: tuple, theirs: tuple, at_least: float, form: str = "{:.2f}x") -> None:
        """A throughput goal: ``ours`` serves at least ``at_least`` times what ``theirs`` does."""
        check(goal, [ours, theirs], lambda a, b: (form.format(a["rps"] / b["rps"]), a["rps"] / b["rps"] >= at_least))

    faster("LeNet c=32: >= 3x the hand-written server", ("lenet", 32, "service"), ("lenet", 32, "fastapi"), 3)
    faster("LeNet c=32: >= 2.5x LitServe (its best timeout)", ("lenet", 32, "service"), best_litserve("lenet", 32), 2.5)
    faster("LeNet c=32: >= 90% of the bare floor", ("lenet", 32, "service"), ("lenet", 32, "floor"), 0.9, "{:.0%}")
    check("LeNet c=32: p99 <= 40 ms", [("lenet", 32, "service")], lambda s: (f"{s['p99']:.1f} ms", s["p99"] <= 40))
    check(
        "LeNet c=32: <= 0.6 ms server CPU per request",
        [("lenet", 32, "service")],
        lambda s: (f"{s['server_cpu_ms']:.3f} ms", s["server_cpu_ms"] <= 0.6),
    )
    check(
        "LeNet c=1: p50 <= the hand-written server's",
        [("lenet", 1, "service"), ("lenet", 1, "fastapi")],
        lambda s, f: (f"{s['p50']:.2f} vs {f['p50']:.2f} ms", s["p50"] <= f["p50"]),
    )
    check("LeNet c=1: p99 <= 5 ms", [("lenet", 1, "service")], lambda s: (f"{s['p99']:.2f} ms", s["p99"] <= 5))
    check(
        "LeNet c=128: p99 <= 4x the c=32 p99, no errors",
        [("lenet", 128, "service"), ("lenet", 32, "service")],
        lambda a, b: (
            f"{a['p99']:.1f} ms = {a['p99'] / b['p99']:.1f}x; {a['errors']} errors",
            a["p99"] <= 4 * b["p99"] and a["errors"] == 0,
        ),
    )
    faster("ResNet-18 c=32: >= 2x the hand-written server", ("resnet18", 32, "service"), ("resnet18", 32, "fastapi"), 2)
    faster(
        "ResNet-18 c=32: int8 >= 2.5x LitServe on fp32",
        ("resnet18", 32, "service-int8"),
        best_litserve("resnet18", 32),
        2.5,
    )
    return lines


def report(rows: list[dict], subjects: list[Subject], args: argparse.Namespace) -> str:
    packages = ", ".join(
        f"{p} {_version(p)}" for p in ("onnxruntime", "bentoml", "litserve", "fastapi", "uvicorn", "torch")
    )
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
    lines = [
        f"Device: {device()}, shared by the servers and the client. Date: {time.strftime('%Y-%m-%d')}. "
        f"Command: `python -m benchmarks.serving_compare {shlex.join(sys.argv[1:])}`. Client: {wrk}, closed loop, multipart forms "
        f"(benchmarks/multipart.lua). {packages}. Each figure is the median of {args.rounds} runs of "
        f"{args.seconds:g} s; the targets take turns. Server CPU: user + system time of the target's whole "
        "process tree (/proc), per answered request. Mean batch: images per model call.",
        "",
        "Targets: "
        + "; ".join(f"**{t}**: {DESCRIPTIONS[t]}" for t in TARGETS if any(r["target"] == t for r in rows))
        + ".",
        "",
        "**Goals**",
        "",
        *goals(rows),
    ]
    for subject in subjects:
        mine = sorted(
            (r for r in rows if r["subject"] == subject.key),
            key=lambda r: (r["concurrency"], TARGETS.index(r["target"])),
        )
        lines += ["", f"**{subject.title}.**", "", HEADER, "|---:|---|" + "---:|" * 8]
        lines += [f"| {r['concurrency']} | {r['target']} | {cells(r)} |" for r in mine]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    subjects_wanted = args.subjects or (["lenet", "resnet18"] if args.resnet18_checkpoint else ["lenet"])
    if "resnet18" in subjects_wanted and args.resnet18_checkpoint is None:
        raise SystemExit(
            "error: resnet18 needs --resnet18-checkpoint (a trained 3x224x224 ResNet-18: the int8 export verifies against it)"
        )
    if args.before is not None:
        if not (args.before / "serving" / "service.py").is_file():
            raise SystemExit(f"error: --before {args.before} is not a checkout of this project (no serving/service.py)")
        args.targets = [*args.targets, "service-before"] if "service-before" not in args.targets else args.targets
    elif "service-before" in args.targets:
        raise SystemExit("error: the target service-before needs --before CHECKOUT")
    if args.seconds <= 0 or args.rounds < 1 or args.images < 1:
        raise SystemExit("error: --seconds, --rounds and --images must be positive")
    prepare = {"lenet": prepare_lenet, "resnet18": prepare_resnet18}
    with tempfile.TemporaryDirectory(prefix="serving-compare-") as tmp:
        workdir = Path(tmp)
        subjects = [prepare[key](workdir, args) for key in subjects_wanted]
        rows = [
            row for s in subjects for row in measure(s, args.concurrency or LEVELS[s.key], args.targets, args, workdir)
        ]
    text = report(rows, subjects, args)
    print(text)
    if args.write:
        heading = SECTION if args.section == "serving" else f"## HTTP serving: {args.section}"
        write_section(args.write, args.section, text, heading)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
