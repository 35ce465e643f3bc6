"""What the hop to a decoder process costs: each kind of image decoded by the service's
``serving.decoders.DecodePool`` (one process) against ``model_store.image_bytes_to_input`` in the
calling process, in CPU per image of the whole process tree.

    python -m benchmarks.decode_hop
    python -m benchmarks.decode_hop --write BENCHMARKS.md

The difference is what sending an image to a decoder costs over decoding it on the event loop: the
thread hop, the body through a pipe and back, and anything the decoder process does differently.
It sets where the service decodes an image (``serving.handlers.INLINE_MAX_WORK``). Images: the
shipped LeNet's card (decode "scaled", 1x28x28); test images as PNGs, noise PNGs (which do not
compress), and photos (``benchmarks.images.fashion_photos``) as JPEG, WebP and PNG. CPU is read from
/proc in clock ticks (10 ms); each pass runs about 1.5 s for them, the best of 3 passes shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.images import encode, fashion_photos, fashion_pngs
from benchmarks.load import cpu_seconds, process_tree
from benchmarks.report import device, write_section
from model_store import image_bytes_to_input, open_image
from model_store.store import DEFAULT_MODEL_FILE, read_onnx_card
from serving.decoders import DecodePool

SECTION, HEADING = "decode-hop", "## Where an image is decoded: the hop to a decoder process"
MAX_PIXELS, MAX_DECODE_BYTES = 40_000_000, 512 * 2**20  # the service's defaults
PASS_SECONDS = 1.5  # the CPU one pass of a way takes, about: 150 clock ticks


def images() -> dict[str, list[bytes]]:
    rng = np.random.default_rng(0)

    def noise(side: int) -> bytes:
        return encode(Image.fromarray(rng.integers(0, 256, (side, side), np.uint8)), "PNG")

    return {
        "28x28 PNG (a test image)": fashion_pngs(8),
        "128x128 noise PNG": [noise(128) for _ in range(4)],
        "256x256 noise PNG": [noise(256) for _ in range(4)],
        "320x240 JPEG": fashion_photos(8, (320, 240)),
        "1024x768 JPEG": fashion_photos(8, (1024, 768)),
        "320x240 WebP": fashion_photos(8, (320, 240), "WEBP"),
        "1024x768 WebP": fashion_photos(8, (1024, 768), "WEBP"),
        "12 MP JPEG": fashion_photos(4, (4000, 3000)),
        "12 MP PNG": fashion_photos(2, (4000, 3000), "PNG", 0.0),
    }


async def measure(kinds: dict[str, list[bytes]], card) -> list[dict]:
    pool = DecodePool(1, 60.0, MAX_PIXELS, MAX_DECODE_BYTES)
    tree = lambda: cpu_seconds(process_tree(os.getpid()))  # noqa: E731
    rows = []
    try:
        await pool.decode(next(iter(kinds.values()))[0], card)  # the decoder started, and warm
        for kind, photos in kinds.items():
            image = open_image(photos[0], MAX_PIXELS, MAX_DECODE_BYTES, card)
            start = time.perf_counter()  # one of each, by the clock: finer than the CPU's ticks
            image_bytes_to_input(photos[0], card, MAX_PIXELS, MAX_DECODE_BYTES)
            await pool.decode(photos[0], card)
            reps = max(4, int(2 * PASS_SECONDS / (time.perf_counter() - start)))
            best = {}
            for way in ("inline", "decoder"):
                best[way] = float("inf")
                for _ in range(3):
                    start = tree()
                    for i in range(reps):
                        data = photos[i % len(photos)]
                        if way == "inline":
                            image_bytes_to_input(data, card, MAX_PIXELS, MAX_DECODE_BYTES)
                        else:
                            await pool.decode(data, card)
                    best[way] = min(best[way], (tree() - start) / reps)
            size = sum(map(len, photos)) / len(photos)
            rows.append({"kind": kind, "bytes": size, "decoded": image.size, **best})
            print(rows[-1], flush=True)
    finally:
        pool.close()
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        f"Device: {device()}. Date: {date.today()}. Command: `python -m benchmarks.decode_hop`. CPU per image of "
        "the whole process tree, best of 3 passes, under the shipped LeNet's card; decoded: the size the "
        "decoder produces (a JPEG at the model's scale).",
        "",
        "| image | mean size | decoded | inline ms | decoder process ms | the hop ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['bytes'] / 1024:,.1f} KB | {r['decoded'][0]}x{r['decoded'][1]} | {1000 * r['inline']:.2f} | "
            f"{1000 * r['decoder']:.2f} | {1000 * (r['decoder'] - r['inline']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    card = read_onnx_card(DEFAULT_MODEL_FILE)
    text = report(asyncio.run(measure(images(), card)))
    print(text)
    if args.write:
        write_section(args.write, SECTION, text, HEADING)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="write the section into this markdown file")
    sys.exit(main(parser.parse_args()))
