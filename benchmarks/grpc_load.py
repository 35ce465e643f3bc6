"""gRPC load for the benchmarks: one framed ``ModelInfer`` message per way, sent over and over by
h2load (nghttp2's C load generator: a gRPC call is an HTTP/2 POST of a 5-byte prefixed message, with
``te: trailers``), and checked against the server's own count of calls answered, since h2load counts
HTTP statuses and a failed gRPC call is HTTP 200 with a grpc-status trailer. Shared by
``benchmarks.grpc_compare`` and ``benchmarks.profile_serving --grpc``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np

from benchmarks.images import fashion_images, fashion_pngs
from benchmarks.load import figures, measured
from serving.protocol import grpc_service_pb2 as pb
from serving.v2 import serialize_bytes

SERVICE = "/inference.GRPCInferenceService"
MODEL = "fashion-lenet"
STREAM_MESSAGES = 100  # the ModelStreamInfer way's messages a stream, all written at once


def grpc_bodies(workdir: Path) -> dict[str, Path]:
    """One framed ModelInfer message per gRPC way: a 0 byte (not compressed), its length, the
    message; grpc-stream: grpc-pixels' :data:`STREAM_MESSAGES` times over, one ModelStreamInfer stream."""
    image, png = fashion_images(1)[0], fashion_pngs(1)[0]
    pixels = pb.ModelInferRequest(model_name=MODEL)
    pixels.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, *image.shape])
    pixels.raw_input_contents.append(np.ascontiguousarray(image).tobytes())
    encoded = pb.ModelInferRequest(model_name=MODEL)
    encoded.inputs.add(name="image", datatype="BYTES", shape=[1])
    encoded.raw_input_contents.append(serialize_bytes([png]))
    bodies = {}
    for way, message in (("grpc-pixels", pixels), ("grpc-png", encoded)):
        data = message.SerializeToString()
        bodies[way] = workdir / f"{way}.bin"
        bodies[way].write_bytes(b"\x00" + len(data).to_bytes(4, "big") + data)
    bodies["grpc-stream"] = workdir / "grpc-stream.bin"
    bodies["grpc-stream"].write_bytes(bodies["grpc-pixels"].read_bytes() * STREAM_MESSAGES)
    return bodies


def method(way: str) -> str:
    """The RPC a gRPC way's bodies are sent to."""
    return "ModelStreamInfer" if way == "grpc-stream" else "ModelInfer"


def grpc_answers(base: str, rpc: str) -> dict[str, float]:
    """The server's count of ``rpc``'s calls (a stream's messages) by status code."""
    counts = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("classify_requests_total{") and f'route="grpc:{rpc}"' in line:
            counts[line.split('status="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def run_h2load(
    target: str, body: Path, concurrency: int, seconds: float, pid: int, base: str | None, log: Path, rpc="ModelInfer"
) -> dict:
    """One closed-loop h2load run of gRPC calls: :func:`benchmarks.load.figures`' row. ``base``: the
    service's URL, whose count of calls answered is checked (None: the floor, which answers all).
    ``rpc`` ModelStreamInfer: each call a stream of :data:`STREAM_MESSAGES`, the row's requests its
    messages; h2load times streams, not messages, so its latencies are none (NaN)."""
    if shutil.which("h2load") is None:
        raise SystemExit("error: h2load is not installed; run 'apt-get install nghttp2-client'")
    command = [
        "h2load", f"-c{concurrency}", "-m1", f"-t{min(concurrency, 2)}", f"-D{seconds:g}",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", str(body), "--log-file", str(log), f"{target}{SERVICE}/{rpc}",
    ]  # fmt: skip
    messages = STREAM_MESSAGES if rpc == "ModelStreamInfer" else 1
    log.unlink(missing_ok=True)  # h2load appends to it
    before = grpc_answers(base, rpc) if base else {}
    with measured(pid) as cost:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"h2load failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    durations = np.array([int(row[2]) for row in rows if row[1] == "200"]) / 1000.0
    done, errors = len(durations), sum(row[1] != "200" for row in rows)
    done, errors = done * messages, errors * messages
    after = grpc_answers(base, rpc) if base else {"OK": done}
    answered = {code: count - before.get(code, 0) for code, count in after.items()}
    # h2load logs no call still in flight when its time is up, and closes its connections on them:
    # the server may have answered those, or counted them CANCELLED, at most one call (or stream) a connection
    failed = {code: count for code, count in answered.items() if code not in ("OK", "CANCELLED") and count}
    if failed or answered.get("OK", 0) < done or answered.get("CANCELLED", 0) > concurrency * messages:
        raise SystemExit(f"error: h2load finished {done} calls; the server answered {answered}")
    if messages > 1:
        latencies = (float("nan"),) * 3
    else:
        latencies = (float(np.percentile(durations, 50)), float(np.percentile(durations, 99)), float(durations.max()))
    return figures(concurrency, done, errors, cost.seconds, latencies, cost)
