"""The Open Inference Protocol over gRPC against HTTP v2 and /classify: one `bentoml serve` of the
shipped LeNet, loaded in turn with each way of asking it the same question.

    python -m benchmarks.grpc_compare                          # c=1 and 32, 10 s, 3 rounds
    python -m benchmarks.grpc_compare --write BENCHMARKS.md

Ways (real Fashion-MNIST test images, one per request):

- classify, v2-pixels, v2-png, v2-json: as ``benchmarks.protocol_compare`` sends them, by wrk;
- grpc-pixels: ``ModelInfer`` with UINT8 [1, 1, 28, 28] in ``raw_input_contents`` (tritonclient.grpc's
  encoding), by h2load (nghttp2's C load generator: a gRPC call is an HTTP/2 POST of a 5-byte
  prefixed message, with ``te: trailers``);
- grpc-png: the PNG as a BYTES tensor in ``raw_input_contents``, decoded by the server;
- grpc-stream: ``ModelStreamInfer``, grpc-pixels' message 100 times in each stream, all written at
  once (tritonclient's ``async_stream_infer`` in a loop), served one at a time
  (SERVING_GRPC_STREAM_WINDOW=1; 64 by default): at concurrency c, c streams have c messages in
  flight, as c clients of every other way have c requests. Its requests are messages; its
  latencies are not measured (h2load times a stream, not its messages);
- grpc-floor: grpc-pixels' calls to ``benchmarks.grpc_floor``, a bare grpc.aio server that parses
  each and answers a fixed reply: what the Python gRPC server costs before any work of ours.

h2load sends one body over and over, so each gRPC way asks about one image where wrk cycles through
``--images``; the LeNet's work does not depend on which. h2load counts HTTP statuses, and a failed
gRPC call is HTTP 200 with a grpc-status trailer: the server's own count of calls answered OK
(``classify_requests_total{route="grpc:ModelInfer"}`` by status) must grow by every call h2load
finished, and by no call answered otherwise, or the run stops. wrk and h2load share the 2 cores with the server alike (C clients of at
most 2 threads); server CPU per request is read from /proc for the server's process tree.
Triton's own server cannot run here (no container registry, no GPU): the same comparison against
it is not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.grpc_load import MODEL, STREAM_MESSAGES, grpc_bodies, method, run_h2load
from benchmarks.load import run_wrk
from benchmarks.report import write_section
from benchmarks.servers import free_port, process, start, stop
from benchmarks.turns import get_args_parser, service, ways_table
from benchmarks.v2_bodies import write_ways

SECTION = "## The v2 protocol over gRPC against HTTP v2 and /classify"
HTTP_WAYS = ("classify", "v2-pixels", "v2-png", "v2-json")
GRPC_WAYS = ("grpc-pixels", "grpc-png", "grpc-stream")
FLOOR = "grpc-floor"  # benchmarks.grpc_floor, sent grpc-pixels' calls
WAYS = (*HTTP_WAYS, *GRPC_WAYS, FLOOR)


@contextlib.contextmanager
def grpc_floor(port: int, workdir: Path):
    """``benchmarks.grpc_floor`` on ``port``; yields its pid once the port takes connections."""
    child = start([sys.executable, "-m", "benchmarks.grpc_floor", str(port)], {}, workdir / "grpc-floor.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the gRPC floor did not start:\n{(workdir / 'grpc-floor.log').read_text()}")
            time.sleep(0.2)
        yield child.pid
    finally:
        stop(child)


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="grpc-compare-") as folder, contextlib.ExitStack() as stack:
        workdir = Path(folder)
        http_bodies, grpc_files = write_ways(workdir, args.images), grpc_bodies(workdir)
        server = service(workdir / "bentoml", {})
        port, grpc_port = free_port(), free_port()
        base, target = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{grpc_port}"
        # a stream serves one message at a time, so that grpc-stream at concurrency c has c requests
        # in flight, as every other way has
        env = {**server.env, "SERVING_GRPC_PORT": str(grpc_port), "SERVING_GRPC_STREAM_WINDOW": "1"}
        pid = stack.enter_context(
            process("service", [*server.command, "--port", str(port)], env, base + server.ready, workdir, server.cwd)
        )
        paths = {way: "/classify" if way == "classify" else f"/v2/models/{MODEL}/infer" for way in HTTP_WAYS}
        floor_port = free_port()
        floor = stack.enter_context(grpc_floor(floor_port, workdir))

        def run(way: str, concurrency: int, seconds: float) -> dict:
            if way == FLOOR:
                floor_target, log = f"http://127.0.0.1:{floor_port}", workdir / "h2load.log"
                return run_h2load(floor_target, grpc_files["grpc-pixels"], concurrency, seconds, floor, None, log)
            if way in GRPC_WAYS:
                log = workdir / "h2load.log"
                return run_h2load(target, grpc_files[way], concurrency, seconds, pid, base, log, method(way))
            return run_wrk(base + paths[way], http_bodies[way], concurrency, seconds, pid)

        for way in WAYS:  # warm: each way's first requests
            run(way, 4, 1)
        runs: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for way in WAYS:
                    result = run(way, concurrency, args.seconds)
                    if result["errors"]:
                        raise SystemExit(f"error: {way} at c={concurrency}: {result['errors']} failed requests")
                    runs.setdefault((way, concurrency), []).append(result)
                    print(json.dumps({"way": way, "round": round_, **result}), flush=True)
    text = report(runs, args)
    print(f"{SECTION}\n\n{text}")
    if args.write:
        write_section(args.write, "grpc-compare", text, SECTION)


def report(runs: dict, args: argparse.Namespace) -> str:
    about = (
        "One `bentoml serve` of the shipped models (SERVING_LOG_REQUESTS=false), the default LeNet asked, one "
        "image per request; HTTP ways by wrk, gRPC ways by h2load, both C clients in a closed loop; each way in "
        "turn at each level in each round, the median round by requests/s shown. Ratios are to /classify in the "
        "same round set."
    )
    table = ways_table(runs, args, "grpc_compare", about, WAYS, "classify", "/classify")
    cpu = {
        way: statistics.median(r["server_cpu_ms"] for r in runs[(way, max(args.concurrency))])
        for way in ("classify", "grpc-pixels", "grpc-stream", FLOOR)
    }
    return table + (
        f"\nAt concurrency {max(args.concurrency)}, gRPC raw pixels cost the server {cpu['grpc-pixels']:.3f} ms of "
        f"CPU a request against /classify's {cpu['classify']:.3f} (medians of the rounds), and a ModelStreamInfer "
        f"message {cpu['grpc-stream']:.3f} (as many streams, {STREAM_MESSAGES} messages each, served one at a "
        f"time); a bare grpc.aio server "
        f"that parses the call and answers a fixed reply ({FLOOR}, `benchmarks/grpc_floor.py`, its own process) "
        f"{cpu[FLOOR]:.3f}. grpc-stream's latencies are not measured: h2load times a stream, not its messages.\n"
    )


if __name__ == "__main__":
    sys.exit(main(get_args_parser(__doc__.splitlines()[0]).parse_args()))
