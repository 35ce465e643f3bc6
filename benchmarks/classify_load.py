"""Load generator for POST /classify: throughput and latency percentiles at several concurrencies.

    python benchmarks/classify_load.py --url http://127.0.0.1:3000 --concurrency 1 8 32 --seconds 15

Each concurrency level runs that many asyncio clients in a closed loop for a bounded time, posting
real Fashion-MNIST test images as PNG. Requests that fail are counted, never silently dropped.
``run_level`` is also the HTTP client of ``benchmarks/serving_compare.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import platform
import time

import httpx
import numpy as np
from PIL import Image

LEVEL_HEADER = "requests | errors | req/s | p50 ms | p95 ms | p99 ms"  # the cells of level_cells()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default="http://127.0.0.1:3000", help="service base URL (default: http://127.0.0.1:3000)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels (default: 1 8 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each level (default: 15)")
    parser.add_argument("--images", type=int, default=256, help="distinct test images to cycle through (default: 256)")
    return parser


def test_pngs(count: int) -> list[bytes]:
    """The first ``count`` Fashion-MNIST test images, PNG-encoded."""
    from training.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    encoded = []
    for array in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


async def run_level(
    url: str,
    images: list[bytes],
    concurrency: int,
    seconds: float,
    content_type: str = "image/png",
    fields: dict[str, str] | None = None,
    timeout: float = 120,
) -> dict:
    """``concurrency`` clients posting ``images`` in turn (with the extra form ``fields``) for ``seconds``.

    Requests still in flight at the deadline are waited for and counted. Anything but a 200, a
    transport error or a client timeout included, counts as an error. The timeout is long so that
    a slow server shows up as latency rather than as the client giving up. "client_cpu" is the CPU
    this process used meanwhile, in cores: on a small machine the client competes with the server.
    """
    latencies: list[float] = []
    errors = 0
    filename = "x." + content_type.split("/")[-1]

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < deadline:
            image = images[i % len(images)]
            i += concurrency
            start = time.perf_counter()
            try:
                response = await client.post("/classify", files={"image": (filename, image, content_type)}, data=fields)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with contextlib.AsyncExitStack() as stack:
        # A client (so a connection pool) per worker: one pool shared by many connections costs httpx
        # CPU that grows with their number (encode/httpx#3215); on 2 cores at concurrency 128 it cut
        # the measured rate of both servers to a fifth. Made before the clock starts.
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=timeout))
            for _ in range(concurrency)
        ]
        deadline = time.perf_counter() + seconds
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client, k) for k, client in enumerate(clients)))
        elapsed = time.perf_counter() - started
        client_cpu = (time.process_time() - cpu_started) / elapsed
    return {**summarize(concurrency, latencies, errors, elapsed), "client_cpu": client_cpu}


def summarize(concurrency: int, latencies: list[float], errors: int, elapsed: float, count: int | None = None) -> dict:
    """One level's figures; ``count`` is what was done (default: one per latency), per second as "rps"."""
    count = len(latencies) if count is None else count
    ms = np.array(latencies) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (float("nan"),) * 3
    return {
        "concurrency": concurrency, "requests": count, "errors": errors, "rps": count / elapsed,
        "p50": p50, "p95": p95, "p99": p99,
    }  # fmt: skip


def level_cells(r: dict) -> str:
    """The requests .. p99 cells of a markdown row (the columns of LEVEL_HEADER)."""
    rate = f"{r['rps']:,.0f}" if r["rps"] >= 100 else f"{r['rps']:.1f}"  # a slow ResNet still shows a digit
    return f"{r['requests']} | {r['errors']} | {rate} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f}"


def main(args: argparse.Namespace) -> None:
    pngs = test_pngs(args.images)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, {args.url}")
    print(f"| concurrency | {LEVEL_HEADER} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in args.concurrency:
        r = asyncio.run(run_level(args.url, pngs, concurrency, args.seconds))
        print(f"| {r['concurrency']} | {level_cells(r)} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
