"""A closed-loop HTTP load client in Python, for machines without wrk (the GPU machines have none).

    python -m benchmarks.closed_loop --url http://127.0.0.1:3000/classify --bodies DIR --count 256 \\
        --content-type 'multipart/form-data; boundary=...' --concurrency 16 --seconds 10

Each connection sends its next request when its last is answered, over raw asyncio streams with
keep-alive: an HTTP client library would cost more CPU per request than the servers it measures.
The bodies are the files ``benchmarks.load.write_bodies`` writes, sent in turn. One process prints one JSON
line: requests answered 2xx, errors (other statuses, broken connections, timeouts), its seconds and
every latency in ms. ``benchmarks.load.run_closed_loop`` starts several processes and sums them
into the dict ``benchmarks.load.run_wrk`` returns, so either client fills the same row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.load import CLIENT_TIMEOUT_S


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 answer (Content-Length or chunked body): its status, and whether the server closes."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
    if headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # no trailers: the empty line after the last chunk
    else:
        await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers.get("connection") == "close"


async def connection(url: str, bodies: list[bytes], heads: list[bytes], deadline: float, offset: int, out: dict):
    parts = urlsplit(url)
    reader = writer = None
    sent = offset
    while time.perf_counter() < deadline:
        index = sent % len(bodies)
        sent += 1
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.write(heads[index] + bodies[index])
            status, closing = await asyncio.wait_for(read_answer(reader), CLIENT_TIMEOUT_S)
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            out["errors"] += 1
            if writer is not None:
                writer.close()
            writer = None
            continue
        out["latencies"].append((time.perf_counter() - start) * 1000)
        if closing:  # answered, then closed by the server: reconnect for the next
            writer.close()
            writer = None
        out["ok" if 200 <= status < 300 else "errors"] += 1
    if writer is not None:
        writer.close()


async def load(args: argparse.Namespace) -> dict:
    bodies = [(args.bodies / str(i)).read_bytes() for i in range(args.count)]
    parts = urlsplit(args.url)
    extra = "".join(f"{h}\r\n" for h in args.header)
    heads = [
        (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {args.content_type}\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for body in bodies
    ]
    out = {"ok": 0, "errors": 0, "latencies": []}
    start = time.perf_counter()
    deadline = start + args.seconds
    await asyncio.gather(
        *(connection(args.url, bodies, heads, deadline, args.offset + c, out) for c in range(args.concurrency))
    )
    return {**out, "seconds": time.perf_counter() - start}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the endpoint, http://HOST:PORT/PATH")
    parser.add_argument("--bodies", type=Path, required=True, help="folder of bodies named 0, 1, ...")
    parser.add_argument("--count", type=int, required=True, help="bodies in the folder")
    parser.add_argument("--content-type", required=True, help="Content-Type of every body")
    parser.add_argument("--header", action="append", default=[], help="another 'Name: value' header (default: none)")
    parser.add_argument("--concurrency", type=int, default=1, help="connections (default: 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration (default: 10)")
    parser.add_argument("--offset", type=int, default=0, help="first body of the first connection (default: 0)")
    return parser


if __name__ == "__main__":
    print(json.dumps(asyncio.run(load(get_args_parser().parse_args()))))
