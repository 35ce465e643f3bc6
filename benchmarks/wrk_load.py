"""Load a classify endpoint with wrk (a C client) and measure what the server spent per request.

    python -m benchmarks.wrk_load --url http://127.0.0.1:3000/classify --pid $(pgrep -of 'bentoml serve') \\
        --concurrency 1 32 128 --seconds 15

wrk posts prebuilt multipart bodies (``benchmarks/multipart.lua``) of real Fashion-MNIST test
images; one JSON line per level, the figures of ``benchmarks.load.run_wrk``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.images import fashion_pngs
from benchmarks.load import run_wrk, write_bodies


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000/classify", help="endpoint (default: %(default)s)")
    parser.add_argument("--pid", type=int, default=None, help="the server's main process, for CPU per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128], help="levels (default: 1 32 128)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each level (default: 15)")
    parser.add_argument("--images", type=int, default=256, help="distinct test images (default: 256)")
    return parser


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="wrk-bodies-") as folder:
        bodies = write_bodies(Path(folder), fashion_pngs(args.images), "image/png")
        for concurrency in args.concurrency:
            print(json.dumps(run_wrk(args.url, bodies, concurrency, args.seconds, args.pid)), flush=True)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
