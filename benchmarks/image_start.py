"""The container images as a user meets them: size, time from `run` to ready, memory once ready.

    python -m deploy.image && python -m deploy.image --gpu      # or: make image image-gpu
    python -m benchmarks.image_start classic-cnns:cpu classic-cnns:gpu --runs 5 --write BENCHMARKS.md

Each run starts a fresh container (`--read-only`, port 3000 published on a loopback port), and the
clock runs from just before the engine's `run` command to the first 200 from /readyz (the models
loaded and warmed up), polled every 20 ms; then one /classify of a Fashion-MNIST test image, and the
container's memory as the engine reports it. The container is removed before the next run. A GPU
image on a machine without a GPU starts on the CPU: its figures are that, and say so.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.report import device, write_section
from benchmarks.servers import free_port
from deploy.image import engine

SECTION = "## Container images: size, start-up, memory"


def test_png() -> bytes:
    from training.fashion_mnist_files import load_fashion_mnist  # the real files, read as training reads them

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(load_fashion_mnist("test")[0][0])).save(buffer, format="PNG")
    return buffer.getvalue()


def one_run(tool: str, image: str, png: bytes) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    cid = subprocess.run(
        [tool, "run", "--detach", "--read-only", "--publish", f"127.0.0.1:{port}:3000", image],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - start > 300:
                raise SystemExit(f"{image} not ready after 300 s")
            time.sleep(0.02)
        ready_s = time.perf_counter() - start
        response = httpx.post(f"{url}/classify", files={"image": ("x.png", png, "image/png")}, timeout=60)
        response.raise_for_status()
        memory = (
            subprocess.run(
                [tool, "stats", "--no-stream", "--format", "{{.MemUsage}}", cid], capture_output=True, text=True
            )
            .stdout.split("/")[0]
            .strip()
        )
        models = httpx.get(f"{url}/models", timeout=60).json()["models"]
        return {"ready_s": ready_s, "memory": memory, "provider": models[0]["provider"], "models": len(models)}
    finally:
        now = ["--time", "0"] if tool == "podman" else []  # docker's rm --force kills at once
        subprocess.run([tool, "rm", "--force", *now, cid], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of BENCHMARKS.md")
    args = parser.parse_args()
    tool, png = engine(), test_png()
    rows = []
    for image in args.images:
        size = int(subprocess.run([tool, "image", "inspect", "--format", "{{.Size}}", image],
                                  capture_output=True, text=True, check=True).stdout)  # fmt: skip
        runs = [one_run(tool, image, png) for _ in range(args.runs)]
        ready = sorted(r["ready_s"] for r in runs)
        rows.append(
            f"| `{image}` | {size / 1e6:,.0f} MB | {statistics.median(ready):.2f} s | {ready[-1]:.2f} s "
            f"| {runs[-1]['memory']} | {runs[-1]['models']} | {runs[-1]['provider']} |"
        )
        print(rows[-1], flush=True)
    command = "python -m benchmarks.image_start " + " ".join(args.images) + f" --runs {args.runs}"
    text = "\n".join(
        [
            f"Device: {device()}, {tool}. Date: {date.today()}. Command: `{command}`.",
            "",
            f"From the engine's `run` to the first 200 from /readyz, {args.runs} fresh containers per image "
            "(`--read-only`); memory as the engine reports it after one /classify. A GPU image on a machine "
            "without a GPU serves on the CPU, as its provider column says.",
            "",
            "| image | size | ready, median | ready, slowest | memory | models | provider |",
            "|---|---:|---:|---:|---:|---:|---|",
            *rows,
        ]
    )
    print(text)
    if args.write:
        write_section(args.write, "image-start", text, SECTION)


if __name__ == "__main__":
    main()
