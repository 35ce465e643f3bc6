"""Where a served request's CPU goes: per-thread CPU from /proc and a py-spy profile, under wrk load.

    python -m benchmarks.profile_serving                          # the shipped model, c=32, 15 s
    python -m benchmarks.profile_serving --env SERVING_TRACING=true --concurrency 1
    python -m benchmarks.profile_serving --photos --concurrency 1  # 12 MP JPEGs, not test PNGs
    python -m benchmarks.profile_serving --grpc                   # gRPC ModelInfer, raw pixels, by h2load
    python -m benchmarks.profile_serving --grpc grpc-stream       # ModelStreamInfer: 100 messages a stream

Starts ``bentoml serve`` (one worker, a private BentoML home), loads it with wrk like
benchmarks/serving_compare.py, and meanwhile samples the worker with py-spy. Prints the worker's
CPU per request by thread, then the share of the event-loop thread's samples by package
(inclusive: a frame counts for every package on its stack) and its hottest functions (self time).
py-spy samples without stopping the process (--nonblocking): stopping it biases the samples toward
system calls. Needs wrk and py-spy (the bench extra).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.grpc_load import grpc_bodies, method, run_h2load
from benchmarks.images import fashion_photos, fashion_pngs
from benchmarks.load import TICKS, run_wrk, write_bodies
from benchmarks.servers import free_port, process

REPO = Path(__file__).resolve().parents[1]
PY_SPY = (
    str(Path(sys.executable).with_name("py-spy")) if Path(sys.executable).with_name("py-spy").exists() else "py-spy"
)
# Path fragments that name where a frame's code lives; the process's own entry points (uvicorn's
# Server.run, BentoML's worker main, asyncio's runner) are left out, being on every stack.
PACKAGES = (
    "serving/",
    "model_store/",
    "_bentoml_impl/server/",
    "_bentoml_sdk/",
    "bentoml/_internal/",
    "opentelemetry/",
    "starlette/",
    "uvicorn/protocols/",
    "uvicorn/middleware/",
    "python_multipart/",
    "PIL/",
    "numpy/",
    "onnxruntime/",
    "prometheus_client/",
    "logging/",
    "json/",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections (default: 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load and sampling time (default: 15)")
    parser.add_argument("--env", nargs="*", default=[], help="SERVING_*=value settings for the service")
    parser.add_argument("--top", type=int, default=15, help="functions to list (default: 15)")
    parser.add_argument("--photos", action="store_true", help="send 16 12 MP JPEGs (phone photos), not test PNGs")
    parser.add_argument(
        "--grpc",
        nargs="?",
        const="grpc-pixels",
        choices=("grpc-pixels", "grpc-stream"),
        help="call gRPC with raw pixels (h2load), as grpc_compare's way of that name does (default grpc-pixels)",
    )
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only time the Prometheus updates one request makes, as the service makes them",
    )
    return parser


def metrics_cost(batch: float = 16.0, repeat: int = 20_000) -> str:
    """Time the metric updates of one /classify request in a multiprocess registry, as under
    `bentoml serve`: the edge's (in flight, count, latency), the decode's, and the batcher's share
    of its batch (queue wait per image; size and inference time per batch of ``batch``)."""
    import timeit

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-cost-")
    from serving import metrics

    route, model = "/classify", "fashion-lenet"
    size, queue, inference = (
        h.labels(model=model) for h in (metrics.batch_size, metrics.queue_seconds, metrics.inference_seconds)
    )

    def per_request() -> None:
        metrics.in_flight.inc()
        metrics.decode_seconds.observe(0.0001)
        queue.observe(0.001)
        metrics.requests.labels(route=route, status="200").inc()
        metrics.request_seconds.labels(route=route).observe(0.002)
        metrics.in_flight.dec()

    def per_batch() -> None:
        size.observe(batch)
        inference.observe(0.0005)

    seconds = (
        timeit.timeit(per_request, number=repeat) / repeat + timeit.timeit(per_batch, number=repeat) / repeat / batch
    )
    return f"Prometheus updates per /classify request (multiprocess mode, batches of {batch:g}): {seconds * 1e6:.1f} us"


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks so far of each thread of ``pid``, by 'name (tid)'."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[f"{name} ({task.name})"] = int(fields[11]) + int(fields[12])
    return ticks


def summarize(raw: Path, thread: str, top: int) -> list[str]:
    """Package shares and hottest functions of one thread's samples in py-spy's raw output."""
    total, packages, functions = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or thread not in frames[0] or len(frames) < 2:
            continue
        n = int(count)
        total += n
        files = [m.group(1) for f in frames[1:] if (m := re.search(r"\(([^()]*):\d+\)$", f))]
        packages.update({p: n for p in PACKAGES if any(p in f for f in files)})
        functions[re.sub(r":\d+\)$", ")", frames[-1])] += n
    if not total:
        return [f"no samples of {thread}"]
    lines = [f"{thread}: {total} samples; by package (inclusive):"]
    lines += [f"  {n / total:6.1%}  {p}" for p, n in packages.most_common()]
    lines += ["hottest functions (self):"] + [f"  {n / total:6.1%}  {f}" for f, n in functions.most_common(top)]
    return lines


def main(args: argparse.Namespace) -> None:
    if args.metrics_cost:
        return print(metrics_cost())
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="profile-serving-") as tmp:
        workdir = Path(tmp)
        home = {**os.environ, "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
        subprocess.run(
            [sys.executable, "-m", "model_store", "register-default"],
            cwd=REPO,
            env=home,
            check=True,
            capture_output=True,
        )
        images, image_type = (fashion_photos(16), "image/jpeg") if args.photos else (fashion_pngs(256), "image/png")
        bodies = write_bodies(workdir / "bodies", images, image_type)
        command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", "3917"]
        grpc_port = free_port()
        with process(
            "service",
            command,
            {**home, **env, "SERVING_GRPC_PORT": str(grpc_port)},
            "http://127.0.0.1:3917/readyz",
            workdir,
        ) as pid:
            url = "http://127.0.0.1:3917/classify"
            if args.grpc:  # the same closed loop, of gRPC calls; each is checked answered OK by the server's count
                call = grpc_bodies(workdir)[args.grpc]

                def load(concurrency: int, seconds: float) -> dict:
                    target, base, log = f"http://127.0.0.1:{grpc_port}", "http://127.0.0.1:3917", workdir / "h2load.log"
                    return run_h2load(target, call, concurrency, seconds, pid, base, log, method(args.grpc))

            else:

                def load(concurrency: int, seconds: float) -> dict:
                    return run_wrk(url, bodies, concurrency, seconds, pid)

            load(4, 2)  # warm-up
            worker = int(
                subprocess.run(
                    ["pgrep", "-P", str(pid), "-f", "_bentoml_impl.worker"], capture_output=True, text=True
                ).stdout.split()[0]
            )
            raw = workdir / "profile.txt"
            spy = subprocess.Popen(
                [
                    PY_SPY,
                    "record",
                    "--pid",
                    str(worker),
                    "--threads",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--duration",
                    str(int(args.seconds)),
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            before = thread_ticks(worker)
            result = load(args.concurrency, args.seconds)
            after = thread_ticks(worker)
            spy.wait(timeout=60)
            time.sleep(0.5)
        profile = summarize(raw, "MainThread", args.top) if raw.exists() else ["py-spy wrote no profile"]
    print(
        f"c={args.concurrency}: {result['rps']:,.0f} req/s, p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms, "
        f"server CPU {result['server_cpu_ms']:.3f} ms/request (whole tree)"
    )
    print("worker CPU per request, by thread:")
    used = {t: (after[t] - before.get(t, 0)) / TICKS * 1000 / result["requests"] for t in after}
    for name, ms in sorted(used.items(), key=lambda item: -item[1]):
        if ms >= 0.005:
            print(f"  {ms:.3f} ms  {name}")
    print("\n".join(profile))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
