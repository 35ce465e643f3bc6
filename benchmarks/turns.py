"""Ways of asking one service, loaded in turn: one `bentoml serve` of the shipped models, wrk with
each way (a path and its bodies) at each level in each round, so that drift on a shared machine
hits them alike, and the table of the median rounds. ``benchmarks.protocol_compare`` and
``benchmarks.explain_speed`` are two sets of ways."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from benchmarks.load import run_wrk
from benchmarks.report import device
from benchmarks.servers import REPO, free_port, process
from model_store.store import SHIPPED_MODELS


class Server(NamedTuple):
    """A server besides the service: its command (without --port, which is added), environment,
    readiness path, and the checkout it runs from."""

    command: list[str]
    env: dict[str, str]
    ready: str
    cwd: Path = REPO


def service(home: Path, models: dict[str, Path], checkout: Path = REPO, shipped: bool = True) -> Server:
    """`bentoml serve` run from ``checkout``, with request logs off and a BentoML home of its own (a
    service empties its home's Prometheus directory when it starts), serving ``models`` (name: ONNX
    file), beside the shipped models when ``shipped``. Its gRPC port is a free one: two services at
    once would both ask for 8001, and the second would not start."""
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SERVING_LOG_REQUESTS": "false"}
    env["SERVING_GRPC_PORT"] = str(free_port())

    def model_store(*command: str) -> None:
        run = [sys.executable, "-m", "model_store", *command]
        subprocess.run(run, cwd=checkout, env={**os.environ, **env}, check=True, capture_output=True)

    if shipped:
        model_store("register-default")
    for name, graph in models.items():
        model_store("register", str(graph), "--name", name)
    if models:
        env["SERVING_MODELS"] = ",".join(f"{name}:latest" for name in [*(SHIPPED_MODELS if shipped else ()), *models])
    return Server([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1"], env, "/readyz", checkout)


def get_args_parser(description: str, levels: tuple[int, ...] = (1, 32), images: int = 256) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    shown = " ".join(map(str, levels))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(levels), help=f"levels (default: {shown})")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default: 3)")
    parser.add_argument("--images", type=int, default=images, help=f"distinct test images (default: {images})")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    return parser


def load_in_turn(
    workdir: Path,
    ways: dict[str, tuple],
    args: argparse.Namespace,
    more_models: dict[str, Path] | None = None,
    more_servers: dict[str, Server] | None = None,
) -> dict:
    """One `bentoml serve` of the shipped models (and ``more_models``, name: ONNX file), and
    ``more_servers`` (name: :class:`Server`), loaded by wrk with each way (its
    path, its bodies, and the server it asks when not the service) in turn, at each of
    ``args.concurrency`` in each of ``args.rounds`` rounds: {(way, concurrency): [wrk result per
    round]}. A failed request stops it."""
    servers = {"service": service(workdir / "bentoml", more_models or {}), **(more_servers or {})}
    runs: dict[tuple[str, int], list[dict]] = {}
    with contextlib.ExitStack() as stack:
        running = {}  # name: (base URL, pid)
        for name, server in servers.items():
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = [*server.command, "--port", str(port)]
            running[name] = (
                base,
                stack.enter_context(process(name, command, server.env, base + server.ready, workdir, server.cwd)),
            )
        targets = {
            way: (running[spec[2] if len(spec) > 2 else "service"], spec[0], spec[1]) for way, spec in ways.items()
        }
        for (base, pid), path, bodies in targets.values():  # warm: each way's first requests
            run_wrk(base + path, bodies, 4, 1, pid)
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for way, ((base, pid), path, bodies) in targets.items():
                    result = run_wrk(base + path, bodies, concurrency, args.seconds, pid)
                    if result["errors"]:
                        raise SystemExit(f"error: {way} at c={concurrency}: {result['errors']} failed requests")
                    runs.setdefault((way, concurrency), []).append(result)
                    print(json.dumps({"way": way, "round": round_, **result}), flush=True)
    return runs


def ways_table(
    runs: dict, args, script: str, about: str, ways, baseline: str, baseline_label: str, options: str = ""
) -> str:
    """The section: device, date and command (``options``: the script's own), ``about``, and per
    level and way the median round by requests/s, with its requests/s over ``baseline``'s median."""
    lines = [
        f"Device: {device()}. Date: {datetime.date.today()}. Command: `python -m benchmarks.{script} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --seconds {args.seconds:g} --rounds {args.rounds}"
        f"{' ' + options if options else ''}`.",
        about,
        "",
        f"| way | concurrency | req/s | vs {baseline_label} | p50 ms | p99 ms | server CPU ms/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency in args.concurrency:
        base = statistics.median(r["rps"] for r in runs[(baseline, concurrency)])
        for way in ways:
            results = sorted(runs[(way, concurrency)], key=lambda r: r["rps"])
            r = results[len(results) // 2]
            p50, p99 = (f"{r[p]:.2f}" if r[p] == r[p] else "n/a" for p in ("p50", "p99"))  # NaN: not measured
            lines.append(
                f"| {way} | {concurrency} | {r['rps']:,.0f} | {r['rps'] / base:.2f}x | {p50} | {p99} | "
                f"{r['server_cpu_ms']:.3f} |"
            )
    return "\n".join(lines) + "\n"
