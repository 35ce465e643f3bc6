"""Load generator for POST /classify: throughput and latency percentiles at several concurrencies.

    python benchmarks/classify_load.py --url http://127.0.0.1:3000 --concurrency 1 8 32 --seconds 15

Each concurrency level runs that many asyncio clients in a closed loop for a bounded time, posting
real Fashion-MNIST test images as PNG. Requests that fail are counted, never silently dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import time

import httpx
import numpy as np
from PIL import Image


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="service base URL (default: http://127.0.0.1:3000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels (default: 1 8 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each level (default: 15)")
    parser.add_argument("--images", type=int, default=256, help="distinct test images to cycle through (default: 256)")
    return parser


def test_pngs(count: int) -> list[bytes]:
    from training.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    encoded = []
    for array in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


async def run_level(url: str, pngs: list[bytes], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                png = pngs[i % len(pngs)]
                i += concurrency
                start = time.perf_counter()
                response = await client.post("/classify", files={"image": ("x.png", png, "image/png")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
        "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95), "p99": np.percentile(ms, 99),
    }  # fmt: skip


def main(args: argparse.Namespace) -> None:
    pngs = test_pngs(args.images)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, {args.url}")
    print("| concurrency | requests | errors | req/s | p50 ms | p95 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in args.concurrency:
        r = asyncio.run(run_level(args.url, pngs, concurrency, args.seconds))
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
